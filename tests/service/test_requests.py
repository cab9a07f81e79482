"""Requests after they are made: approve (N of M), deny, cancel, expire; who may do what; each step's
audit entry linked into the request's chain, which ends at the head the request row holds."""

from __future__ import annotations

from dataclasses import replace

import pytest

from functions.core.audit import GENESIS, verify_chain
from functions.core.errors import Conflict, Denied, Forbidden, NotFound
from functions.core.evaluation import AccessRequest

from .helpers import ALICE, BOB, CAROL, DAVE, ERIN, PAT, T0, USERS


@pytest.fixture
def pending(service, make_policy, clock):
    """Ask for access under a policy that needs `n` approvals; returns the request id."""

    def ask(n: int = 1, requester=ALICE) -> str:
        if not any(p.id == f"gated{n}" for p in service.store.list_policies(requester.tid)):
            make_policy(f"gated{n}", "approval", approvals_required=n, request_ttl=600)
        out = service.issuance.request_access(requester, AccessRequest(
            host="web1", principal=requester.upn.split("@")[0], policy_id=f"gated{n}", ttl_seconds=1800), None)
        assert out.status == "pending"
        clock.advance(1)
        return out.request.id

    return ask


def chain(store, rid: str) -> list:
    return [e for e in store.list_audit(ALICE.tid, request_id=rid) if e.chain == f"req:{rid}"]


def assert_chain(store, rid: str, *actions: str) -> None:
    entries = chain(store, rid)
    assert [e.action for e in entries] == list(actions)
    assert entries[0].prev_hash == GENESIS
    assert verify_chain(entries, head=store.get_request(ALICE.tid, rid).audit_head)


def test_approve_then_issue(service, store, pending, clock, user_key):
    rid = pending()
    rec = service.requests.approve(BOB, rid, "go")
    assert rec.state == "approved" and rec.decided_by == BOB.upn and rec.expires_at == int(T0) + 1 + 15 * 60
    assert [(a.oid, a.comment) for a in rec.approvals] == [(BOB.oid, "go")]
    clock.advance(1)
    out = service.issuance.issue_for_request(ALICE, rid, user_key())
    assert out.certificate.valid_before - out.certificate.valid_after == 1800 + 60  # the TTL approved
    assert_chain(store, rid, "request.created", "request.approved", "certificate.issued")


def test_two_of_m_needs_two_different_approvers(service, store, pending, clock):
    rid = pending(n=2)
    first = service.requests.approve(BOB, rid)
    assert first.state == "pending" and len(first.approvals) == 1
    clock.advance(1)
    again = service.requests.approve(BOB, rid)  # an approver counts once: a retry gets the record
    assert again == first and again.etag == first.etag
    clock.advance(1)
    second = service.requests.approve(DAVE, rid)
    assert second.state == "approved" and [a.upn for a in second.approvals] == [BOB.upn, DAVE.upn]
    assert_chain(store, rid, "request.created", "request.approved", "request.approved")
    assert "request.approve.refused" not in [e.action for e in store.list_audit(ALICE.tid, request_id=rid)]


def test_nobody_approves_their_own_request(service, store, pending):
    rid = pending(requester=BOB)  # bob is an approver of the policy, but not for himself
    with pytest.raises(Forbidden):
        service.requests.approve(BOB, rid)
    rec = store.get_request(ALICE.tid, rid)
    assert rec.state == "pending" and rec.approvals == ()
    refused = [e for e in store.list_audit(ALICE.tid, request_id=rid) if e.action == "request.approve.refused"]
    assert len(refused) == 1 and refused[0].actor_oid == BOB.oid and refused[0].error_code == "forbidden"


@pytest.mark.parametrize("who,error", [(PAT, Forbidden), (CAROL, Forbidden), (ERIN, NotFound)])
def test_only_the_policys_approvers_approve(service, store, pending, who, error):
    # pat administers the policy and carol the tenant (both see the request), neither approves it;
    # erin is in another tenant and does not even see it
    rid = pending()
    with pytest.raises(error):
        service.requests.approve(who, rid)
    assert store.get_request(ALICE.tid, rid).state == "pending"


def test_deny_is_final(service, store, pending, clock, user_key):
    rid = pending()
    rec = service.requests.deny(DAVE, rid, "not now")
    assert rec.state == "denied" and rec.comment == "not now" and rec.decided_by == DAVE.upn
    clock.advance(1)
    with pytest.raises(Conflict):
        service.requests.approve(BOB, rid)
    with pytest.raises(Conflict):
        service.issuance.issue_for_request(ALICE, rid, user_key())
    assert_chain(store, rid, "request.created", "request.denied")


