"""Policy CRUD, authorization, one CA per policy, rotation, deletion and tenant isolation (issue 3),
over HTTP against uvicorn + Azurite + SoftHSM + the OIDC stand-in."""

from __future__ import annotations

import json

import subprocess
import threading
import time

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from functions.core.errors import CaKeyNotFound
from functions.service import Service


BOB_OID = "7385a7f7-71c4-4083-94b5-8cdfd3ae6fc9"  # bob in infra/local/oidc/users.json
NOBODY_OID = "00000000-0000-4000-8000-00000000dead"  # no dev user has it


def ops_doc(oidc, pid: str = "ops") -> dict:
    return {
        "id": pid,
        "name": "Operations",
        "rules": [{"users": [oidc.user("alice")["oid"]], "action": "auto"},
                  {"groups": [oidc.group_id("contoso", "ezssh-users")], "action": "approval"}],
        "hosts": ["ops-*", "10.1.0.0/16", "127.0.0.1"],
        "principals": ["{username}", "deploy"],
        "approvers": {"groups": [oidc.group_id("contoso", "ezssh-approvers")]},
        "admins": {"users": [oidc.user("dave")["oid"]]},
        "max_ttl": 7200,
    }


def create(client, auth, doc: dict, user: str = "carol") -> httpx.Response:
    # json.dumps escapes a lone surrogate as \ud800, as a hostile client would send it
    return client.post("/api/policies", headers={**auth(user), "content-type": "application/json"},
                       content=json.dumps(doc).encode())


def test_tenant_admin_creates_a_policy_with_its_own_ca(client, oidc, context, auth):
    r = create(client, auth, ops_doc(oidc, "ops-create"))
    assert r.status_code == 201, r.text
    body = r.json()
    assert r.headers["etag"] == body["etag"]
    assert [c["state"] for c in body["ca"]] == ["current"]
    ca_line = client.get("/api/policies/ops-create/ca", headers=auth("alice")).text.strip()
    assert ca_line == body["ca"][0]["public_key"]
    demo_ca = client.get("/api/policies/demo/ca", headers=auth("alice")).text.strip()
    assert ca_line.split()[1] != demo_ca.split()[1], "each policy has its own CA key"
    # the key lives in the HSM and signs
    signer = context.service.keys.get_signer(body["ca"][0]["key_ref"])
    assert signer.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                            serialization.PublicFormat.OpenSSH).decode() == " ".join(ca_line.split()[:2])
    # a second create with the same id is a conflict, not an overwrite
    again = create(client, auth, ops_doc(oidc, "ops-create"))
    assert again.status_code == 409 and again.json()["error"] == "conflict"


def test_only_tenant_admins_create_policies(client, oidc, auth):
    for user in ("alice", "dave"):
        r = create(client, auth, ops_doc(oidc, f"nope-{user}"), user=user)
        assert r.status_code == 403 and r.json()["error"] == "forbidden"
    assert client.get("/api/policies/nope-alice", headers=auth("carol")).status_code == 404


BAD_DOCS = [
    ("unknown field", {"colour": "blue"}, "Unknown or read-only policy fields: colour"),
    ("server-set field", {"ca": []}, "Unknown or read-only policy fields: ca"),
    ("empty principals", {"principals": []}, "principals"),
    ("max_ttl over the ceiling", {"max_ttl": 10 * 24 * 3600}, "max_ttl"),
    ("unknown extension", {"extensions": ["permit-everything"]}, "Unknown extension"),
    ("malformed CIDR", {"hosts": ["10.0.0.1/8"]}, "CIDR"),
    ("bad glob", {"hosts": ["web/*"]}, "not a valid"),
    ("wrong type", {"max_ttl": "3600"}, "whole number"),
    ("only the requester could approve", {"rules": [{"users": [BOB_OID], "action": "approval"}],
                                          "approvers": {"users": [BOB_OID]}}, "approve their own"),
    ("a person named by UPN", {"admins": {"users": ["dave@contoso.test"]}}, "by UPN"),
    ("a name that is no object id", {"approvers": {"users": ["dave"]}}, "not an object id"),
    ("a login for a UPN", {"logins": [{"oid": "bob@contoso.test", "logins": ["bob"]}]}, "by UPN"),
    ("a lone surrogate in the name", {"name": "ops \ud800"}, "lone surrogate"),
    ("a control character in the name", {"name": "ops\u0007"}, "control character"),
    ("a webhook to a metadata address", {"webhook_url": "https://169.254.169.254/x"}, "non-public"),
    ("a plain http webhook", {"webhook_url": "http://hooks.example.net/x"}, "https"),
    ("more than storage holds", {"hosts": [f"h{i:05d}-" + "x" * 50 + ".example" for i in range(300)]},
     "Table Storage"),
]


