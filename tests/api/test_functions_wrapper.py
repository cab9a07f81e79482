"""The API through the Azure Functions wrapper: function_app.py's `http_app_func`
(func.AsgiFunctionApp over the FastAPI app), called as the Functions host calls it, with the
service wired to the same real stand-ins."""

from __future__ import annotations

import asyncio
import json
import types

import azure.functions as func
import pytest

from tests.functions_host import user_functions


@pytest.fixture
def http(monkeypatch, context):
    import functions.wiring

    monkeypatch.setattr(functions.wiring, "_context", [context])
    fn = user_functions()["http_app_func"]

    def call(method: str, path: str, body: dict | None = None, token: str | None = None) -> func.HttpResponse:
        headers = {"content-type": "application/json"}
        if token:
            headers["authorization"] = f"Bearer {token}"
        req = func.HttpRequest(method=method, url=f"https://ezssh.example.net{path}", headers=headers,
                               body=json.dumps(body).encode() if body is not None else b"",
                               route_params={"route": path.lstrip("/")}, params={})
        ctx = types.SimpleNamespace(invocation_id="test-invocation", function_name="http_app_func",
                                    function_directory="", trace_context=None, retry_context=None)
        return asyncio.run(fn(req, ctx))

    return call


def test_health_through_the_functions_wrapper(http):
    r = http("GET", "/api/health")
    assert r.status_code == 200
    body = json.loads(r.get_body())
    assert body["status"] == "ok" and body["checks"]["storage"] == body["checks"]["signer"] == "ok"
    assert all(v == "ok" for v in body["checks"].values())


def test_issuance_and_a_refusal_through_the_functions_wrapper(http, token_for, demo_policy, pub):
    ok = http("POST", "/api/requests", {"host": "127.0.0.1", "principal": "alice", "public_key": pub()},
              token_for("alice"))
    assert ok.status_code == 201, ok.get_body()
    body = json.loads(ok.get_body())
    assert body["principals"] == ["alice"] and body["key_id"].startswith("ezssh/demo/")
    assert ok.headers.get("x-request-id")
    bad = http("POST", "/api/requests", {"host": "127.0.0.1", "principal": "alice", "shell": "/bin/sh"},
               token_for("alice"))
    assert bad.status_code == 400 and json.loads(bad.get_body())["error"] == "invalid_request"
    anon = http("GET", "/api/policies")
    assert anon.status_code == 401 and json.loads(anon.get_body())["error"] == "unauthenticated"


def test_the_web_page_through_the_functions_wrapper(http):
    """host.json's routePrefix is "": the function's route `/{*route}` takes /app/ as well as /api/."""
    from tests.deploy import REPO

    assert json.loads((REPO / "host.json").read_text())["extensions"]["http"]["routePrefix"] == ""
    page = http("GET", "/app/requests/0123456789abcdef")
    assert page.status_code == 200 and b'type="module"' in page.get_body()
    assert "frame-ancestors 'none'" in page.headers.get("content-security-policy")
    assert http("GET", "/").headers.get("location") == "/app/"