def test_the_requester_cancels_and_nobody_else(service, store, pending, clock):
    rid = pending()
    with pytest.raises(Forbidden):
        service.requests.cancel(BOB, rid)
    clock.advance(1)
    rec = service.requests.cancel(ALICE, rid, "done already")
    assert rec.state == "cancelled"
    assert_chain(store, rid, "request.created", "request.cancelled")


def test_expiry_on_read_and_by_the_sweep(service, store, pending, clock):
    rid = pending()  # request_ttl 600
    clock.advance(598)
    assert service.requests.expire(ALICE.tid) == []  # not yet
    clock.advance(2)
    assert service.requests.get(ALICE, rid).effective_state(int(clock())) == "expired"
    with pytest.raises(Conflict):
        service.requests.approve(BOB, rid)
    assert service.requests.expire(ALICE.tid) == [rid]
    assert service.requests.expire(ALICE.tid) == []  # once
    rec = store.get_request(ALICE.tid, rid)
    assert rec.state == "expired" and rec.decided_at == int(clock())
    assert_chain(store, rid, "request.created", "request.expired")


def test_an_approved_request_expires_when_nobody_fetches_the_certificate(service, store, pending, clock, user_key):
    rid = pending()
    service.requests.approve(BOB, rid)
    clock.advance(15 * 60)
    with pytest.raises(Conflict):
        service.issuance.issue_for_request(ALICE, rid, user_key())
    assert service.requests.expire(ALICE.tid) == [rid]
    assert_chain(store, rid, "request.created", "request.approved", "request.expired")


def test_listing_by_role_and_state(service, pending):
    mine, bobs = pending(), pending(requester=BOB)
    service.requests.deny(DAVE, mine)
    ids = lambda who, **kw: [r.id for r in service.requests.list(who, **kw).requests]  # noqa: E731
    assert ids(ALICE) == [mine]  # her own only
    assert ids(BOB, role="approver", state="pending") == []  # his own is not his to approve
    assert ids(DAVE, role="approver", state="pending") == [bobs]
    assert ids(PAT) == [bobs]  # the policy's admin sees its open requests (decided ones: the audit)
    assert ids(ALICE, state="denied") == [mine]
    assert ids(ERIN) == []


def _approved(service, make_policy, clock, pid: str, **kw) -> str:
    """A request of alice's under an approval policy whose logins come from `principals` (every
    member), approved by bob."""
    make_policy(pid, "approval", request_ttl=600, **kw)
    out = service.issuance.request_access(ALICE, AccessRequest(host="web1", principal="deploy", policy_id=pid), None)
    clock.advance(1)
    service.requests.approve(BOB, out.request.id, "ok")
    return out.request.id


def test_a_deny_rule_added_after_the_approval_stops_the_certificate(service, store, make_policy, clock, user_key):
    rid = _approved(service, make_policy, clock, "gated-deny")
    p = store.get_policy(CAROL.tid, "gated-deny")
    service.policies.update(CAROL, "gated-deny", {"rules": [{"users": [ALICE.oid], "action": "deny"},
                                                            {"groups": [USERS], "action": "approval"}]}, p.etag)
    with pytest.raises(Denied) as err:
        service.issuance.issue_for_request(ALICE, rid, user_key())
    assert "approved, but the policy no longer allows it" in err.value.message
    assert store.get_request(ALICE.tid, rid).serial is None  # nothing issued
    refused = [e for e in store.list_audit(ALICE.tid, request_id=rid) if e.action == "certificate.refused"]
    assert refused and refused[-1].error_code == "denied"


def test_a_group_removal_after_the_approval_stops_the_certificate(service, store, make_policy, clock, user_key):
    rid = _approved(service, make_policy, clock, "gated-group",
                    rules=[{"groups": [USERS], "action": "approval"}])
    alice_now = replace(ALICE, groups=frozenset())  # her token no longer names the group
    with pytest.raises(Denied):
        service.issuance.issue_for_request(alice_now, rid, user_key())
    assert store.get_request(ALICE.tid, rid).serial is None
    # still in the group: the approval stands
    assert service.issuance.issue_for_request(ALICE, rid, user_key()).status == "issued"
