"""Retries: an attempt retried with the same idempotency key gets the first answer (the same
certificate, or the same pending request) and never makes a second request or certificate; a
certificate fetch retried with the same public key gets the certificate already issued."""

from __future__ import annotations

import threading

import pytest

from functions.core.errors import Conflict, Forbidden, InvalidRequest
from functions.core.evaluation import AccessRequest

from .helpers import ALICE, BOB, CAROL


def ask(host: str = "web1", principal: str = "alice", **kw) -> AccessRequest:
    return AccessRequest(host=host, principal=principal, **kw)


def test_a_retried_issuance_gets_the_same_certificate(service, store, make_policy, user_key, clock):
    make_policy("web")
    key = user_key()
    first = service.issuance.request_access(ALICE, ask(), key, idempotency_key="attempt-0001")
    clock.advance(5)
    again = service.issuance.request_access(ALICE, ask(), key, idempotency_key="attempt-0001")
    assert again.status == "issued" and again.request.id == first.request.id
    assert again.certificate.openssh == first.certificate.openssh and again.certificate.serial == first.certificate.serial
    assert [r.id for r in store.list_requests(ALICE.tid)] == [first.request.id]
    assert [e.action for e in store.list_audit(ALICE.tid, request_id=first.request.id)] == \
        ["request.created", "certificate.issued"]
    other = service.issuance.request_access(ALICE, ask(), key, idempotency_key="attempt-0002")  # a new attempt
    assert other.certificate.serial != first.certificate.serial and len(store.list_requests(ALICE.tid)) == 2


def test_a_retried_pending_request_is_the_same_request(service, store, make_policy, clock):
    make_policy("gated", "approval")
    first = service.issuance.request_access(ALICE, ask(), None, idempotency_key="attempt-pending")
    clock.advance(1)
    again = service.issuance.request_access(ALICE, ask(), None, idempotency_key="attempt-pending")
    assert (again.status, again.request.id, again.approvers_needed) == ("pending", first.request.id, 1)
    assert again.approvers == first.approvers
    service.requests.approve(BOB, first.request.id)
    later = service.issuance.request_access(ALICE, ask(), None, idempotency_key="attempt-pending")
    assert (later.status, later.request.id) == ("approved", first.request.id)
    assert len(store.list_requests(ALICE.tid)) == 1


def test_the_same_key_for_another_request_is_refused(service, store, make_policy, user_key):
    make_policy("web")
    key = user_key()
    service.issuance.request_access(ALICE, ask(), key, idempotency_key="attempt-0003")
    for changed in (dict(req=ask(host="web2"), key=key), dict(req=ask(ttl_seconds=600), key=key),
                    dict(req=ask(), key=user_key())):
        with pytest.raises(Conflict):
            service.issuance.request_access(ALICE, changed["req"], changed["key"], idempotency_key="attempt-0003")
    assert len(store.list_requests(ALICE.tid)) == 1
    # keys are per user: bob's attempt with the same key is his own
    bobs = service.issuance.request_access(BOB, ask(principal="bob"), key, idempotency_key="attempt-0003")
    assert bobs.status == "issued" and bobs.request.requester_oid == BOB.oid


@pytest.mark.parametrize("bad", ["short", "has space in it", "x" * 129, "nön-ascii-key"])
def test_a_malformed_key_is_refused_and_audited(service, store, make_policy, user_key, bad):
    make_policy("web")
    with pytest.raises(InvalidRequest):
        service.issuance.request_access(ALICE, ask(), user_key(), idempotency_key=bad)
    assert store.list_requests(ALICE.tid) == []
    assert [e.error_code for e in store.list_audit(ALICE.tid) if e.action == "request.refused"] == ["invalid_request"]


def test_concurrent_retries_make_one_certificate(service, store, make_policy, user_key):
    make_policy("web")
    key, answers, errors = user_key(), [], []
    barrier = threading.Barrier(6)

    def attempt() -> None:
        barrier.wait()
        try:
            answers.append(service.issuance.request_access(ALICE, ask(), key, idempotency_key="attempt-race"))
        except Exception as exc:  # noqa: BLE001 - what the race produced is what the test checks
            errors.append(exc)

    threads = [threading.Thread(target=attempt) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == [] and len(answers) == 6
    assert len({a.certificate.serial for a in answers}) == 1 and len({a.request.id for a in answers}) == 1
    (rec,) = store.list_requests(ALICE.tid)
    assert rec.serial == answers[0].certificate.serial
    issued = [e for e in store.list_audit(ALICE.tid) if e.action == "certificate.issued"]
    assert len(issued) == 1


def test_a_retried_certificate_fetch_gets_the_certificate_already_issued(service, store, make_policy, user_key, clock):
    make_policy("gated", "approval")
    rid = service.issuance.request_access(ALICE, ask(), None).request.id
    service.requests.approve(BOB, rid)
    key = user_key()
    clock.advance(1)
    first = service.issuance.issue_for_request(ALICE, rid, key)
    clock.advance(1)
    again = service.issuance.issue_for_request(ALICE, rid, key)
    assert again.certificate.openssh == first.certificate.openssh
    with pytest.raises(Conflict):  # another key is another certificate: one request, one certificate
        service.issuance.issue_for_request(ALICE, rid, user_key())
    with pytest.raises(Forbidden):  # and nobody else gets it
        service.issuance.issue_for_request(CAROL, rid, key)
    assert [e.action for e in store.list_audit(ALICE.tid, request_id=rid)].count("certificate.issued") == 1