@pytest.mark.parametrize("name,change,needle", BAD_DOCS, ids=[b[0] for b in BAD_DOCS])
def test_malformed_policy_documents_are_refused_and_change_nothing(client, oidc, name, change, needle, auth):
    doc = {**ops_doc(oidc, "bad-doc"), **change}
    r = create(client, auth, doc)
    assert r.status_code == 400, r.text
    assert r.json()["error"] == "invalid_request" and needle in r.json()["message"]
    assert client.get("/api/policies/bad-doc", headers=auth("carol")).status_code == 404


def test_not_json_is_refused(client, auth):
    r = client.post("/api/policies", headers={**auth("carol"), "content-type": "application/json"},
                    content=b"{not json")
    assert r.status_code == 400 and r.json()["error"] == "invalid_request"


def test_members_see_only_their_policies_and_approvers_theirs(client, oidc, auth):
    assert create(client, auth, ops_doc(oidc, "ops-visible")).status_code == 201
    hidden = {**ops_doc(oidc, "ops-hidden"), "rules": [{"users": [NOBODY_OID], "action": "auto"}],
              "approvers": {"users": [NOBODY_OID]}, "admins": {}}
    assert create(client, auth, hidden).status_code == 201
    ids = lambda user: {p["id"] for p in client.get("/api/policies", headers=auth(user)).json()["policies"]}  # noqa: E731
    assert {"demo", "ops-visible"} <= ids("alice") and "ops-hidden" not in ids("alice")
    assert "ops-visible" in ids("bob") and "ops-hidden" not in ids("bob")
    assert "ops-hidden" in ids("carol")  # tenant admin sees all
    assert client.get("/api/policies/ops-hidden", headers=auth("alice")).status_code == 404


def test_patch_needs_the_current_etag_and_audits_what_changed(client, oidc, context, auth):
    r = create(client, auth, ops_doc(oidc, "ops-patch"))
    etag = r.headers["etag"]
    hdr = auth("dave")  # a policy admin, not a tenant admin
    assert client.patch("/api/policies/ops-patch", headers=hdr, json={"max_ttl": 3600}).status_code == 428
    ok = client.patch("/api/policies/ops-patch", headers={**hdr, "If-Match": etag}, json={"max_ttl": 3600})
    assert ok.status_code == 200, ok.text
    assert ok.json()["max_ttl"] == 3600 and ok.headers["etag"] != etag
    stale = client.patch("/api/policies/ops-patch", headers={**hdr, "If-Match": etag}, json={"max_ttl": 1800})
    assert stale.status_code == 412 and stale.json()["error"] == "precondition_failed"
    assert client.get("/api/policies/ops-patch", headers=hdr).json()["max_ttl"] == 3600
    members_cant = client.patch("/api/policies/ops-patch",
                                headers={**auth("alice"), "If-Match": ok.headers["etag"]},
                                json={"max_ttl": 60})
    assert members_cant.status_code == 403
    unknown = client.patch("/api/policies/ops-patch", headers={**hdr, "If-Match": ok.headers["etag"]},
                           json={"tenant_id": "x"})
    assert unknown.status_code == 400
    entries = [e for e in context.service.store.list_audit(oidc.tenant_id("contoso"), limit=100000)
               if e.policy_id == "ops-patch" and e.action == "policy.updated"]
    assert len(entries) == 1
    assert entries[0].actor_upn == "dave@contoso.test"
    assert entries[0].details["changed"]["max_ttl"] == {"from": 7200, "to": 3600}


