"""GET /api/health through the app: one state per dependency the next call needs (storage, the
signing backend, each tenant's identity provider keys), no key or tenant detail beyond the
configured tenant ids (which /api/client-config lists too), and no signature with any CA key. A
worker whose identity provider cannot be reached says so instead of green."""

from __future__ import annotations

from dataclasses import replace

from devstack.proc import free_port
from fastapi.testclient import TestClient


def test_health_names_each_dependency_and_signs_nothing(client, context, demo_policy, monkeypatch):
    signer_type = type(context.service.keys.get_signer(demo_policy.current_ca.key_ref))
    signed: list[bytes] = []
    monkeypatch.setattr(signer_type, "sign", lambda self, data, *a: signed.append(data))  # any signature shows
    from functions.api.app import create_app
    from functions.wiring import Context

    ctx = Context(settings=context.settings, service=context.service, validator=context.validator)
    with TestClient(create_app(lambda: ctx)) as c:
        r = c.get("/api/health")
    assert r.status_code == 200, r.text
    body = r.json()
    expected = {"storage", "signer"} | {f"identity:{t}" for t in context.settings.tenants}
    assert body == {"status": "ok", "checks": {name: "ok" for name in expected}}
    assert signed == []
    assert "SHA256:" not in r.text and demo_policy.id not in r.text
    # the running server answers the same shape
    served = client.get("/api/health").json()
    assert set(served["checks"]) >= expected and served["status"] == "ok"


def test_a_worker_that_cannot_reach_the_identity_provider_is_not_green(context):
    from functions.api.app import create_app
    from functions.identity import TokenValidator
    from functions.wiring import Context

    down = replace(context.settings, issuer_template=f"https://127.0.0.1:{free_port()}/{{tid}}/v2.0")
    validator = TokenValidator(down)
    validator.warm()  # as at start: best effort, nothing there
    ctx = Context(settings=down, service=context.service, validator=validator)
    with TestClient(create_app(lambda: ctx)) as c:
        r = c.get("/api/health")
    assert r.status_code == 503 and r.json()["status"] == "degraded"
    checks = r.json()["checks"]
    assert {k: v for k, v in checks.items() if k.startswith("identity:")} == {
        f"identity:{t}": "unavailable" for t in down.tenants
    }
    assert checks["storage"] == "ok" and checks["signer"] == "ok"
