"""The audit log over the API and the CLI: an operator starts from sshd's log line (key id and
serial) and finds the request, the decision and the certificate; only admins read it, and only
their own tenant's (and, for policy admins, their policies')."""

from __future__ import annotations

import json

import pytest
from azure.data.tables import UpdateMode

from devstack.demo import cli_env, run_cli


@pytest.fixture(scope="module")
def issued(client, auth, pub) -> dict:
    r = client.post("/api/requests", headers=auth("alice"),
                    json={"host": "127.0.0.1", "principal": "alice", "public_key": pub(), "reason": "audit me"})
    assert r.status_code == 201, r.text
    return r.json()


def test_from_the_sshd_log_line_to_the_request(client, issued, auth):
    r = client.get("/api/audit", headers=auth("carol"),
                   params={"key_id": issued["key_id"], "serial": issued["serial"]})
    assert r.status_code == 200, r.text
    entries = r.json()["entries"]
    assert [e["action"] for e in entries] == ["certificate.issued"]
    assert entries[0]["intact"] and entries[0]["request_id"] == issued["id"]
    story = client.get("/api/audit", headers=auth("carol"),
                       params={"request_id": issued["id"]}).json()["entries"]
    assert [e["action"] for e in story] == ["request.created", "certificate.issued"]
    assert story[0]["details"]["reason"] == "audit me" and story[1]["prev_hash"] == story[0]["hash"]


def test_a_deleted_audit_entry_breaks_the_chain(client, context, oidc, auth, pub):
    r = client.post("/api/requests", headers=auth("alice"),
                    json={"host": "127.0.0.1", "principal": "alice", "public_key": pub()})
    rid = r.json()["id"]
    carol = auth("carol")
    assert client.get("/api/audit", headers=carol, params={"request_id": rid}).json()["chain_intact"] is True
    tid = oidc.tenant_id("contoso")
    table = context.service.store._table  # someone with storage access removes the issuance entry,
    row = table.get_entity(tid, f"req|{rid}")  # which an auto-approved request carries in its own row
    assert json.loads(row["Audit1"])["action"] == "certificate.issued"
    table.update_entity({k: v for k, v in row.items() if k != "Audit1"}, mode=UpdateMode.REPLACE)
    body = client.get("/api/audit", headers=carol, params={"request_id": rid}).json()
    assert body["chain_intact"] is False and [e["action"] for e in body["entries"]] == ["request.created"]


def test_only_admins_read_it_and_only_their_own(client, issued, oidc, auth):
    assert client.get("/api/audit", headers=auth("alice")).status_code == 403
    mallory = client.get("/api/audit", headers=auth("mallory"), params={"key_id": issued["key_id"]})
    assert mallory.status_code == 200 and mallory.json()["entries"] == []  # another tenant sees nothing of it
    assert client.get("/api/audit", headers=auth("carol"), params={"serial": "12x"}).status_code == 400
    assert client.get("/api/audit").status_code == 401


def test_the_cli_shows_the_audit(tmp_path_factory, api_server, oidc, issued):
    env = cli_env(tmp_path_factory.mktemp("carol-audit"))
    assert run_cli(["configure", "--server", api_server, "--ca-bundle", str(oidc.ca_path)], env).returncode == 0
    assert run_cli(["login"], env, username="carol", ca_path=oidc.ca_path).returncode == 0
    r = run_cli(["audit", "--serial", issued["serial"], "--json"], env)
    assert r.returncode == 0, r.stderr
    assert [e["key_id"] for e in json.loads(r.stdout)] == [issued["key_id"]]
    text = run_cli(["audit", "--request", issued["id"]], env)
    assert text.returncode == 0 and "certificate.issued" in text.stdout and "request.created" in text.stdout
    one = run_cli(["audit", "--request", issued["id"], "--limit", "1", "--json"], env)
    assert one.returncode == 0 and len(json.loads(one.stdout)) == 1 and "--all" in one.stderr
    every = run_cli(["audit", "--request", issued["id"], "--limit", "1", "--all", "--json"], env)
    assert [e["action"] for e in json.loads(every.stdout)] == ["request.created", "certificate.issued"]
    alice = cli_env(tmp_path_factory.mktemp("alice-audit"))
    assert run_cli(["configure", "--server", api_server, "--ca-bundle", str(oidc.ca_path)], alice).returncode == 0
    assert run_cli(["login"], alice, username="alice", ca_path=oidc.ca_path).returncode == 0
    assert run_cli(["audit"], alice).returncode == 4


def test_pages_follow_next_oldest_first_and_one_user_reads_apart(client, auth, oidc, pub):
    """`limit` + `next` walk the whole window, each entry once, oldest first; `?user=` is what one
    person did (by object id), across the requests of everyone else."""
    from devstack.stack import identity_of

    carol, alice = auth("carol"), auth("alice")
    made = [client.post("/api/requests", headers=alice, json={"host": "127.0.0.1", "principal": "alice",
                                                              "public_key": pub()}).json()["id"] for _ in range(3)]
    whole = client.get("/api/audit", headers=carol, params={"limit": 1000}).json()
    assert "next" not in whole and {e["request_id"] for e in whole["entries"]} >= set(made)
    seen, token, pages = [], None, 0
    while True:
        params = {"limit": 2, **({"continuation": token} if token else {})}
        body = client.get("/api/audit", headers=carol, params=params).json()
        assert len(body["entries"]) <= 2
        seen += body["entries"]
        pages += 1
        token = body.get("next")
        if not token:
            break
    assert [e["entry_id"] for e in seen] == [e["entry_id"] for e in whole["entries"]] and pages >= len(seen) // 2
    oid = identity_of(oidc, "alice").oid
    mine = client.get("/api/audit", headers=carol, params={"user": oid, "limit": 1000}).json()["entries"]
    assert mine == [e for e in whole["entries"] if e["actor_oid"] == oid] and \
        {e["request_id"] for e in mine} >= set(made)
    shouted = client.get("/api/audit", headers=carol, params={"user": oid.upper(), "limit": 1000}).json()["entries"]
    assert shouted == mine  # an object id is a GUID, whatever its case
    assert client.get("/api/audit", headers=carol, params={"user": "alice@contoso.test"}).status_code == 400


def test_a_forged_continuation_is_a_clear_400(client, auth):
    for token in ("x" * 2000, "not-a-token", "eyJhZnRlciI6MX0"):
        r = client.get("/api/audit", headers=auth("carol"), params={"continuation": token})
        assert r.status_code == 400 and r.json()["error"] == "invalid_request", (token, r.text)


def test_a_refused_read_of_the_audit_is_audited(client, auth, oidc):
    """A member's GET /api/audit (403) is on record, under the caller, with the code it got."""
    from devstack.stack import identity_of

    alice = identity_of(oidc, "alice")
    assert client.get("/api/audit", headers=auth("alice")).status_code == 403
    body = client.get("/api/audit", headers=auth("carol"), params={"user": alice.oid, "limit": 1000}).json()
    refused = [e for e in body["entries"] if e["action"] == "audit.refused"]
    assert refused and refused[-1]["outcome"] == "refused" and refused[-1]["error_code"] == "forbidden"