def test_concurrent_edits_one_wins_the_other_gets_412(client, oidc, auth):
    etag = create(client, auth, ops_doc(oidc, "ops-race")).headers["etag"]
    hdr = {**auth("carol"), "If-Match": etag}
    results: list[int] = []

    def patch(ttl: int) -> None:
        with httpx.Client(base_url=str(client.base_url), timeout=30) as c:
            results.append(c.patch("/api/policies/ops-race", headers=hdr, json={"default_ttl": ttl}).status_code)

    threads = [threading.Thread(target=patch, args=(600 + i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results).count(200) == 1 and results.count(412) == 5, results


def test_delete_stops_issuance_disables_the_ca_and_keeps_records(client, oidc, context, auth, keypair):
    r = create(client, auth, ops_doc(oidc, "ops-delete"))
    etag, key_ref = r.headers["etag"], r.json()["ca"][0]["key_ref"]
    _, pub = keypair()
    issued = client.post("/api/requests", headers=auth("alice"),
                         json={"host": "ops-1", "principal": "alice", "public_key": pub, "policy": "ops-delete"})
    assert issued.status_code == 201, issued.text
    assert client.delete("/api/policies/ops-delete", headers={**auth("dave"), "If-Match": etag}).status_code == 403
    assert client.delete("/api/policies/ops-delete", headers=auth("carol")).status_code == 428
    assert client.delete("/api/policies/ops-delete", headers={**auth("carol"), "If-Match": etag}).status_code == 204
    assert client.get("/api/policies/ops-delete", headers=auth("carol")).status_code == 404
    again = client.post("/api/requests", headers=auth("alice"),
                        json={"host": "ops-1", "principal": "alice", "public_key": keypair()[1], "policy": "ops-delete"})
    assert again.status_code == 403 and again.json()["error"] == "no_policy_for_host"
    with pytest.raises(CaKeyNotFound):
        context.service.keys.get_signer(key_ref).sign(b"x", __import__("cryptography.hazmat.primitives.hashes",
                                                                        fromlist=["SHA256"]).SHA256())
    tid = oidc.tenant_id("contoso")
    assert context.service.store.get_certificate(tid, "ops-delete", int(issued.json()["serial"])).key_id
    actions = [e.action for e in context.service.store.list_audit(tid, limit=100000) if e.policy_id == "ops-delete"]
    assert "policy.created" in actions and "certificate.issued" in actions and "policy.deleted" in actions


def test_another_tenant_cannot_see_change_or_sign_with_a_policy(client, oidc, auth, keypair):
    r = create(client, auth, ops_doc(oidc, "ops-private"))
    etag = r.headers["etag"]
    mallory = auth("mallory")  # tenant admin of fabrikam
    assert "ops-private" not in {p["id"] for p in client.get("/api/policies", headers=mallory).json()["policies"]}
    assert client.get("/api/policies/ops-private", headers=mallory).status_code == 404
    assert client.get("/api/policies/ops-private/ca", headers=mallory).status_code == 404
    assert client.patch("/api/policies/ops-private", headers={**mallory, "If-Match": etag},
                        json={"max_ttl": 60}).status_code == 404
    assert client.post("/api/policies/ops-private/rotate-ca", headers=mallory).status_code == 404
    assert client.delete("/api/policies/ops-private", headers={**mallory, "If-Match": etag}).status_code == 404
    signed = client.post("/api/requests", headers=mallory, json={"host": "ops-1", "principal": "mallory",
                                                                 "public_key": keypair()[1], "policy": "ops-private"})
    assert signed.status_code == 403 and "certificate" not in signed.json()
    # the same id in fabrikam is a different policy with a different CA
    fab = {"id": "ops-private", "rules": [{"users": ["*"], "action": "auto"}], "hosts": ["ops-*"],
           "principals": ["{username}"]}
    mine = client.post("/api/policies", headers=mallory, json=fab)
    assert mine.status_code == 201, mine.text
    assert mine.json()["ca"][0]["public_key"] != r.json()["ca"][0]["public_key"]
    assert client.get("/api/policies/ops-private", headers=auth("carol")).json()["ca"] == r.json()["ca"]


def _login(sshd, key: ed25519.Ed25519PrivateKey, cert_line: str, tmp_path, name: str) -> subprocess.CompletedProcess:
    kf = tmp_path / name
    kf.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                     serialization.NoEncryption()))
    kf.chmod(0o600)
    cf = tmp_path / f"{name}-cert.pub"
    cf.write_text(cert_line + "\n")
    return subprocess.run(["ssh", "-i", str(kf), "-o", f"CertificateFile={cf}", "-o", "IdentitiesOnly=yes",
                           "-o", "IdentityAgent=none", "-o", "BatchMode=yes", *sshd.client_options(),
                           "-o", "LogLevel=ERROR", "-p", str(sshd.port),
                           "alice@127.0.0.1", "whoami"], capture_output=True, text=True, timeout=30)


