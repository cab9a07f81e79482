"""Every state-changing endpoint, with a failure injected at each of its storage calls in turn.

For each endpoint the suite first counts the storage calls one healthy run makes (through the
proxy), then replays the endpoint once per call k and per kind of failure:
  - fail from k: call k and everything after it (the SDK's retries included) answer 503 unforwarded;
  - lose at k:   call k reaches Azurite and commits, its answer is lost, and everything after fails.
Afterwards storage is healed and what really landed is read straight from Azurite. The invariants:
  - the old state, or the new state with its audit entries: never a mix (each audit chain verifies
    against the head its row holds, and holds an entry for the change exactly when the row changed);
  - no certificate was answered without its record and audit;
  - nothing is burned: the same call, retried (with the same idempotency key), succeeds once storage
    is back, and gives the same certificate when one had been recorded.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Callable

import pytest

from ezssh.issue import attempt_key
from functions.core.audit import verify_chain
from functions.core.errors import NotFound
from tests.standins.faultproxy import fail_from, lose_at

from .conftest import Faulty

KINDS = {"fail": fail_from, "lose": lose_at}


def identity(oidc, user: str):  # type: ignore[no-untyped-def]
    from devstack.stack import identity_of

    return identity_of(oidc, user)


@pytest.fixture(scope="module")
def policies(faulty: Faulty, oidc) -> dict:
    users = oidc.group_id("contoso", "ezssh-users")
    approvers = oidc.group_id("contoso", "ezssh-approvers")
    carol = identity(oidc, "carol")
    pol = faulty.context.service.policies
    return {
        "auto": pol.create(carol, {"id": "f-auto", "rules": [{"groups": [users], "action": "auto"}],
                                   "hosts": ["fa-*"], "principals": ["alice"]}),
        "gated": pol.create(carol, {"id": "f-gated", "rules": [{"groups": [users], "action": "approval"}],
                                    "hosts": ["fg-*"], "principals": ["alice"],
                                    "approvers": {"groups": [approvers]}}),
    }


def chain_of(faulty: Faulty, tid: str, request_id: str) -> list:
    return [e for e in faulty.truth.list_audit(tid, request_id=request_id, limit=10_000) if e.chain == f"req:{request_id}"]


def policy_chain(faulty: Faulty, tid: str, policy_id: str) -> list:
    return [e for e in faulty.truth.list_audit(tid, limit=100_000) if e.chain == f"pol:{policy_id}"]


def request_by_host(faulty: Faulty, tid: str, host: str) -> list:
    return [r for r in faulty.truth.list_requests(tid) if r.host == host]


@dataclass
class Case:
    """One endpoint: `prepare` makes the state it starts from (storage healthy), `act` calls it,
    `check` asserts the invariants given the response (None when the call failed) and returns
    True if the change landed; `retry` repeats the call once storage is back."""

    prepare: Callable[[], dict]
    act: Callable[[dict], object]
    check: Callable[[dict, object], bool]
    already: tuple[int, ...] = (409, 412)  # how a retry says the change is already there


def cases(faulty: Faulty, oidc, auth, pub, policies) -> dict[str, Case]:
    tid = oidc.tenant_id("contoso")
    c = faulty.client

    def post(user: str, path: str, body: dict, **headers: str):  # type: ignore[no-untyped-def]
        return c.post(path, headers={**auth(user), **headers}, json=body)

    # ---- issuance, auto-approved --------------------------------------------------------------
    def issue_prepare(key: Callable[[], str] = lambda: uuid.uuid4().hex) -> dict:
        return {"host": f"fa-{uuid.uuid4().hex[:8]}", "key": key(), "pub": pub()}

    def issue_act(s: dict):  # type: ignore[no-untyped-def]
        return post("alice", "/api/requests", {"host": s["host"], "principal": "alice", "public_key": s["pub"],
                                               "policy": "f-auto"}, **{"Idempotency-Key": s["key"]})

    def issue_check(s: dict, r) -> bool:  # type: ignore[no-untyped-def]
        rows = request_by_host(faulty, tid, s["host"])
        assert len(rows) <= 1
        if r is not None and r.status_code == 201:
            assert rows, "a certificate was answered for a request that was not recorded"
        if not rows:
            return False
        rec = rows[0]
        assert rec.state == "issued" and rec.serial
        cert = faulty.truth.get_certificate(tid, rec.policy_id, rec.serial)  # the record exists
        chain = chain_of(faulty, tid, rec.id)
        assert verify_chain(chain, head=rec.audit_head)
        assert [e.action for e in chain] == ["request.created", "certificate.issued"]
        if r is not None and r.status_code == 201:
            assert r.json()["serial"] == str(rec.serial) and r.json()["certificate"] == cert.certificate
        s["serial"] = rec.serial
        return True

    # ---- a request that needs approval --------------------------------------------------------
    def pending_prepare(key: Callable[[], str] = lambda: uuid.uuid4().hex) -> dict:
        return {"host": f"fg-{uuid.uuid4().hex[:8]}", "key": key()}

    def pending_act(s: dict):  # type: ignore[no-untyped-def]
        return post("alice", "/api/requests", {"host": s["host"], "principal": "alice", "policy": "f-gated"},
                    **{"Idempotency-Key": s["key"]})

    def pending_check(s: dict, r) -> bool:  # type: ignore[no-untyped-def]
        rows = request_by_host(faulty, tid, s["host"])
        assert len(rows) <= 1
        if r is not None and r.status_code == 202:
            assert rows and rows[0].id == r.json()["id"]
        if not rows:
            return False
        chain = chain_of(faulty, tid, rows[0].id)
        assert rows[0].state == "pending" and verify_chain(chain, head=rows[0].audit_head)
        assert [e.action for e in chain] == ["request.created"]
        return True

    # ---- decisions on a pending request -------------------------------------------------------
    def decided_prepare() -> dict:
        s = pending_prepare()
        r = pending_act(s)
        assert r.status_code == 202, r.text
        s["id"] = r.json()["id"]
        return s

    def decide(user: str, action: str) -> Callable[[dict], object]:
        return lambda s: post(user, f"/api/requests/{s['id']}/{action}", {"comment": "fault test"})

    def decided_check(state: str, action: str) -> Callable[[dict, object], bool]:
        def check(s: dict, r) -> bool:  # type: ignore[no-untyped-def]
            rec = faulty.truth.get_request(tid, s["id"])
            chain = chain_of(faulty, tid, rec.id)
            assert verify_chain(chain, head=rec.audit_head), "the row and its audit chain disagree"
            actions = [e.action for e in chain]
            if r is not None and r.status_code == 200:
                assert rec.state == state
            if rec.state == "pending":
                assert actions == ["request.created"], actions
                return False
            assert rec.state == state and actions == ["request.created", f"request.{action}"], actions
            return True
        return check

    # ---- the certificate of an approved request -----------------------------------------------
    def approved_prepare() -> dict:
        s = decided_prepare()
        assert decide("bob", "approve")(s).status_code == 200  # type: ignore[attr-defined]
        s["pub"] = pub()
        return s

    def cert_act(s: dict):  # type: ignore[no-untyped-def]
        return post("alice", f"/api/requests/{s['id']}/certificate", {"public_key": s["pub"]})

    def cert_check(s: dict, r) -> bool:  # type: ignore[no-untyped-def]
        rec = faulty.truth.get_request(tid, s["id"])
        chain = chain_of(faulty, tid, rec.id)
        assert verify_chain(chain, head=rec.audit_head)
        if r is not None and r.status_code == 201:
            assert rec.state == "issued"
        if rec.state == "approved":
            assert rec.serial is None and "certificate.issued" not in [e.action for e in chain]
            return False
        assert rec.state == "issued" and rec.serial
        faulty.truth.get_certificate(tid, rec.policy_id, rec.serial)
        assert [e.action for e in chain][-1] == "certificate.issued"
        s["serial"] = rec.serial
        return True

    # ---- revocation ---------------------------------------------------------------------------
    def revoke_prepare() -> dict:
        s = issue_prepare()
        r = issue_act(s)
        assert r.status_code == 201, r.text  # type: ignore[attr-defined]
        s["serial"] = r.json()["serial"]  # type: ignore[attr-defined]
        return s

    def revoke_act(s: dict):  # type: ignore[no-untyped-def]
        return post("alice", f"/api/certificates/f-auto/{s['serial']}/revoke", {"reason": "fault test"})

    def revoke_check(s: dict, r) -> bool:  # type: ignore[no-untyped-def]
        cert = faulty.truth.get_certificate(tid, "f-auto", int(s["serial"]))
        entries = [e for e in faulty.truth.list_audit(tid, limit=100_000)
                   if e.action == "certificate.revoked" and e.serial == str(s["serial"])]
        if r is not None and r.status_code == 200:
            assert cert.revoked_at is not None
        assert (cert.revoked_at is not None) == bool(entries), "a revocation and its audit disagree"
        assert len(entries) <= 1
        return cert.revoked_at is not None

    # ---- policies -----------------------------------------------------------------------------
    def policy_prepare() -> dict:
        pid = f"fp-{uuid.uuid4().hex[:8]}"
        users = oidc.group_id("contoso", "ezssh-users")
        doc = {"id": pid, "rules": [{"groups": [users], "action": "auto"}], "hosts": [f"{pid}-*"],
               "principals": ["alice"]}
        return {"pid": pid, "doc": doc}

    def created_prepare() -> dict:
        s = policy_prepare()
        r = post("carol", "/api/policies", s["doc"])
        assert r.status_code == 201, r.text
        s["etag"] = r.json()["etag"]
        return s

    def policy_create_act(s: dict):  # type: ignore[no-untyped-def]
        return post("carol", "/api/policies", s["doc"])

    def policy_state(s: dict):  # type: ignore[no-untyped-def]
        try:
            p = faulty.truth.get_policy(tid, s["pid"])
        except NotFound:
            return None, []
        chain = policy_chain(faulty, tid, s["pid"])
        assert verify_chain(chain, head=p.audit_head), "the policy row and its audit chain disagree"
        return p, [e.action for e in chain]

    def policy_create_check(s: dict, r) -> bool:  # type: ignore[no-untyped-def]
        p, actions = policy_state(s)
        if r is not None and r.status_code == 201:
            assert p is not None
        if p is None:
            assert not policy_chain(faulty, tid, s["pid"])
            return False
        assert actions == ["policy.created"]
        return True

    def patch_act(s: dict):  # type: ignore[no-untyped-def]
        return c.patch(f"/api/policies/{s['pid']}", headers={**auth("carol"), "If-Match": s["etag"]},
                       json={"name": "changed under faults"})

    def changed_check(action: str, landed: Callable) -> Callable[[dict, object], bool]:  # type: ignore[type-arg]
        def check(s: dict, r) -> bool:  # type: ignore[no-untyped-def]
            p, actions = policy_state(s)
            assert p is not None
            if r is not None and r.status_code in (200, 204):
                assert landed(p)
            if not landed(p):
                assert actions == ["policy.created"], actions
                assert p.etag == s["etag"]
                return False
            assert actions == ["policy.created", action], actions
            return True
        return check

    def rotate_act(s: dict):  # type: ignore[no-untyped-def]
        return c.post(f"/api/policies/{s['pid']}/rotate-ca", headers={**auth("carol"), "If-Match": s["etag"]})

    def delete_act(s: dict):  # type: ignore[no-untyped-def]
        return c.delete(f"/api/policies/{s['pid']}", headers={**auth("carol"), "If-Match": s["etag"]})

    return {
        "issue": Case(issue_prepare, issue_act, issue_check),
        "request-pending": Case(pending_prepare, pending_act, pending_check),
        # the CLI's keys (UUIDv7) name their request: the request row alone is the write
        "issue-uuid7": Case(lambda: issue_prepare(attempt_key), issue_act, issue_check),
        "request-pending-uuid7": Case(lambda: pending_prepare(attempt_key), pending_act, pending_check),
        # a decision retried after its answer was lost gets the recorded outcome, not a 409
        "approve": Case(decided_prepare, decide("bob", "approve"), decided_check("approved", "approved"), already=()),
        "deny": Case(decided_prepare, decide("dave", "deny"), decided_check("denied", "denied"), already=()),
        "cancel": Case(decided_prepare, decide("alice", "cancel"), decided_check("cancelled", "cancelled"),
                       already=()),
        "certificate": Case(approved_prepare, cert_act, cert_check),
        "revoke": Case(revoke_prepare, revoke_act, revoke_check, already=()),
        "policy-create": Case(policy_prepare, policy_create_act, policy_create_check),
        "policy-update": Case(created_prepare, patch_act,
                              changed_check("policy.updated", lambda p: p.name == "changed under faults")),
        "policy-rotate": Case(created_prepare, rotate_act, changed_check("policy.ca_rotated", lambda p: len(p.ca) == 2)),
        "policy-delete": Case(created_prepare, delete_act, changed_check("policy.deleted", lambda p: p.deleted),
                              already=(404,)),
    }


@pytest.mark.parametrize("name", ["issue", "request-pending", "issue-uuid7", "request-pending-uuid7", "approve", "deny", "cancel", "certificate", "revoke",
                                  "policy-create", "policy-update", "policy-rotate", "policy-delete"])
def test_a_failure_at_each_storage_call_leaves_old_or_new_state_with_its_audit(
        name, faulty: Faulty, oidc, auth, pub, policies) -> None:
    case = cases(faulty, oidc, auth, pub, policies)[name]
    proxy = faulty.proxy

    # a healthy run: how many storage calls does this endpoint make?
    state = case.prepare()
    faulty.context.service.base.policies.changed(oidc.tenant_id("contoso"))  # count the policy read too
    proxy.heal()
    proxy.plan = lambda i, m, p: "pass"
    ok = case.act(state)
    assert ok.status_code in (200, 201, 202, 204), ok.text  # type: ignore[attr-defined]
    n = len(proxy.calls_since_plan())
    assert case.check(state, ok) and n >= 1

    outcomes = []
    for kind, plan in KINDS.items():
        for k in range(1, n + 1):
            proxy.heal()
            state = case.prepare()
            faulty.context.service.base.policies.changed(oidc.tenant_id("contoso"))
            proxy.plan = plan(k)
            r = case.act(state)
            proxy.heal()
            assert r.status_code != 500 and "Traceback" not in r.text, r.text  # type: ignore[attr-defined]
            answered = r if r.status_code < 300 else None  # type: ignore[attr-defined]
            landed = case.check(state, answered)
            outcomes.append((kind, k, r.status_code, landed))  # type: ignore[attr-defined]
            # nothing is burned: once storage is back, the same call (same idempotency key) succeeds,
            # or says clearly that the change is already there
            t = time.monotonic()
            again = case.act(state)
            assert time.monotonic() - t < 2, "recovery took longer than 2 s after storage came back"
            if landed:
                assert again.status_code in (200, 201, 202, 204) + case.already, again.text  # type: ignore[attr-defined]
            else:
                assert again.status_code in (200, 201, 202, 204), (kind, k, again.text)  # type: ignore[attr-defined]
            before = state.get("serial")
            assert case.check(state, again if again.status_code < 300 else None)  # type: ignore[attr-defined]
            if landed and before is not None:
                assert str(state.get("serial")) == str(before), "a retry issued a second certificate"
    # both outcomes were seen: failures that changed nothing, and lost answers whose change landed
    assert any(not o[3] for o in outcomes), outcomes
    if name not in ("revoke",):
        assert any(o[0] == "lose" and o[3] for o in outcomes), outcomes
