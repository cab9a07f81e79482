"""The HTTP API against the real stand-ins: uvicorn serving the app, Azurite, SoftHSM, oidc-provider."""

from __future__ import annotations

import json
import re
import subprocess
import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, rsa

from devstack.stack import identity_of


def openssh(key) -> str:
    return key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()


@pytest.fixture(scope="module")
def alice(auth):
    return auth("alice")


def audit_entries(context, tid: str, since: float) -> list:
    return context.service.store.list_audit(tid, since=since - 1)


def test_client_config_tells_the_cli_how_to_sign_in(client, oidc):
    r = client.get("/api/client-config")
    assert r.status_code == 200
    body = r.json()
    tid = oidc.tenant_id("contoso")
    assert body["authority"] == oidc.issuer(tid)
    assert body["authority_type"] == "oidc"
    assert body["client_id"] == oidc.cli_client_id
    assert body["scopes"] == ["api://ezssh/access_as_user"]


def test_auto_approved_request_returns_a_certificate_recorded_and_audited(client, alice, oidc, context,
                                                                          tmp_path, pub):
    started = time.time()
    key = pub()
    r = client.post("/api/requests", headers=alice,
                    json={"host": "127.0.0.1", "principal": "alice", "public_key": key, "reason": "deploy"})
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["status"] == "issued"
    assert body["principals"] == ["alice"]
    assert body["key_id"] == f"ezssh/demo/{body['id']}/alice@contoso.test"
    assert int(body["serial"]) > 0
    assert body["valid_before"] - body["valid_after"] == 3600 + 60  # default TTL plus the backdate

    cert = tmp_path / "cert.pub"
    cert.write_text(body["certificate"] + "\n")
    shown = subprocess.run(["ssh-keygen", "-L", "-f", str(cert)], capture_output=True, text=True, check=True).stdout
    assert f'Key ID: "{body["key_id"]}"' in shown
    assert f"Serial: {body['serial']}" in shown
    assert "Principals: \n                alice" in shown

    tid = oidc.tenant_id("contoso")
    record = context.service.store.get_certificate(tid, "demo", int(body["serial"]))
    assert record.key_id == body["key_id"] and record.certificate == body["certificate"]
    issued = [e for e in audit_entries(context, tid, started) if e.action == "certificate.issued"
              and e.request_id == body["id"]]
    assert len(issued) == 1 and issued[0].serial == body["serial"] and issued[0].key_id == body["key_id"]
    chain = [e for e in audit_entries(context, tid, started) if e.request_id == body["id"]]
    assert [e.action for e in chain] == ["request.created", "certificate.issued"]
    from functions.core.audit import verify_chain

    assert verify_chain(chain)
    assert context.service.store.get_request(tid, body["id"]).state == "issued"


def test_auto_approved_request_without_a_key_waits_for_one(client, alice, pub):
    r = client.post("/api/requests", headers=alice, json={"host": "web1", "principal": "alice"})
    assert r.status_code == 200, r.text
    rid = r.json()["id"]
    assert r.json()["status"] == "approved"
    r2 = client.post(f"/api/requests/{rid}/certificate", headers=alice, json={"public_key": pub()})
    assert r2.status_code == 201, r2.text
    # One approved request yields one certificate.
    r3 = client.post(f"/api/requests/{rid}/certificate", headers=alice, json={"public_key": pub()})
    assert r3.status_code == 409 and r3.json()["error"] == "conflict"


def _dsa_line() -> str:
    return openssh(dsa.generate_private_key(1024))


def _rsa_line(bits: int) -> str:
    return openssh(rsa.generate_private_key(65537, bits))


