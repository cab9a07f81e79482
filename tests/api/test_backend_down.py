"""A missing backend is a clear 503, never a traceback and never a certificate: the API keeps
answering when its Table Storage (a real Azurite, stopped mid-run) goes away."""

from __future__ import annotations

import time

import httpx
import pytest

from devstack.azurite import start_azurite
from devstack.proc import StandInError, free_port
from devstack.stack import api_env as make_env
from devstack.stack import demo_policy_document, seed_policy, start_api
from tests.realparts import unavailable


@pytest.fixture(scope="module")
def fragile_api(tmp_path_factory, state_dir, oidc, softhsm_token):
    """An API server with its own Azurite, which the tests stop."""
    own = tmp_path_factory.mktemp("fragile")
    try:
        azurite = start_azurite(own, free_port())
    except StandInError as exc:
        unavailable(str(exc))
    env = make_env(state_dir, oidc, azurite.port, softhsm_token)
    seed_policy(env, oidc, demo_policy_document(oidc))
    api = start_api(own, free_port(), env)
    port = int(api.popen.args[api.popen.args.index("--port") + 1])
    yield azurite, f"http://127.0.0.1:{port}"
    api.stop()
    azurite.stop()


def test_storage_going_away_is_a_503_with_no_certificate(fragile_api, token_for, pub):
    azurite, url = fragile_api
    alice = {"Authorization": f"Bearer {token_for('alice')}"}
    with httpx.Client(base_url=url, timeout=60) as c:
        ok = c.post("/api/requests", headers=alice, json={"host": "127.0.0.1", "principal": "alice", "public_key": pub()})
        assert ok.status_code == 201, ok.text
        azurite.stop()
        t = time.monotonic()
        down = c.post("/api/requests", headers=alice,
                      json={"host": "web9", "principal": "alice", "public_key": pub(), "policy": "demo"})
        took = time.monotonic() - t
        assert down.status_code == 503, down.text
        body = down.json()
        assert body["error"] == "storage_unavailable" and body["request_id"] and "certificate" not in body
        assert "Traceback" not in down.text and took < 30, took
        health = c.get("/api/health")
        assert health.status_code == 503
        assert health.json()["status"] == "degraded"
        checks = health.json()["checks"]
        assert checks["storage"] == "unavailable" and checks["signer"] == "ok"  # each its own state
        assert all(v == "ok" for k, v in checks.items() if k.startswith("identity:"))
        carol = {"Authorization": f"Bearer {token_for('carol')}"}
        for params in ({}, {"request_id": ok.json()["id"]}, {"serial": ok.json()["serial"]}):  # each a page read
            audit = c.get("/api/audit", headers=carol, params=params)
            assert audit.status_code == 503 and audit.json()["error"] == "storage_unavailable", (params, audit.text)
