"""Decisions that commute, against a real API worker and Azurite: two approvers who approve the same
2-of-N request at the same moment both succeed (the second approval is merged on the ETag conflict,
server-side), and each approval is on record exactly once with its audit entry."""

from __future__ import annotations

import threading
import time
import uuid

import httpx

from devstack.stack import identity_of
from functions.core.audit import verify_chain
from functions.storage.tables import TableStore
from tests.faults.test_outages import _api

PAIRS = 100
LANES = 8  # pairs in flight at once: 16 clients


def test_100_simultaneous_approver_pairs_on_2_of_n_requests_all_succeed_once_each(
        tmp_path, api_env, azurite, oidc, auth) -> None:
    table = f"dec{uuid.uuid4().hex[:8]}"
    env = {**api_env, "EZSSH_TABLE_NAME": table, "EZSSH_REQUEST_RATE": "10000", "EZSSH_MAX_PENDING_REQUESTS": "100"}
    api, url = _api(tmp_path, env)
    tid = oidc.tenant_id("contoso")
    truth = TableStore.from_connection_string(azurite.connection_string, table)
    approvers = {u: identity_of(oidc, u).oid for u in ("bob", "dave")}
    try:
        with httpx.Client(base_url=url, timeout=60) as c:
            r = c.post("/api/policies", headers=auth("carol"), json={
                "id": "two", "rules": [{"groups": [oidc.group_id("contoso", "ezssh-users")], "action": "approval"}],
                "hosts": ["two-*"], "principals": ["alice"], "approvals_required": 2, "request_ttl": 600,
                "approvers": {"groups": [oidc.group_id("contoso", "ezssh-approvers")]}})
            assert r.status_code == 201, r.text
            ids = []
            for n in range(PAIRS):
                r = c.post("/api/requests", headers=auth("alice"),
                           json={"host": f"two-{n}", "principal": "alice", "policy": "two"})
                assert r.status_code == 202, r.text
                ids.append(r.json()["id"])

        answers: list[tuple[str, str, int, dict]] = []
        lock = threading.Lock()

        def approver(user: str, lane: int, barrier: threading.Barrier) -> None:
            with httpx.Client(base_url=url, timeout=60) as c:
                for rid in ids[lane::LANES]:
                    barrier.wait(30)  # the pair's two approvals leave together
                    r = c.post(f"/api/requests/{rid}/approve", headers=auth(user), json={"comment": user})
                    with lock:
                        answers.append((rid, user, r.status_code, r.json()))

        threads = []
        for lane in range(LANES):
            barrier = threading.Barrier(2)
            threads += [threading.Thread(target=approver, args=(u, lane, barrier)) for u in ("bob", "dave")]
        started = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        took = time.monotonic() - started
        assert len(answers) == 2 * PAIRS
        errors = [(rid, user, code, body.get("message")) for rid, user, code, body in answers if code != 200]
        assert not errors, f"{len(errors)} of {2 * PAIRS} approvals failed, e.g. {errors[:3]}"
        print(f"\n{PAIRS} approver pairs, {LANES} at once: {2 * PAIRS} approvals answered 200 in {took:.1f} s")
        # per request: one answer says pending (the first approval), the other approved (both)
        for rid in ids:
            states = sorted(body["status"] for r_id, _, _, body in answers if r_id == rid)
            assert states == ["approved", "pending"], (rid, states)

        for rid in ids:
            rec = truth.get_request(tid, rid)
            assert rec.state == "approved"
            assert sorted(a.oid for a in rec.approvals) == sorted(approvers.values()), rid
            assert {a.oid: a.comment for a in rec.approvals} == {oid: u for u, oid in approvers.items()}
            chain = [e for e in truth.list_audit(tid, request_id=rid, limit=100) if e.chain == f"req:{rid}"]
            assert verify_chain(chain, head=rec.audit_head)
            assert sorted(e.action for e in chain) == ["request.approved", "request.approved", "request.created"]
            assert sorted(e.actor_oid for e in chain if e.action == "request.approved") == sorted(approvers.values())
    finally:
        api.stop()

