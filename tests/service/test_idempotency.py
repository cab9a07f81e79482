"""Retries: an attempt retried with the same idempotency key gets the first answer (the same
certificate, or the same pending request) and never makes a second request or certificate; a
certificate fetch retried with the same public key gets the certificate already issued."""

from __future__ import annotations

import hashlib
import secrets
import threading
import uuid
from dataclasses import replace

import pytest

from functions.core.serials import keyed_request_id
from functions.core.audit import AuditEntry
from functions.core.errors import Conflict, Forbidden, IdempotencyKeyAhead, InvalidRequest
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


# ---- keys that name their request (UUIDv7, what the CLI sends) --------------------------------------
# RFC 9562: 48 bits of Unix milliseconds, version 7, 12 random bits, variant 0b10, 62 random bits. Such
# a key names its request's id (the key's time, then 21 hashed bits), so the request row is the one
# write and a retry's write finds it.


def uuid7(at: float) -> str:
    ms = int(at * 1000)
    return str(uuid.UUID(int=(ms << 80) | (0x7 << 76) | (secrets.randbits(12) << 64) | (0b10 << 62)
                         | secrets.randbits(62)))


def test_a_uuid7_key_names_its_request_and_rides_on_its_row(service, store, make_policy, user_key, clock):
    make_policy("web")
    key, k = user_key(), uuid7(clock.now)
    first = service.issuance.request_access(ALICE, ask(), key, idempotency_key=k)
    # the request id is the key's time (ms, high bits), and the key is on that row, not in one of its own
    assert int(first.request.id, 16) >> 21 == uuid.UUID(k).int >> 80
    digest = hashlib.sha256(k.encode()).hexdigest()
    assert store.get_idempotency(ALICE.tid, ALICE.oid, digest) is None
    assert store.get_idempotency(ALICE.tid, ALICE.oid, digest, first.request.id).on_request_row
    clock.advance(20)
    again = service.issuance.request_access(ALICE, ask(), key, idempotency_key=k)
    assert (again.request.id, again.certificate.openssh) == (first.request.id, first.certificate.openssh)
    with pytest.raises(Conflict):  # the same key for another request
        service.issuance.request_access(ALICE, ask(host="web2"), key, idempotency_key=k)
    # per user: bob's attempt with the same key is his own request
    bobs = service.issuance.request_access(BOB, ask(principal="bob"), key, idempotency_key=k)
    assert bobs.request.id != first.request.id and bobs.request.requester_oid == BOB.oid
    assert sorted(r.id for r in store.list_requests(ALICE.tid)) == sorted([first.request.id, bobs.request.id])


def test_a_late_retry_of_a_uuid7_key_still_gets_the_first_answer(service, store, make_policy, user_key, clock):
    make_policy("web")
    key, k = user_key(), uuid7(clock.now)
    first = service.issuance.request_access(ALICE, ask(), key, idempotency_key=k)
    clock.advance(3600)  # far past the window: the key is looked up on the row it names
    again = service.issuance.request_access(ALICE, ask(), key, idempotency_key=k)
    assert (again.status, again.certificate.serial) == ("issued", first.certificate.serial)
    assert len(store.list_requests(ALICE.tid)) == 1


def test_a_uuid7_key_from_a_clock_behind_gets_a_row_of_its_own(service, store, make_policy, user_key, clock):
    make_policy("web")
    key, k = user_key(), uuid7(clock.now - 3600)
    first = service.issuance.request_access(ALICE, ask(), key, idempotency_key=k)
    # the request's id is the service's time, not the key's hour-old one
    assert abs((int(first.request.id, 16) >> 21) - int(clock.now * 1000)) < 1000
    assert store.get_idempotency(ALICE.tid, ALICE.oid, hashlib.sha256(k.encode()).hexdigest()).request_id == \
        first.request.id
    clock.advance(10)
    again = service.issuance.request_access(ALICE, ask(), key, idempotency_key=k)
    assert again.certificate.serial == first.certificate.serial and len(store.list_requests(ALICE.tid)) == 1


def test_a_uuid7_key_from_the_future_is_refused_and_writes_nothing(service, store, make_policy, user_key, clock):
    make_policy("web")
    with pytest.raises(IdempotencyKeyAhead):
        service.issuance.request_access(ALICE, ask(), user_key(), idempotency_key=uuid7(clock.now + 120))
    assert store.list_requests(ALICE.tid) == []
    assert [e.error_code for e in store.list_audit(ALICE.tid) if e.action == "request.refused"] == \
        ["idempotency_key_ahead"]
    # a little ahead (clocks differ by seconds) is fine
    ok = service.issuance.request_access(ALICE, ask(), user_key(), idempotency_key=uuid7(clock.now + 20))
    assert ok.status == "issued"


def test_a_uuid7_key_whose_row_is_taken_by_another_falls_back_to_a_row_of_its_own(service, store, make_policy,
                                                                                   user_key, clock):
    """Two keys may name one id (21 hashed bits in one millisecond): the second keeps its key apart."""
    make_policy("web")
    k = uuid7(clock.now)
    named = keyed_request_id(uuid.UUID(k).int >> 80, ALICE.tid, ALICE.oid, k)
    bob_first = service.issuance.request_access(BOB, ask(principal="bob"), user_key(), idempotency_key=uuid7(clock.now))
    taken = replace(bob_first.request, id=named, serial=None, key_id=None, state="pending")
    store.create_request(taken, AuditEntry(tenant_id=BOB.tid, at=clock.now, action="test.taken", outcome="ok").sealed())
    key = user_key()
    first = service.issuance.request_access(ALICE, ask(), key, idempotency_key=k)
    assert first.status == "issued" and first.request.id != named and first.request.requester_oid == ALICE.oid
    again = service.issuance.request_access(ALICE, ask(), key, idempotency_key=k)
    assert again.certificate.serial == first.certificate.serial
    assert store.get_request(ALICE.tid, named).requester_oid == BOB.oid


@pytest.mark.parametrize("kind", ["uuid7", "other"])
def test_concurrent_retries_of_either_kind_make_one_certificate(service, store, make_policy, user_key, clock, kind):
    make_policy("web")
    key, answers, errors = user_key(), [], []
    k = uuid7(clock.now) if kind == "uuid7" else "attempt-race-" + kind
    barrier = threading.Barrier(6)

    def attempt() -> None:
        barrier.wait()
        try:
            answers.append(service.issuance.request_access(ALICE, ask(), key, idempotency_key=k))
        except Exception as exc:  # noqa: BLE001 - what the race produced is what the test checks
            errors.append(exc)

    threads = [threading.Thread(target=attempt) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == [] and len(answers) == 6
    assert len({a.certificate.serial for a in answers}) == 1
    (rec,) = store.list_requests(ALICE.tid)
    assert rec.serial == answers[0].certificate.serial
    assert [e.action for e in store.list_audit(ALICE.tid)].count("certificate.issued") == 1