BAD_REQUESTS = [
    ("malformed key", {"public_key": "ssh-ed25519 AAAA-not-base64"}, 400, "invalid_public_key"),
    ("DSA key", {"public_key": "DSA"}, 400, "weak_public_key"),
    ("RSA 1024", {"public_key": "RSA1024"}, 400, "weak_public_key"),
    ("certificate for a key", {"public_key": "CERT"}, 400, "invalid_public_key"),
    ("unknown field", {"force_command": "/bin/sh"}, 400, "invalid_request"),
    ("wrong type", {"ttl_seconds": "3600"}, 400, "invalid_request"),
    ("principal not allowed", {"principal": "root"}, 403, "principal_not_allowed"),
    ("host no policy covers", {"host": "db.internal"}, 403, "no_policy_for_host"),
    ("TTL over the maximum", {"ttl_seconds": 9 * 3600}, 400, "ttl_too_long"),
    ("host too long", {"host": "a" * 300}, 400, "invalid_request"),
    ("blank principal", {"principal": "   "}, 400, "invalid_request"),
]


@pytest.mark.parametrize("name,change,status,code", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_input_is_refused_clearly_audited_and_issues_nothing(client, alice, oidc, context, name, change,
                                                                 status, code, tmp_path, pub):
    body = {"host": "127.0.0.1", "principal": "alice", "public_key": pub()}
    body.update(change)
    if body["public_key"] == "DSA":
        body["public_key"] = _dsa_line()
    elif body["public_key"] == "RSA1024":
        body["public_key"] = _rsa_line(1024)
    elif body["public_key"] == "CERT":
        ok = client.post("/api/requests", headers=alice, json={"host": "127.0.0.1", "principal": "alice",
                                                               "public_key": pub()})
        body["public_key"] = ok.json()["certificate"]
    tid = oidc.tenant_id("contoso")
    before = time.time()
    certs_before = _count_certs(context, tid)
    r = client.post("/api/requests", headers=alice, json=body)
    assert r.status_code == status, r.text
    err = r.json()
    assert err["error"] == code
    assert err["message"] and "Traceback" not in r.text and "certificate" not in err
    assert err["request_id"] == r.headers["x-request-id"]
    assert _count_certs(context, tid) == certs_before
    refusals = [e for e in audit_entries(context, tid, before) if e.outcome == "refused" and e.error_code == code]
    assert refusals, f"no audit entry for the refusal {code}"


def _count_certs(context, tid: str) -> int:
    table = context.service.store._table  # read-only peek to prove nothing was issued
    rows = table.query_entities("PartitionKey eq @pk and RowKey ge 'req|' and RowKey lt 'req}'",
                                parameters={"pk": tid})  # a certificate lives in its request's row
    return sum(1 for e in rows if e.get("Certificate"))


def _signing_jwk(state_dir):
    keys = json.loads((state_dir / "oidc" / "jwks.json").read_text())["keys"]
    return next(k for k in keys if k.get("use", "sig") == "sig" and k["kty"] == "RSA")


def _claims_from(token: str) -> dict:
    return jwt.decode(token, options={"verify_signature": False})


@pytest.mark.parametrize("case", ["missing", "garbage", "expired", "forged", "other audience", "alg none"])
def test_bad_tokens_are_refused_with_401_and_counted_not_stored(client, token_for, state_dir, context, case, pub):
    good = token_for("alice")
    claims = _claims_from(good)
    jwk = _signing_jwk(state_dir)
    real_key = jwt.algorithms.RSAAlgorithm.from_jwk(json.dumps(jwk))
    headers = {"kid": jwk["kid"]}
    now = int(time.time())
    if case == "missing":
        auth = None
    elif case == "garbage":
        auth = "Bearer not.a.jwt"
    elif case == "expired":
        auth = "Bearer " + jwt.encode({**claims, "iat": now - 7200, "nbf": now - 7200, "exp": now - 3600},
                                      real_key, algorithm="RS256", headers=headers)
    elif case == "forged":
        auth = "Bearer " + jwt.encode(claims, rsa.generate_private_key(65537, 2048), algorithm="RS256",
                                      headers=headers)
    elif case == "other audience":
        auth = "Bearer " + jwt.encode({**claims, "aud": "someone-else"}, real_key, algorithm="RS256",
                                      headers=headers)
    else:
        auth = "Bearer " + jwt.encode(claims, None, algorithm="none")  # type: ignore[arg-type]
    before = time.time()
    r = client.post("/api/requests", headers={"Authorization": auth} if auth else {},
                    json={"host": "127.0.0.1", "principal": "alice", "public_key": pub()})
    assert r.status_code == 401, r.text
    assert r.json()["error"] == "unauthenticated"
    assert "certificate" not in r.json()
    # anyone can send junk tokens: they become log events and a counter, never one storage row each
    anon = context.service.store.list_audit("_unauthenticated", since=before - 1)
    assert not [e for e in anon if e.action == "auth.refused"]
    log = (state_dir / "logs" / "api.log").read_text()
    assert re.search(r"auth\.refused .*unauthenticated_refusals=\d+", log)


def test_a_tenant_never_uses_another_tenants_policy(client, token_for, pub):
    erin = {"Authorization": f"Bearer {token_for('erin')}"}
    r = client.post("/api/requests", headers=erin,
                    json={"host": "127.0.0.1", "principal": "erin", "public_key": pub(), "policy": "demo"})
    assert r.status_code == 403 and r.json()["error"] == "no_policy_for_host"


def test_requests_are_visible_to_the_requester_only(client, alice, token_for):
    r = client.post("/api/requests", headers=alice, json={"host": "web2", "principal": "alice"})
    rid = r.json()["id"]
    assert client.get(f"/api/requests/{rid}", headers=alice).json()["id"] == rid
    dave = {"Authorization": f"Bearer {token_for('dave')}"}  # an approver sees it (issue 4 builds on this)
    assert client.get(f"/api/requests/{rid}", headers=dave).status_code == 200
    erin = {"Authorization": f"Bearer {token_for('erin')}"}  # another tenant: not found, not forbidden
    assert client.get(f"/api/requests/{rid}", headers=erin).status_code == 404


def test_ca_endpoint_serves_the_policy_ca_in_openssh_format(client, alice, demo_policy):
    r = client.get("/api/policies/demo/ca", headers=alice)
    assert r.status_code == 200
    assert r.text.strip() == demo_policy.current_ca.public_key
    assert r.text.startswith("ecdsa-sha2-nistp256 ")


def test_identity_matches_what_the_api_derives(context, token_for, oidc):
    who = context.validator.validate("Bearer " + token_for("bob"))
    assert who == identity_of(oidc, "bob")


def test_issuance_is_logged_with_request_id_key_id_and_serial(client, alice, state_dir, pub):
    r = client.post("/api/requests", headers=alice,
                    json={"host": "127.0.0.1", "principal": "alice", "public_key": pub()})
    assert r.status_code == 201
    body, rid = r.json(), r.headers["x-request-id"]
    deadline = time.time() + 5
    line = ""
    while time.time() < deadline and not line:
        log = (state_dir / "logs" / "api.log").read_text(errors="replace")
        line = next((x for x in log.splitlines() if "certificate.issued" in x and f"request_id={rid}" in x), "")
        time.sleep(0.1)
    assert f"key_id={body['key_id']}" in line and f"serial={body['serial']}" in line


def test_refusals_are_logged_with_the_request_id(client, alice, state_dir):
    r = client.post("/api/requests", headers=alice, json={"host": "db.internal", "principal": "alice"})
    assert r.status_code == 403
    rid = r.headers["x-request-id"]
    deadline = time.time() + 5
    while time.time() < deadline:
        log = (state_dir / "logs" / "api.log").read_text(errors="replace")
        if any("request.refused" in x and f"request_id={rid}" in x and "error=no_policy_for_host" in x
               for x in log.splitlines()):
            return
        time.sleep(0.1)
    raise AssertionError("no log line for the refusal")