def test_rotation_keeps_old_certificates_valid_until_retirement(client, oidc, context, sshd, demo_policy,
                                                                tmp_path, auth, keypair):
    r = create(client, auth, ops_doc(oidc, "ops-rotate"))
    old_ca = r.json()["ca"][0]
    alice = auth("alice")

    def issue() -> tuple[ed25519.Ed25519PrivateKey, dict]:
        k, pub = keypair()
        resp = client.post("/api/requests", headers=alice,
                           json={"host": "127.0.0.1", "principal": "alice", "public_key": pub, "policy": "ops-rotate"})
        assert resp.status_code == 201, resp.text
        return k, resp.json()

    old_key, old_cert = issue()
    assert old_cert["ca_fingerprint"] == old_ca["fingerprint"]
    rot = client.post("/api/policies/ops-rotate/rotate-ca", headers=auth("dave"))
    assert rot.status_code == 200, rot.text
    states = [(c["state"], c["fingerprint"]) for c in rot.json()["ca"]]
    assert states[0][0] == "current" and states[1] == ("previous", old_ca["fingerprint"])
    listed = client.get("/api/policies/ops-rotate/ca", headers=alice).text.strip().splitlines()
    assert len(listed) == 2 and listed[1] == old_ca["public_key"]  # current first
    new_key, new_cert = issue()
    assert new_cert["ca_fingerprint"] == states[0][1] != old_ca["fingerprint"]

    original = sshd.trusted_ca_file.read_text()
    try:
        sshd.trust(*(c.public_key for c in demo_policy.ca), *listed)
        assert _login(sshd, old_key, old_cert["certificate"], tmp_path, "old").stdout.strip() == "alice"
        assert _login(sshd, new_key, new_cert["certificate"], tmp_path, "new").stdout.strip() == "alice"
    finally:
        sshd.trusted_ca_file.write_text(original)

    # Retirement: once max_ttl has passed, the housekeeping sweep disables the old key.
    s = context.service
    early = Service(s.store, s.keys, s.base.config, clock=time.time)
    assert early.policies.retire_due_ca_keys(oidc.tenant_id("contoso")) == []
    later = Service(s.store, s.keys, s.base.config, clock=lambda: time.time() + 7200 + 120)
    assert old_ca["fingerprint"] in later.policies.retire_due_ca_keys(oidc.tenant_id("contoso"))
    with pytest.raises(CaKeyNotFound):
        s.keys.get_signer(old_ca["key_ref"])
    listed = client.get("/api/policies/ops-rotate/ca", headers=alice).text.strip().splitlines()
    assert listed == [rot.json()["ca"][0]["public_key"]]
    assert issue()[1]["ca_fingerprint"] == states[0][1]


def test_rotation_needs_an_admin(client, oidc, auth):
    assert create(client, auth, ops_doc(oidc, "ops-rot2")).status_code == 201
    r = client.post("/api/policies/ops-rot2/rotate-ca", headers=auth("alice"))
    assert r.status_code == 403
    stale = client.post("/api/policies/ops-rot2/rotate-ca", headers={**auth("carol"), "If-Match": 'W/"x"'})
    assert stale.status_code == 412


