"""Contract test for the Store (functions/storage/base.py): the same cases on every backend.

Backends: `tables` (TableStore over the real azure-data-tables SDK against Azurite) and `memory` (the
in-memory store in tests/memstore.py that fast service tests use). What a case expects comes from the
protocol's documented semantics: every state change is conditional on the ETag it was read with (a
stale one is PreconditionFailed for policies, Conflict for requests and certificates; a missing row is
NotFound), every write gives the row a new ETag that the returned object carries, an issuance lands
whole or not at all, and nothing crosses tenants. The memory store must match Table Storage case for
case, so a fast service test means what the same test would mean on Azurite.

Each test works in a fresh tenant, so the Azurite table is shared without interference.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from dataclasses import replace

import pytest

from functions.core.requests import Approval, RequestRecord
from functions.core.serials import new_request_id, request_id_of_serial, serial_of_request_id
from functions.core.audit import AuditEntry, verify_chain
from functions.core.errors import Conflict, NotFound, PreconditionFailed
from functions.core.policy import CaKeyRef, Policy, Rule, Subjects
from functions.storage.base import AuditPage, AuditQuery, Store
from functions.core.records import CertificateRecord, HostChallenge, HostEnrolmentToken, HostKeyRecord, HostNamespaces, IdempotencyRecord
from tests.memstore import MemoryStore

BACKENDS = ["tables", "memory"]
T0 = 1_780_000_000.0  # a fixed instant; entries are placed relative to it


@pytest.fixture(scope="module")
def table_store(azurite) -> Store:
    from functions.storage.tables import TableStore

    store = TableStore.from_connection_string(azurite.connection_string, f"contract{uuid.uuid4().hex[:12]}")
    store.ensure_table()
    return store


@pytest.fixture(params=BACKENDS)
def store(request) -> Store:
    if request.param == "tables":
        return request.getfixturevalue("table_store")
    return MemoryStore()


@pytest.fixture
def tid() -> str:
    return str(uuid.uuid4())


# ---- builders -----------------------------------------------------------------------------------


def a_policy(tid: str, pid: str = "web", **kw) -> Policy:
    fields = dict(
        id=pid, tenant_id=tid, name=f"Policy {pid}",
        rules=(Rule(Subjects(users=("*",)), "auto"), Rule(Subjects(groups=("0b7a0000-0000-4000-8000-00000000000a",)), "approval")),
        hosts=("*.example.com", "10.0.0.0/8"), principals=("alice", "{username}"),
        approvers=Subjects(users=("0b7a0000-0000-4000-8000-00000000000b",)), approvals_required=2, admins=Subjects(groups=("0b7a0000-0000-4000-8000-00000000000c",)),
        ca=(CaKeyRef("pkcs11:ca-1", "pkcs11", "ecdsa-sha2-nistp256 AAAA ca-1", "SHA256:abc", "current", 1700),),
        audit_head="a" * 64,
    )
    fields.update(kw)
    return Policy(**fields)


def an_entry(tid: str | None, at: float, action: str = "test.event", **kw) -> AuditEntry:
    return AuditEntry(tenant_id=tid, at=at, action=action, outcome="ok", **kw).sealed()  # type: ignore[arg-type]


def a_request(tid: str, rid: str | None = None, state: str = "pending", **kw) -> RequestRecord:
    """A request whose id is its serial in hex (core.serials): the given serial's, or a new one."""
    if rid is None:
        rid = request_id_of_serial(kw["serial"]) if kw.get("serial") is not None else new_request_id(T0)
    fields = dict(
        id=rid, tenant_id=tid, policy_id="web", requester_oid="oid-alice",
        requester_upn="alice@example.com", host="web1.example.com", principal="alice", ttl_seconds=3600,
        state=state, created_at=int(T0), expires_at=int(T0) + 3600, approvals_required=1, reason="deploy",
        audit_head="b" * 64,
    )
    fields.update(kw)
    return RequestRecord(**fields)


def a_cert(rec: RequestRecord, serial: int, policy_id: str | None = None, **kw) -> CertificateRecord:
    fields = dict(
        tenant_id=rec.tenant_id, policy_id=policy_id or rec.policy_id, serial=serial,
        key_id=f"ezssh/{rec.policy_id}/{rec.id}/{rec.requester_upn}", request_id=rec.id,
        requester_oid=rec.requester_oid, requester_upn=rec.requester_upn, principals=(rec.principal,),
        host=rec.host, valid_after=int(T0) - 60, valid_before=int(T0) + 3600, ca_fingerprint="SHA256:abc",
        public_key_fingerprint="SHA256:user", certificate="ssh-ed25519-cert-v01@openssh.com AAAA",
    )
    fields.update(kw)
    return CertificateRecord(**fields)


def audit_of(store: Store, tid: str, **kw) -> list[AuditEntry]:
    return store.list_audit(tid, **kw)


def race(n: int, fn: Callable[[int], object]) -> list[object]:
    """Run fn(0..n-1) in n threads released together; each result is its return value or exception."""
    results: list[object] = [None] * n
    barrier = threading.Barrier(n)

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = fn(i)
        except Exception as exc:  # noqa: BLE001 - the race outcome is what the test checks
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return results


# ---- health -------------------------------------------------------------------------------------


def test_health(store: Store) -> None:
    assert store.health() is None


# ---- policies -----------------------------------------------------------------------------------


def test_policy_round_trip_carries_etag_and_audit(store: Store, tid: str) -> None:
    p = a_policy(tid)
    entry = an_entry(tid, T0, "policy.created", policy_id="web", chain="pol:web")
    created = store.create_policy(p, entry)
    assert created == p and created.etag
    got = store.get_policy(tid, "web")
    assert got == p
    assert got.to_dict() == p.to_dict()
    assert got.audit_head == "a" * 64  # not part of equality: checked on its own
    assert got.etag == created.etag
    assert audit_of(store, tid) == [entry]


def test_create_policy_twice_is_conflict_and_keeps_the_first(store: Store, tid: str) -> None:
    first = store.create_policy(a_policy(tid), an_entry(tid, T0))
    with pytest.raises(Conflict):
        store.create_policy(a_policy(tid, name="Second"), an_entry(tid, T0 + 1, "second"))
    got = store.get_policy(tid, "web")
    assert got.name == "Policy web" and got.etag == first.etag
    assert [e.action for e in audit_of(store, tid)] == ["test.event"]  # the failed create left no entry


def test_get_policy_missing_or_other_tenant_is_not_found(store: Store, tid: str) -> None:
    store.create_policy(a_policy(tid), an_entry(tid, T0))
    with pytest.raises(NotFound):
        store.get_policy(tid, "nope")
    with pytest.raises(NotFound):
        store.get_policy(str(uuid.uuid4()), "web")


def test_replace_policy_gives_a_new_etag_each_write(store: Store, tid: str) -> None:
    created = store.create_policy(a_policy(tid), an_entry(tid, T0))
    seen = {created.etag}
    current = created
    for i in range(3):  # the same content written again still changes the ETag
        entry = an_entry(tid, T0 + 1 + i, "policy.changed", policy_id="web")
        current = store.replace_policy(replace(current, name="Renamed", audit_head=entry.hash), current.etag, entry)
        assert current.etag not in seen
        seen.add(current.etag)
        got = store.get_policy(tid, "web")
        assert got.etag == current.etag and got.name == "Renamed" and got.audit_head == entry.hash
    assert len(audit_of(store, tid)) == 4


def test_replace_policy_with_stale_etag_is_precondition_failed(store: Store, tid: str) -> None:
    created = store.create_policy(a_policy(tid), an_entry(tid, T0))
    newer = store.replace_policy(replace(created, name="B"), created.etag, an_entry(tid, T0 + 1))
    with pytest.raises(PreconditionFailed):
        store.replace_policy(replace(created, name="C"), created.etag, an_entry(tid, T0 + 2, "lost"))
    got = store.get_policy(tid, "web")
    assert got.name == "B" and got.etag == newer.etag
    assert "lost" not in [e.action for e in audit_of(store, tid)]


def test_replace_policy_missing_is_not_found(store: Store, tid: str) -> None:
    created = store.create_policy(a_policy(tid), an_entry(tid, T0))
    with pytest.raises(NotFound):
        store.replace_policy(a_policy(tid, "other"), created.etag, an_entry(tid, T0 + 1, "lost"))
    other = str(uuid.uuid4())
    with pytest.raises(NotFound):  # the same id in another tenant is another policy
        store.replace_policy(replace(created, tenant_id=other), created.etag, an_entry(other, T0 + 2))
    assert [e.action for e in audit_of(store, tid)] == ["test.event"]


def test_replace_policy_etag_matching(store: Store, tid: str) -> None:
    """If-Match semantics of both backends: `*` matches any ETag; an empty one is refused outright.
    (The service compares the client's If-Match with the stored ETag itself before it writes.)"""
    created = store.create_policy(a_policy(tid), an_entry(tid, T0))
    with pytest.raises(ValueError):
        store.replace_policy(replace(created, name="Empty"), "", an_entry(tid, T0 + 1))
    assert store.get_policy(tid, "web").etag == created.etag
    star = store.replace_policy(replace(created, name="Star"), "*", an_entry(tid, T0 + 2))
    assert star.etag != created.etag and store.get_policy(tid, "web").name == "Star"


def test_replace_policy_race_has_one_winner(store: Store, tid: str) -> None:
    created = store.create_policy(a_policy(tid), an_entry(tid, T0))
    results = race(6, lambda i: store.replace_policy(
        replace(created, name=f"n{i}"), created.etag, an_entry(tid, T0 + 1 + i, f"w{i}")))
    winners = [r for r in results if isinstance(r, Policy)]
    assert len(winners) == 1, results
    assert all(isinstance(r, PreconditionFailed) for r in results if r is not winners[0])
    got = store.get_policy(tid, "web")
    assert got.name == winners[0].name and got.etag == winners[0].etag
    assert len(audit_of(store, tid)) == 2


def test_list_policies_is_per_tenant_sorted_and_includes_deleted(store: Store, tid: str) -> None:
    for pid in ("web-prod", "db", "web"):
        store.create_policy(a_policy(tid, pid), an_entry(tid, T0))
    gone = store.get_policy(tid, "db")
    store.replace_policy(replace(gone, deleted=True), gone.etag, an_entry(tid, T0 + 1))
    other = str(uuid.uuid4())
    store.create_policy(a_policy(other, "elsewhere"), an_entry(other, T0))
    listed = store.list_policies(tid)
    assert [p.id for p in listed] == ["db", "web", "web-prod"]
    assert [p.deleted for p in listed] == [True, False, False]
    assert all(p.etag == store.get_policy(tid, p.id).etag for p in listed)
    assert [p.id for p in store.list_policies(other)] == ["elsewhere"]
    assert store.list_policies(str(uuid.uuid4())) == []


# ---- requests -----------------------------------------------------------------------------------


def test_request_round_trip(store: Store, tid: str) -> None:
    rec = a_request(tid, approvals=(Approval("oid-bob", tid, "bob@example.com", int(T0) + 5, "ok"),),
                    decided_by="bob@example.com", decided_at=int(T0) + 5, comment="fine", key_id="k")
    entry = an_entry(tid, T0, "request.created", request_id=rec.id)
    created = store.create_request(rec, entry)
    assert created == rec and created.etag
    got = store.get_request(tid, rec.id)
    assert got == rec and got.etag == created.etag
    assert audit_of(store, tid) == [entry]


def test_create_request_twice_is_conflict(store: Store, tid: str) -> None:
    rec = a_request(tid)
    created = store.create_request(rec, an_entry(tid, T0))
    with pytest.raises(Conflict):
        store.create_request(replace(rec, host="other"), an_entry(tid, T0 + 1, "lost"))
    got = store.get_request(tid, rec.id)
    assert got.host == rec.host and got.etag == created.etag
    assert [e.action for e in audit_of(store, tid)] == ["test.event"]


def test_get_request_missing_or_other_tenant_is_not_found(store: Store, tid: str) -> None:
    rec = a_request(tid)
    store.create_request(rec, an_entry(tid, T0))
    with pytest.raises(NotFound):
        store.get_request(tid, str(uuid.uuid4()))
    with pytest.raises(NotFound):
        store.get_request(str(uuid.uuid4()), rec.id)


def test_update_request_is_conditional(store: Store, tid: str) -> None:
    created = store.create_request(a_request(tid), an_entry(tid, T0))
    entry = an_entry(tid, T0 + 1, "request.approved", request_id=created.id)
    approved = store.update_request(replace(created, state="approved", audit_head=entry.hash), created.etag, entry)
    assert approved.etag and approved.etag != created.etag
    got = store.get_request(tid, created.id)
    assert got == approved and got.etag == approved.etag and got.state == "approved"
    with pytest.raises(Conflict):  # the loser of a race read the row before the winner wrote it
        store.update_request(replace(created, state="denied"), created.etag, an_entry(tid, T0 + 2, "lost"))
    assert store.get_request(tid, created.id).state == "approved"
    assert [e.action for e in audit_of(store, tid)] == ["test.event", "request.approved"]
    with pytest.raises(NotFound):
        store.update_request(a_request(tid), approved.etag, an_entry(tid, T0 + 3, "lost"))


def test_update_request_race_has_one_winner(store: Store, tid: str) -> None:
    created = store.create_request(a_request(tid), an_entry(tid, T0))
    results = race(8, lambda i: store.update_request(
        replace(created, state="approved" if i % 2 else "denied", comment=str(i)), created.etag,
        an_entry(tid, T0 + 1 + i, f"w{i}", request_id=created.id)))
    winners = [r for r in results if isinstance(r, RequestRecord)]
    assert len(winners) == 1, results
    assert all(isinstance(r, Conflict) for r in results if r is not winners[0])
    got = store.get_request(tid, created.id)
    assert got == winners[0] and got.etag == winners[0].etag
    assert [e.action for e in audit_of(store, tid, request_id=created.id)] == [f"w{winners[0].comment}"]


def test_list_requests_by_state_and_tenant(store: Store, tid: str) -> None:
    ids = sorted(str(uuid.uuid4()) for _ in range(4))
    states = ["pending", "approved", "pending", "denied"]
    for rid, state in zip(reversed(ids), reversed(states)):
        store.create_request(a_request(tid, rid, state), an_entry(tid, T0))
    other = str(uuid.uuid4())
    store.create_request(a_request(other, state="pending"), an_entry(other, T0))
    assert [r.id for r in store.list_requests(tid)] == ids
    assert [r.id for r in store.list_requests(tid, "pending")] == [ids[0], ids[2]]
    assert [r.id for r in store.list_requests(tid, "denied")] == [ids[3]]
    assert store.list_requests(tid, "issued") == []
    assert all(r.etag == store.get_request(tid, r.id).etag for r in store.list_requests(tid))
    assert len(store.list_requests(other)) == 1


# ---- issuance -----------------------------------------------------------------------------------


def test_issuance_with_a_new_request_row(store: Store, tid: str) -> None:
    rec = a_request(tid, state="issued", serial=2**63 - 1, key_id="ezssh/web/x/alice")
    created = an_entry(tid, T0, "request.created", request_id=rec.id)
    issued = an_entry(tid, T0 + 0.5, "certificate.issued", request_id=rec.id, serial=str(rec.serial))
    cert = a_cert(rec, 2**63 - 1)
    assert store.record_issuance(rec, None, cert, [created, issued]) is None
    got = store.get_request(tid, rec.id)
    assert got == rec and got.etag
    stored = store.get_certificate(tid, "web", 2**63 - 1)
    assert replace(stored, etag=None) == cert and stored.etag
    assert audit_of(store, tid) == [created, issued]


def test_issuance_for_an_approved_request(store: Store, tid: str) -> None:
    approved = store.create_request(a_request(tid, state="approved"), an_entry(tid, T0))
    own = serial_of_request_id(approved.id)
    issued_rec = replace(approved, state="issued", serial=own, key_id="k")
    entry = an_entry(tid, T0 + 1, "certificate.issued", request_id=approved.id)
    store.record_issuance(issued_rec, approved.etag, a_cert(issued_rec, own), [entry])
    got = store.get_request(tid, approved.id)
    assert got == issued_rec and got.etag != approved.etag
    assert store.get_certificate(tid, "web", own).request_id == approved.id
    assert audit_of(store, tid, request_id=approved.id) == [entry]


def assert_untouched(store: Store, tid: str, before: list[AuditEntry], *certs: tuple[str, int]) -> None:
    assert audit_of(store, tid) == before
    for pid, serial in certs:
        with pytest.raises(NotFound):
            store.get_certificate(tid, pid, serial)


def test_issuance_with_stale_etag_writes_nothing(store: Store, tid: str) -> None:
    created = store.create_request(a_request(tid), an_entry(tid, T0))
    approved = store.update_request(replace(created, state="approved"), created.etag, an_entry(tid, T0 + 1))
    before = audit_of(store, tid)
    own = serial_of_request_id(created.id)
    issued_rec = replace(approved, state="issued", serial=own)
    with pytest.raises(Conflict):
        store.record_issuance(issued_rec, created.etag, a_cert(issued_rec, own), [an_entry(tid, T0 + 2)])
    assert store.get_request(tid, created.id).etag == approved.etag
    assert_untouched(store, tid, before, ("web", own))


def test_issuance_race_has_one_winner(store: Store, tid: str) -> None:
    approved = store.create_request(a_request(tid, state="approved"), an_entry(tid, T0))

    own = serial_of_request_id(approved.id)

    def issue(i: int) -> int:
        rec = replace(approved, state="issued", serial=own)
        store.record_issuance(rec, approved.etag, a_cert(rec, own, certificate=f"cert-{i}"),
                              [an_entry(tid, T0 + 1 + i, f"issued-{i}")])
        return i

    results = race(6, issue)
    winners = [r for r in results if isinstance(r, int)]
    assert len(winners) == 1, results
    assert all(isinstance(r, Conflict) for r in results if r != winners[0])
    assert store.get_request(tid, approved.id).serial == own
    assert store.get_certificate(tid, "web", own).certificate == f"cert-{winners[0]}"
    assert [e.action for e in audit_of(store, tid)] == ["test.event", f"issued-{winners[0]}"]


def test_issuance_with_a_reused_serial_writes_nothing_new_row(store: Store, tid: str) -> None:
    first = a_request(tid, state="issued", serial=5)
    store.record_issuance(first, None, a_cert(first, 5), [an_entry(tid, T0)])
    before = audit_of(store, tid)
    second = a_request(tid, state="issued", serial=5, requester_upn="mallory@example.com")  # same serial, same id
    with pytest.raises(Conflict):
        store.record_issuance(second, None, a_cert(second, 5), [an_entry(tid, T0 + 1), an_entry(tid, T0 + 2)])
    assert store.get_request(tid, first.id).requester_upn == "alice@example.com"
    assert store.get_certificate(tid, "web", 5).requester_upn == "alice@example.com"
    assert_untouched(store, tid, before)


def test_issuance_with_a_serial_not_its_requests_own_writes_nothing(store: Store, tid: str) -> None:
    first = a_request(tid, state="issued", serial=5)
    store.record_issuance(first, None, a_cert(first, 5), [an_entry(tid, T0)])
    approved = store.create_request(a_request(tid, state="approved"), an_entry(tid, T0 + 1))
    before = audit_of(store, tid)
    issued_rec = replace(approved, state="issued", serial=5)
    with pytest.raises(Conflict):
        store.record_issuance(issued_rec, approved.etag, a_cert(issued_rec, 5), [an_entry(tid, T0 + 2)])
    got = store.get_request(tid, approved.id)  # still approved: the user can fetch a certificate again
    assert got.state == "approved" and got.serial is None and got.etag == approved.etag
    assert store.get_certificate(tid, "web", 5).request_id == first.id
    assert_untouched(store, tid, before)


def test_issuance_with_a_reused_request_id_writes_nothing(store: Store, tid: str) -> None:
    existing = store.create_request(a_request(tid, state="approved"), an_entry(tid, T0))
    before = audit_of(store, tid)
    own = serial_of_request_id(existing.id)
    again = replace(existing, state="issued", serial=own, etag=None)
    with pytest.raises(Conflict):
        store.record_issuance(again, None, a_cert(again, own), [an_entry(tid, T0 + 1)])
    assert store.get_request(tid, existing.id).etag == existing.etag
    assert_untouched(store, tid, before, ("web", own))


def test_issuance_for_a_missing_request_is_not_found(store: Store, tid: str) -> None:
    other = store.create_request(a_request(tid), an_entry(tid, T0))
    before = audit_of(store, tid)
    ghost = a_request(tid, state="issued", serial=11)
    with pytest.raises(NotFound):
        store.record_issuance(ghost, other.etag, a_cert(ghost, 11), [an_entry(tid, T0 + 1)])
    assert_untouched(store, tid, before, ("web", 11))


def test_serials_are_unique_per_tenant_across_policies(store: Store, tid: str) -> None:
    a = a_request(tid, state="issued", serial=77)
    b = a_request(tid, state="issued", serial=77, policy_id="web-prod")
    store.record_issuance(a, None, a_cert(a, 77), [an_entry(tid, T0)])
    with pytest.raises(Conflict):
        store.record_issuance(b, None, a_cert(b, 77), [an_entry(tid, T0 + 1)])
    assert store.get_certificate(tid, "web", 77).request_id == a.id
    with pytest.raises(NotFound):
        store.get_certificate(tid, "web-prod", 77)
    other = str(uuid.uuid4())  # another tenant may hold the same serial
    c = a_request(other, state="issued", serial=77, policy_id="web-prod")
    store.record_issuance(c, None, a_cert(c, 77), [an_entry(other, T0 + 2)])
    assert store.get_certificate(other, "web-prod", 77).tenant_id == other


# ---- certificates -------------------------------------------------------------------------------


def test_get_certificate_is_scoped_by_tenant_and_policy(store: Store, tid: str) -> None:
    rec = a_request(tid, state="issued", serial=3)
    cert = a_cert(rec, 3, principals=("alice", "deploy"))
    store.record_issuance(rec, None, cert, [an_entry(tid, T0)])
    got = store.get_certificate(tid, "web", 3)
    assert got.etag and replace(got, etag=None) == cert and got.principals == ("alice", "deploy") and got.revoked_at is None
    for args in ((tid, "web", 4), (tid, "web-prod", 3), (str(uuid.uuid4()), "web", 3)):
        with pytest.raises(NotFound):
            store.get_certificate(*args)


# ---- audit --------------------------------------------------------------------------------------


def test_audit_is_ordered_by_time_not_by_insertion(store: Store, tid: str) -> None:
    offsets = [5, 1, 3, 0, 4, 2]
    entries = {o: an_entry(tid, T0 + o, f"e{o}", details={"n": o, "nested": {"k": [1, 2]}}) for o in offsets}
    for o in offsets:
        store.add_audit(entries[o])
    got = audit_of(store, tid)
    assert got == [entries[o] for o in sorted(offsets)]
    assert all(e.verify() for e in got)  # hashes survive the round trip


def test_audit_since_until_are_inclusive(store: Store, tid: str) -> None:
    for o in range(6):
        store.add_audit(an_entry(tid, T0 + o, f"e{o}"))
    actions = lambda **kw: [e.action for e in audit_of(store, tid, **kw)]  # noqa: E731
    assert actions(since=T0 + 2) == ["e2", "e3", "e4", "e5"]
    assert actions(until=T0 + 2) == ["e0", "e1", "e2"]
    assert actions(since=T0 + 1, until=T0 + 3) == ["e1", "e2", "e3"]
    assert actions(since=T0 + 1.5, until=T0 + 3.5) == ["e2", "e3"]
    assert actions(since=T0 + 6) == []
    assert actions(until=T0 - 1) == []
    assert actions(since=1e300) == [] and actions(until=-1e300) == [] and actions(since=1e300, until=1e301) == []
    assert actions(since=-1e300, until=1e300) == [f"e{o}" for o in range(6)]


def test_audit_filter_by_request_and_limit(store: Store, tid: str) -> None:
    r1, r2 = str(uuid.uuid4()), str(uuid.uuid4())
    for o in range(8):
        store.add_audit(an_entry(tid, T0 + o, f"e{o}", request_id=r1 if o % 2 else r2))
    assert [e.action for e in audit_of(store, tid, request_id=r1)] == ["e1", "e3", "e5", "e7"]
    assert [e.action for e in audit_of(store, tid, request_id=r2, limit=2)] == ["e0", "e2"]
    assert [e.action for e in audit_of(store, tid, limit=3)] == ["e0", "e1", "e2"]
    assert [e.action for e in audit_of(store, tid, request_id=r1, since=T0 + 2, until=T0 + 5)] == ["e3", "e5"]
    assert audit_of(store, tid, request_id=str(uuid.uuid4())) == []


def test_entries_written_with_a_request_are_in_the_time_window_of_the_audit(store: Store, tid: str) -> None:
    """Entries written with a new request (its creation, its certificate) are found by time like any,
    at their request's time (the row that holds them), in the order they were written."""
    t = T0 + 500
    rec = a_request(tid, new_request_id(t), state="issued")
    rec = replace(rec, serial=serial_of_request_id(rec.id))
    created = an_entry(tid, t, "request.created", request_id=rec.id)
    issued = an_entry(tid, t + 0.25, "certificate.issued", request_id=rec.id, serial=str(rec.serial))
    store.record_issuance(rec, None, a_cert(rec, rec.serial), [created, issued])
    pending = a_request(tid, new_request_id(t + 2))
    asked = an_entry(tid, t + 2, "request.created", request_id=pending.id)
    store.create_request(pending, asked)
    store.add_audit(between := an_entry(tid, t + 1, "other.event"))
    actions = lambda **kw: [e.action for e in audit_of(store, tid, **kw)]  # noqa: E731
    assert actions(since=t, until=t + 2) == ["request.created", "certificate.issued", "other.event", "request.created"]
    assert actions(since=t + 0.001, until=t + 1) == ["other.event"]  # the certificate's entry is placed at t
    assert actions(until=t) == ["request.created", "certificate.issued"]
    assert actions(since=t + 0.251, until=t + 1.999) == ["other.event"]
    assert actions(since=t + 2.001) == [] and actions(until=t - 0.001) == []
    assert audit_of(store, tid, request_id=rec.id) == [created, issued]
    assert audit_of(store, tid, since=t, limit=2) == [created, issued]
    assert between in audit_of(store, tid)


def test_audit_is_per_tenant_and_unauthenticated_has_its_own_partition(store: Store, tid: str) -> None:
    other = str(uuid.uuid4())
    mine, theirs = an_entry(tid, T0, "mine"), an_entry(other, T0, "theirs")
    marker = uuid.uuid4().hex
    anonymous = an_entry(None, T0, "request.refused", message=marker)
    for e in (mine, theirs, anonymous):
        store.add_audit(e)
    assert audit_of(store, tid) == [mine]
    assert audit_of(store, other) == [theirs]
    assert anonymous in [e for e in store.list_audit("_unauthenticated", since=T0, until=T0) if e.message == marker]


def test_a_request_chain_verifies_after_the_round_trip(store: Store, tid: str) -> None:
    rec = a_request(tid)
    created = an_entry(tid, T0, "request.created", request_id=rec.id, chain=f"req:{rec.id}")
    saved = store.create_request(replace(rec, audit_head=created.hash), created)
    from functions.core.audit import link

    approved = link(an_entry(tid, T0 + 1, "request.approved", request_id=rec.id, chain=f"req:{rec.id}"), created)
    saved = store.update_request(replace(saved, state="approved", audit_head=approved.hash), saved.etag, approved)
    chain = audit_of(store, tid, request_id=rec.id)
    assert chain == [created, approved]
    assert verify_chain(chain, store.get_request(tid, rec.id).audit_head)


# ---- audit: indexes and pages ---------------------------------------------------------------------
# Every question the audit is asked (a request, a user, a serial, a key id, a policy, a time window)
# pages through the same order: oldest first, a chain's entries in written order within a
# millisecond, the entries written with a new request at that request's time and in the order of
# its row. Following `next` to None yields each matching entry once, whatever the page size.

ALICE_OID, BOB_OID, CAROL_OID = "0b7a0000-0000-4000-8000-0000000000a1", "0b7a0000-0000-4000-8000-0000000000b0", \
    "0b7a0000-0000-4000-8000-0000000000c0"


def every_page(store: Store, tid: str, query: AuditQuery, limit: int) -> list[AuditEntry]:
    out: list[AuditEntry] = []
    after: str | None = None
    for _ in range(1000):
        page = store.audit_page(tid, query, limit=limit, after=after)
        assert len(page.entries) <= limit
        out += page.entries
        if page.next is None:
            return out
        assert page.next != after, "a page that does not move on"
        after = page.next
    raise AssertionError("pages never end")


def audit_history(store: Store, tid: str) -> dict[str, object]:
    """One of each write that carries audit entries, in written order at distinct times (each entry
    names who acted, and what it is about), plus a chain written within one millisecond."""
    from functions.core.audit import link

    who = lambda oid: {"actor_oid": oid, "actor_upn": f"{oid[-2:]}@example.com"}  # noqa: E731
    order: list[AuditEntry] = []
    pol = an_entry(tid, T0 + 1, "policy.created", policy_id="web", chain="pol:web", **who(CAROL_OID))
    store.create_policy(a_policy(tid), pol)
    order.append(pol)
    a = a_request(tid, new_request_id(T0 + 2), state="issued", requester_oid=ALICE_OID)
    a = replace(a, serial=serial_of_request_id(a.id), key_id=f"ezssh/web/{a.id}/alice@example.com")
    a_created = link(an_entry(tid, T0 + 2, "request.created", request_id=a.id, policy_id="web", chain=f"req:{a.id}",
                              **who(ALICE_OID)), None)
    a_issued = link(an_entry(tid, T0 + 2.0004, "certificate.issued", request_id=a.id, policy_id="web",
                             serial=str(a.serial), key_id=a.key_id, chain=f"req:{a.id}", **who(ALICE_OID)), a_created)
    store.record_issuance(a, None, a_cert(a, a.serial, key_id=a.key_id), [a_created, a_issued])
    order += [a_created, a_issued]
    b = a_request(tid, new_request_id(T0 + 3), policy_id="db", requester_oid=BOB_OID)
    b_created = link(an_entry(tid, T0 + 3, "request.created", request_id=b.id, policy_id="db", chain=f"req:{b.id}",
                              **who(BOB_OID)), None)
    saved = store.create_request(replace(b, audit_head=b_created.hash), b_created)
    order.append(b_created)
    refused = an_entry(tid, T0 + 4, "request.refused", policy_id="web", **who(ALICE_OID))
    store.add_audit(refused)
    order.append(refused)
    b_approved = link(an_entry(tid, T0 + 5, "request.approved", request_id=b.id, policy_id="db", chain=f"req:{b.id}",
                               **who(CAROL_OID)), b_created)
    saved = store.update_request(replace(saved, state="approved"), saved.etag, b_approved)
    order.append(b_approved)
    b_serial = serial_of_request_id(b.id)
    b_key = f"ezssh/db/{b.id}/bob@example.com"
    b_issued = link(an_entry(tid, T0 + 6, "certificate.issued", request_id=b.id, policy_id="db", serial=str(b_serial),
                             key_id=b_key, chain=f"req:{b.id}", **who(BOB_OID)), b_approved)
    store.record_issuance(replace(saved, state="issued", serial=b_serial, key_id=b_key), saved.etag,
                          a_cert(saved, b_serial, key_id=b_key), [b_issued])
    order.append(b_issued)
    cert = store.get_certificate(tid, "web", a.serial)
    a_revoked = an_entry(tid, T0 + 7, "certificate.revoked", request_id=a.id, policy_id="web", serial=str(a.serial),
                         key_id=a.key_id, **who(CAROL_OID))
    store.revoke_certificate(replace(cert, revoked_at=int(T0) + 7, revoked_by="carol"), cert.etag, a_revoked)
    order.append(a_revoked)
    c = new_request_id(T0 + 8)
    c_chain: list[AuditEntry] = []
    for action in ("request.created", "request.approved", "request.cancelled", "request.expired"):
        c_chain.append(link(an_entry(tid, T0 + 8, action, request_id=c, policy_id="web", chain=f"req:{c}",
                                     **who(CAROL_OID)), c_chain[-1] if c_chain else None))
    for e in reversed(c_chain):  # written in any order; stored in the chain's
        store.add_audit(e)
    order += c_chain
    return {"order": order, "a": a, "b_id": b.id, "b_serial": b_serial, "b_key": b_key, "c": c}


def test_audit_pages_answer_each_question_in_one_order(store: Store, tid: str) -> None:
    h = audit_history(store, tid)
    order: list[AuditEntry] = h["order"]  # type: ignore[assignment]
    a: RequestRecord = h["a"]  # type: ignore[assignment]
    questions = [
        AuditQuery(), AuditQuery(request_id=a.id), AuditQuery(request_id=h["b_id"]), AuditQuery(request_id=h["c"]),
        AuditQuery(user=ALICE_OID), AuditQuery(user=BOB_OID), AuditQuery(user=CAROL_OID),
        AuditQuery(serial=str(a.serial)), AuditQuery(serial=str(h["b_serial"])), AuditQuery(key_id=a.key_id),
        AuditQuery(key_id=h["b_key"]), AuditQuery(policies=("web",)), AuditQuery(policies=("db", "web")),
        AuditQuery(policies=()), AuditQuery(since=T0 + 3, until=T0 + 6), AuditQuery(since=T0 + 2.001),
        AuditQuery(user=ALICE_OID, policies=("db",)), AuditQuery(request_id=h["b_id"], user=CAROL_OID),
        AuditQuery(request_id=a.id, since=T0 + 5), AuditQuery(serial="5"), AuditQuery(user=str(uuid.uuid4())),
    ]
    for q in questions:
        lo, hi = q.since or 0, q.until if q.until is not None else float("inf")
        # entries written with request a sit at its time, T0 + 2
        want = [e for e in order if q.matches(e) and lo <= (T0 + 2 if e in order[1:3] else e.at) <= hi]
        for limit in (1, 2, 3, 100):
            assert every_page(store, tid, q, limit) == want, (q, limit)
    assert [e.seq for e in every_page(store, tid, AuditQuery(request_id=h["c"]), 100)] == [0, 1, 2, 3]
    assert audit_of(store, tid) == order  # the whole history, in the same order
    assert store.audit_page(str(uuid.uuid4()), AuditQuery(user=ALICE_OID)) == AuditPage([], None)  # per tenant


def test_a_write_that_fails_leaves_none_of_its_index_rows(store: Store, tid: str) -> None:
    created = store.create_request(a_request(tid), an_entry(tid, T0, "request.created"))
    late = an_entry(tid, T0 + 1, "request.approved", request_id=created.id, policy_id="web", actor_oid=ALICE_OID,
                    serial="12345", key_id="ezssh/web/x/alice")
    store.update_request(replace(created, state="approved"), created.etag, an_entry(tid, T0 + 0.5, "other.event"))
    with pytest.raises(Conflict):
        store.update_request(replace(created, state="denied"), created.etag, late)  # a stale ETag
    for q in (AuditQuery(), AuditQuery(request_id=created.id), AuditQuery(user=ALICE_OID), AuditQuery(serial="12345"),
              AuditQuery(key_id="ezssh/web/x/alice"), AuditQuery(policies=("web",))):
        assert late not in every_page(store, tid, q, 100), q


# ---- revocation ---------------------------------------------------------------------------------


def issued(store: Store, tid: str, serial: int, policy_id: str = "web") -> CertificateRecord:
    rec = a_request(tid, state="issued", serial=serial, policy_id=policy_id)
    store.record_issuance(rec, None, a_cert(rec, serial), [an_entry(tid, T0 + serial / 1000)])
    return store.get_certificate(tid, policy_id, serial)


def test_revoke_is_conditional_and_audited(store: Store, tid: str) -> None:
    cert = issued(store, tid, 21)
    entry = an_entry(tid, T0 + 10, "certificate.revoked", serial="21")
    revoked = store.revoke_certificate(replace(cert, revoked_at=int(T0) + 10, revoked_by="carol@x",
                                               revoked_by_oid="oid-carol"), cert.etag, entry)
    assert revoked.revoked_at == int(T0) + 10 and revoked.etag and revoked.etag != cert.etag
    got = store.get_certificate(tid, "web", 21)
    assert got == revoked and got.etag == revoked.etag and got.certificate == cert.certificate
    assert entry in audit_of(store, tid)
    with pytest.raises(Conflict):
        store.revoke_certificate(replace(cert, revoked_at=int(T0) + 99, revoked_by="eve@x"), cert.etag,
                                 an_entry(tid, T0 + 11, "lost"))
    got = store.get_certificate(tid, "web", 21)
    assert got.revoked_by == "carol@x" and got.revoked_by_oid == "oid-carol" and got.etag == revoked.etag
    assert "lost" not in [e.action for e in audit_of(store, tid)]


def test_revoke_missing_certificate_is_not_found(store: Store, tid: str) -> None:
    cert = issued(store, tid, 22)
    before = audit_of(store, tid)
    for ghost in (replace(cert, serial=23), replace(cert, policy_id="web-prod"), replace(cert, tenant_id=str(uuid.uuid4()))):
        with pytest.raises(NotFound):
            store.revoke_certificate(replace(ghost, revoked_at=int(T0), revoked_by="c"), cert.etag,
                                     an_entry(ghost.tenant_id, T0 + 5))  # the audit goes where the row is
    assert audit_of(store, tid) == before


def test_list_revoked_per_policy_and_tenant(store: Store, tid: str) -> None:
    certs = {s: issued(store, tid, s) for s in (31, 1000, 32, 33)}
    prod = issued(store, tid, 34, "web-prod")
    other = str(uuid.uuid4())
    theirs = issued(store, other, 31)
    assert store.list_revoked(tid, "web", valid_from=0) == []
    for c in (certs[1000], certs[31], prod, theirs):
        store.revoke_certificate(replace(c, revoked_at=int(T0) + 1, revoked_by="carol"), c.etag, an_entry(c.tenant_id, T0 + 5))
    listed = store.list_revoked(tid, "web", valid_from=0)
    assert sorted(r.serial for r in listed) == [31, 1000]
    for r in listed:  # what the KRL needs, as the certificate's own record says
        c = store.get_certificate(tid, "web", r.serial)
        assert (r.policy_id, r.ca_fingerprint, r.valid_before, r.revoked_at, r.host) == \
            ("web", c.ca_fingerprint, c.valid_before, c.revoked_at, False)
    assert [r.serial for r in store.list_revoked(tid, "web-prod", valid_from=0)] == [34]
    assert [r.serial for r in store.list_revoked(other, "web", valid_from=0)] == [31]
    assert store.list_revoked(tid, "we", valid_from=0) == []
    assert store.list_revoked_host(tid, valid_from=0) == []  # user certificates only so far


def revoke(store: Store, c: CertificateRecord, at: float) -> CertificateRecord:
    return store.revoke_certificate(replace(c, revoked_at=int(at), revoked_by="carol"), c.etag or "",
                                    an_entry(c.tenant_id, at, "certificate.revoked"))


def test_revocations_are_read_by_expiry(store: Store, tid: str) -> None:
    """valid_from leaves out what expired before it, for user and host certificates alike."""
    ends = {41: int(T0) + 100, 42: int(T0) + 5000, 43: int(T0) + 90_000}
    for serial, end in ends.items():
        rec = a_request(tid, state="issued", serial=serial)
        store.record_issuance(rec, None, a_cert(rec, serial, valid_before=end), [an_entry(tid, T0 + serial / 1000)])
        revoke(store, store.get_certificate(tid, "web", serial), T0 + serial)
    hosts = {51: int(T0) + 200, 52: int(T0) + 9000}
    for serial, end in hosts.items():
        cert, key = a_host_cert(tid, serial, f"SHA256:h{serial}")
        store.record_host_issuance([replace(cert, valid_before=end)], [key], [])
        revoke(store, store.get_certificate(tid, "web", serial), T0 + serial)
    every = {**ends, **hosts}
    for since in (0, int(T0) + 100, int(T0) + 101, int(T0) + 5000, int(T0) + 9001, int(T0) + 90_001):
        got = store.list_revoked(tid, "web", valid_from=since)
        assert sorted(r.serial for r in got) == sorted(s for s, end in every.items() if end >= since), since
        host = store.list_revoked_host(tid, valid_from=since)
        assert sorted(r.serial for r in host) == sorted(s for s, end in hosts.items() if end >= since), since
        assert all(r.host for r in host)
    assert {r.serial: r.host for r in store.list_revoked(tid, "web", valid_from=0)} == \
        {41: False, 42: False, 43: False, 51: True, 52: True}


def test_host_revocations_of_every_policy_and_no_user_one(store: Store, tid: str) -> None:
    cert, key = a_host_cert(tid, 61, "SHA256:h61")
    store.record_host_issuance([replace(cert, policy_id="db")], [replace(key, policy_id="db")], [])
    revoke(store, store.get_certificate(tid, "db", 61), T0 + 1)
    cert, key = a_host_cert(tid, 62, "SHA256:h62")
    store.record_host_issuance([cert], [key], [])
    revoke(store, store.get_certificate(tid, "web", 62), T0 + 2)
    revoke(store, issued(store, tid, 63), T0 + 3)
    other = str(uuid.uuid4())
    cert, key = a_host_cert(other, 64)
    store.record_host_issuance([replace(cert, tenant_id=other)], [replace(key, tenant_id=other)], [])
    revoke(store, store.get_certificate(other, "web", 64), T0 + 4)
    assert sorted((r.policy_id, r.serial) for r in store.list_revoked_host(tid, valid_from=0)) == [("db", 61), ("web", 62)]
    assert [r.serial for r in store.list_revoked_host(other, valid_from=0)] == [64]


def test_trust_versions_change_with_what_they_version(store: Store, tid: str) -> None:
    """A policy's version: its revocations. The tenant's: policies written and host revocations."""
    empty = store.trust_version(tid)
    assert empty == store.trust_version(tid, "web") and empty.tag == "" and empty.at == 0
    p = store.create_policy(a_policy(tid), an_entry(tid, T0))
    t1 = store.trust_version(tid)
    assert t1.tag and t1.at == int(T0) and store.trust_version(tid, "web").tag == ""
    store.replace_policy(replace(p, name="renamed"), p.etag or "", an_entry(tid, T0 + 1))
    t2 = store.trust_version(tid)
    assert t2.tag not in ("", t1.tag) and t2.at == int(T0) + 1
    # a user certificate revoked: its policy's version moves, the tenant's (known-hosts) does not
    user = issued(store, tid, 71)
    revoke(store, user, T0 + 10)
    w1 = store.trust_version(tid, "web")
    assert w1.tag and w1.at == int(T0) + 10 and store.trust_version(tid) == t2
    assert store.trust_version(tid, "db").tag == ""
    # a lost race changes no version
    with pytest.raises(Conflict):
        revoke(store, user, T0 + 11)
    assert store.trust_version(tid, "web") == w1 and store.trust_version(tid) == t2
    # a host certificate revoked: both move
    cert, key = a_host_cert(tid, 72)
    store.record_host_issuance([cert], [key], [])
    assert store.trust_version(tid) == t2  # issuing changes no KRL
    revoke(store, store.get_certificate(tid, "web", 72), T0 + 20)
    w2, t3 = store.trust_version(tid, "web"), store.trust_version(tid)
    assert w2.tag not in (w1.tag, "") and w2.at == int(T0) + 20 and t3.tag not in (t2.tag, "")
    # nothing of it shows in another tenant
    assert store.trust_version(str(uuid.uuid4())).tag == "" and store.trust_version(str(uuid.uuid4()), "web").tag == ""


# ---- host tokens --------------------------------------------------------------------------------


def test_host_token_first_writer_wins(store: Store, tid: str) -> None:
    assert store.get_host_token(tid, "web") is None
    assert store.ensure_host_token(tid, "web", "first") == "first"
    assert store.ensure_host_token(tid, "web", "second") == "first"
    assert store.get_host_token(tid, "web") == "first"
    assert store.get_host_token(tid, "web-prod") is None
    assert store.get_host_token(str(uuid.uuid4()), "web") is None


def test_host_token_race_agrees_on_one(store: Store, tid: str) -> None:
    results = race(6, lambda i: store.ensure_host_token(tid, "web", f"candidate-{i}"))
    assert len(set(results)) == 1 and str(results[0]).startswith("candidate-"), results
    assert store.get_host_token(tid, "web") == results[0]


def test_host_token_never_shows_in_policy_reads(store: Store, tid: str) -> None:
    store.create_policy(a_policy(tid), an_entry(tid, T0))
    token = f"tok-{uuid.uuid4().hex}"
    store.ensure_host_token(tid, "web", token)
    assert token not in repr(store.list_policies(tid)) + repr(store.get_policy(tid, "web"))
    assert token not in repr(audit_of(store, tid))


# ---- host certificates ---------------------------------------------------------------------------


def a_token(tid: str, **kw) -> HostEnrolmentToken:
    fields = dict(tenant_id=tid, policy_id="web", token_hash=uuid.uuid4().hex * 2, hosts=("web1.example.com",),
                  created_at=int(T0), expires_at=int(T0) + 900, created_by_oid="oid-carol",
                  created_by_upn="carol@example.com")
    fields.update(kw)
    return HostEnrolmentToken(**fields)


def a_host_cert(tid: str, serial: int, fp: str = "SHA256:hostkey") -> tuple[CertificateRecord, HostKeyRecord]:
    cert = CertificateRecord(tenant_id=tid, policy_id="web", serial=serial, key_id="ezssh-host/web/web1.example.com",
                             request_id="", requester_oid="oid-carol", requester_upn="carol@example.com",
                             principals=("web1.example.com",), host="web1.example.com", valid_after=int(T0),
                             valid_before=int(T0) + 86400, ca_fingerprint="SHA256:hostca", public_key_fingerprint=fp,
                             certificate="ssh-ed25519-cert-v01@openssh.com AAAA")
    key = HostKeyRecord(tenant_id=tid, policy_id="web", fingerprint=fp, public_key="ssh-ed25519 AAAA",
                        principals=("web1.example.com",), serial=serial, valid_after=int(T0),
                        valid_before=int(T0) + 86400, proof="token:abc", subject="web1.example.com",
                        updated_at=int(T0))
    return cert, key


def test_enrolment_token_round_trip_and_single_use(store: Store, tid: str) -> None:
    tok = store.create_host_enrolment_token(a_token(tid), an_entry(tid, T0, "host.token_created"))
    assert tok.etag
    got = store.get_host_enrolment_token(tid, tok.token_hash)
    assert (got.hosts, got.used_at, got.expires_at) == (("web1.example.com",), None, int(T0) + 900)
    with pytest.raises(NotFound):
        store.get_host_enrolment_token(str(uuid.uuid4()), tok.token_hash)
    cert, key = a_host_cert(tid, 7)
    used = replace(got, used_at=int(T0) + 5, used_by="SHA256:hostkey")
    store.record_host_issuance([cert], [key], [an_entry(tid, T0 + 1, "host_certificate.issued")], used)
    after = store.get_host_enrolment_token(tid, tok.token_hash)
    assert after.used_at == int(T0) + 5 and after.etag != got.etag
    assert store.get_certificate(tid, "web", 7).public_key_fingerprint == "SHA256:hostkey"
    assert store.get_host_key(tid, "web", "SHA256:hostkey").serial == 7
    # the same read used again (a second host racing with the same token) writes nothing
    cert2, key2 = a_host_cert(tid, 8, "SHA256:other")
    before = audit_of(store, tid)
    with pytest.raises(Conflict):
        store.record_host_issuance([cert2], [key2], [an_entry(tid, T0 + 2, "host_certificate.issued")], used)
    with pytest.raises(NotFound):
        store.get_certificate(tid, "web", 8)
    assert store.get_host_key(tid, "web", "SHA256:other") is None
    assert audit_of(store, tid) == before


def test_enrolment_token_race_has_one_winner(store: Store, tid: str) -> None:
    tok = store.create_host_enrolment_token(a_token(tid), an_entry(tid, T0, "host.token_created"))
    got = store.get_host_enrolment_token(tid, tok.token_hash)

    def use(i: int) -> object:
        cert, key = a_host_cert(tid, 100 + i, f"SHA256:k{i}")
        return store.record_host_issuance([cert], [key], [an_entry(tid, T0 + 1 + i, "host_certificate.issued")],
                                          replace(got, used_at=int(T0) + 1))

    results = race(4, use)
    assert sum(r is None for r in results) == 1, results
    assert all(isinstance(r, Conflict) for r in results if r is not None)
    assert len(store.list_host_keys(tid, "web")) == 1


def test_host_keys_upsert_and_list_by_subject(store: Store, tid: str) -> None:
    c1, k1 = a_host_cert(tid, 1, "SHA256:a")
    c2, k2 = a_host_cert(tid, 2, "SHA256:b")
    store.record_host_issuance([c1, c2], [k1, replace(k2, subject="/subscriptions/x/vm")], [])
    c3, k3 = a_host_cert(tid, 3, "SHA256:a")
    store.record_host_issuance([c3], [k3], [])
    assert store.get_host_key(tid, "web", "SHA256:a").serial == 3
    assert [k.fingerprint for k in store.list_host_keys(tid, "web", "/subscriptions/x/vm")] == ["SHA256:b"]
    assert len(store.list_host_keys(tid, "web")) == 2
    assert store.list_host_keys(tid, "other") == [] and store.get_host_key(tid, "other", "SHA256:a") is None
    # a reused serial writes nothing
    c4, k4 = a_host_cert(tid, 3, "SHA256:c")
    with pytest.raises(Conflict):
        store.record_host_issuance([c4], [k4], [])
    assert store.get_host_key(tid, "web", "SHA256:c") is None


def test_host_challenge_single_use(store: Store, tid: str) -> None:
    ch = store.create_host_challenge(HostChallenge(tenant_id=tid, policy_id="web", id=uuid.uuid4().hex, nonce="n1",
                                                   fingerprints=("SHA256:a",), created_at=int(T0),
                                                   expires_at=int(T0) + 300))
    got = store.get_host_challenge(tid, ch.id)
    assert got.fingerprints == ("SHA256:a",) and got.used_at is None and b"nonce n1" in got.message
    with pytest.raises(NotFound):
        store.get_host_challenge(tid, "nope")
    c, k = a_host_cert(tid, 11, "SHA256:a")
    store.record_host_issuance([c], [k], [], replace(got, used_at=int(T0) + 3))
    assert store.get_host_challenge(tid, ch.id).used_at == int(T0) + 3
    c2, k2 = a_host_cert(tid, 12, "SHA256:a")
    with pytest.raises(Conflict):
        store.record_host_issuance([c2], [k2], [], replace(got, used_at=int(T0) + 4))


def test_memory_store_is_a_store() -> None:
    """Every method of the protocol exists on the memory store with the same parameters."""
    import inspect

    from functions.storage.tables import TableStore

    names = [n for n, v in vars(Store).items() if callable(v) and not n.startswith("_")]
    assert len(names) >= 17
    for n in names:
        proto = inspect.signature(getattr(Store, n))
        assert inspect.signature(getattr(MemoryStore, n)).parameters.keys() == proto.parameters.keys(), n
        assert inspect.signature(getattr(TableStore, n)).parameters.keys() == proto.parameters.keys(), n


# ---- a state change and its audit land together (issue: no change without its audit) -----------
# The audit entry below reuses an entry that is already stored, so the audit write of the change
# fails; the change itself must then not land either.


def test_a_request_update_whose_audit_fails_changes_nothing(store: Store, tid: str) -> None:
    first = an_entry(tid, T0, "request.created")
    created = store.create_request(a_request(tid), first)
    stored = an_entry(tid, T0 + 1, "other.event")
    store.add_audit(stored)
    with pytest.raises(Conflict):
        store.update_request(replace(created, state="approved"), created.etag, stored)
    got = store.get_request(tid, created.id)
    assert got.state == "pending" and got.etag == created.etag
    assert audit_of(store, tid) == [first, stored]


def test_a_policy_replace_whose_audit_fails_changes_nothing(store: Store, tid: str) -> None:
    first = an_entry(tid, T0, "policy.created")
    created = store.create_policy(a_policy(tid), first)
    with pytest.raises(Conflict):
        store.replace_policy(replace(created, name="Changed"), created.etag, first)
    got = store.get_policy(tid, created.id)
    assert got.name == created.name and got.etag == created.etag
    assert audit_of(store, tid) == [first]


def test_a_revocation_whose_audit_fails_changes_nothing(store: Store, tid: str) -> None:
    cert = issued(store, tid, 77)
    stored = an_entry(tid, T0 + 1, "other.event")
    store.add_audit(stored)
    before = audit_of(store, tid)
    with pytest.raises(Conflict):
        store.revoke_certificate(replace(cert, revoked_at=int(T0), revoked_by="carol"), cert.etag, stored)
    got = store.get_certificate(tid, cert.policy_id, 77)
    assert got.revoked_at is None and got.etag == cert.etag
    assert audit_of(store, tid) == before


# ---- idempotency keys --------------------------------------------------------------------------


def an_idempotency(tid: str, rid: str, key: str = "k1", owner: str = "oid-alice") -> IdempotencyRecord:
    return IdempotencyRecord(tenant_id=tid, owner_oid=owner, key_hash=key * 4, request_id=rid,
                             digest="d" * 64, created_at=int(T0))


def test_an_idempotency_key_lands_with_its_request_and_is_found_again(store: Store, tid: str) -> None:
    rec = a_request(tid)
    assert store.get_idempotency(tid, "oid-alice", "k1" * 4) is None
    store.create_request(rec, an_entry(tid, T0), an_idempotency(tid, rec.id))
    got = store.get_idempotency(tid, "oid-alice", "k1" * 4)
    assert got == an_idempotency(tid, rec.id)
    # keys are per user and per tenant
    assert store.get_idempotency(tid, "oid-bob", "k1" * 4) is None
    assert store.get_idempotency(str(uuid.uuid4()), "oid-alice", "k1" * 4) is None


def test_a_used_idempotency_key_writes_nothing_new(store: Store, tid: str) -> None:
    rec = a_request(tid)
    store.create_request(rec, an_entry(tid, T0), an_idempotency(tid, rec.id))
    second = a_request(tid)
    with pytest.raises(Conflict):
        store.create_request(second, an_entry(tid, T0 + 1, "lost"), an_idempotency(tid, second.id))
    with pytest.raises(NotFound):
        store.get_request(tid, second.id)
    third = a_request(tid, state="issued", serial=5)
    with pytest.raises(Conflict):
        store.record_issuance(third, None, a_cert(third, 5), [an_entry(tid, T0 + 2, "lost")],
                              an_idempotency(tid, third.id))
    with pytest.raises(NotFound):
        store.get_certificate(tid, "web", 5)
    assert [e.action for e in audit_of(store, tid)] == ["test.event"]
    assert store.get_idempotency(tid, "oid-alice", "k1" * 4).request_id == rec.id


def test_an_issuance_carries_its_idempotency_key(store: Store, tid: str) -> None:
    rec = a_request(tid, state="issued", serial=9)
    store.record_issuance(rec, None, a_cert(rec, 9), [an_entry(tid, T0)], an_idempotency(tid, rec.id, "k2"))
    assert store.get_idempotency(tid, "oid-alice", "k2" * 4).request_id == rec.id


def test_a_key_that_names_its_request_rides_on_that_row(store: Store, tid: str) -> None:
    rec = a_request(tid)
    on_row = replace(an_idempotency(tid, rec.id, "k3"), on_request_row=True)
    assert store.get_idempotency(tid, "oid-alice", "k3" * 4, rec.id) is None
    store.create_request(rec, an_entry(tid, T0), on_row)
    assert store.get_idempotency(tid, "oid-alice", "k3" * 4, rec.id) == on_row
    # found only on that row, only for its owner and that key; no row of its own was written
    assert store.get_idempotency(tid, "oid-alice", "k3" * 4) is None
    assert store.get_idempotency(tid, "oid-bob", "k3" * 4, rec.id) is None
    assert store.get_idempotency(tid, "oid-alice", "k4" * 4, rec.id) is None
    assert store.get_idempotency(str(uuid.uuid4()), "oid-alice", "k3" * 4, rec.id) is None
    # the retry's write finds the row taken, and nothing new lands
    with pytest.raises(Conflict):
        store.create_request(replace(rec, host="web2.example.com"), an_entry(tid, T0 + 1, "lost"), on_row)
    assert store.get_request(tid, rec.id).host == rec.host
    assert [e.action for e in audit_of(store, tid)] == ["test.event"]
    # it stays on the row through the request's later changes
    approved = store.update_request(replace(rec, state="approved"), store.get_request(tid, rec.id).etag,
                                    an_entry(tid, T0 + 2, "request.approved", request_id=rec.id))
    assert approved.state == "approved" and store.get_idempotency(tid, "oid-alice", "k3" * 4, rec.id) == on_row


def test_an_issuance_carries_a_key_that_names_it_on_its_row(store: Store, tid: str) -> None:
    rec = a_request(tid, state="issued", serial=11)
    on_row = replace(an_idempotency(tid, rec.id, "k5"), on_request_row=True)
    store.record_issuance(rec, None, a_cert(rec, 11), [an_entry(tid, T0)], on_row)
    assert store.get_idempotency(tid, "oid-alice", "k5" * 4, rec.id) == on_row
    assert store.get_certificate(tid, "web", 11).request_id == rec.id
    with pytest.raises(Conflict):
        store.record_issuance(rec, None, a_cert(rec, 11), [an_entry(tid, T0 + 1, "lost")], on_row)
    assert [e.action for e in audit_of(store, tid)] == ["test.event"]
    # a key rides only on the row it names, of its owner: anything else is the caller's mistake
    other = a_request(tid, state="issued", serial=12)
    with pytest.raises(ValueError):
        store.record_issuance(other, None, a_cert(other, 12), [an_entry(tid, T0 + 3)], on_row)
    with pytest.raises(ValueError):
        store.create_request(a_request(tid, rec.id[:-1] + "f", requester_oid="oid-bob"), an_entry(tid, T0 + 4),
                             replace(on_row, request_id=rec.id[:-1] + "f"))
    with pytest.raises(NotFound):
        store.get_certificate(tid, "web", 12)


# ---- one partition per write ------------------------------------------------------------------
# A row and its audit entries are one entity-group transaction, so they share the tenant's partition.
# An entry for another tenant (or none: the unauthenticated partition) is a caller's mistake that the
# Azure SDK refuses before sending (ValueError); the memory store refuses it the same way, so a fast
# service test catches it too.


def test_a_write_with_another_partitions_audit_entry_is_refused_and_writes_nothing(store: Store, tid: str) -> None:
    other = str(uuid.uuid4())
    policy = store.create_policy(a_policy(tid), an_entry(tid, T0))
    rec = store.create_request(a_request(tid), an_entry(tid, T0))
    cert = issued(store, tid, 41)
    before = audit_of(store, tid)
    fresh = a_request(tid, state="issued", serial=42)
    writes = {
        "create_policy": lambda e: store.create_policy(a_policy(tid, "db"), e),
        "replace_policy": lambda e: store.replace_policy(replace(policy, name="X"), policy.etag, e),
        "create_request": lambda e: store.create_request(a_request(tid), e),
        "update_request": lambda e: store.update_request(replace(rec, state="denied"), rec.etag, e),
        "record_issuance": lambda e: store.record_issuance(fresh, None, a_cert(fresh, 42), [e]),
        "revoke_certificate": lambda e: store.revoke_certificate(replace(cert, revoked_at=1, revoked_by="c"),
                                                                 cert.etag, e),
    }
    for name, write in writes.items():
        for stranger in (an_entry(other, T0 + 1, "stray"), an_entry(None, T0 + 1, "stray")):
            with pytest.raises(ValueError):
                write(stranger)
    assert [p.id for p in store.list_policies(tid)] == ["web"] and store.get_policy(tid, "web").etag == policy.etag
    assert [r.id for r in store.list_requests(tid)] == sorted([rec.id, cert.request_id])
    assert store.get_certificate(tid, "web", 41).revoked_at is None
    with pytest.raises(NotFound):
        store.get_certificate(tid, "web", 42)
    assert audit_of(store, tid) == before and audit_of(store, other) == []


def test_host_writes_stay_in_one_partition_and_a_gone_token_is_not_found(store: Store, tid: str) -> None:
    other = str(uuid.uuid4())
    with pytest.raises(ValueError):
        store.create_host_enrolment_token(a_token(tid), an_entry(other, T0, "stray"))
    token = store.create_host_enrolment_token(a_token(tid), an_entry(tid, T0))
    cert, key = a_host_cert(tid, 501)
    theirs, _ = a_host_cert(other, 502)
    used = replace(token, used_at=int(T0) + 1, used_by="SHA256:hostkey")
    with pytest.raises(ValueError):  # the audit entry in another tenant's partition
        store.record_host_issuance([cert], [key], [an_entry(other, T0 + 1, "stray")], used)
    with pytest.raises(ValueError):  # a certificate of another tenant in the same write
        store.record_host_issuance([cert, theirs], [key], [an_entry(tid, T0 + 1, "stray")], used)
    ghost = replace(a_token(tid), etag=token.etag, used_at=int(T0) + 1)  # never stored
    with pytest.raises(NotFound):
        store.record_host_issuance([cert], [key], [an_entry(tid, T0 + 1, "stray")], ghost)
    for serial, t in ((501, tid), (502, other)):
        with pytest.raises(NotFound):
            store.get_certificate(t, "web", serial)
    assert store.get_host_key(tid, "web", "SHA256:hostkey") is None
    assert store.get_host_enrolment_token(tid, token.token_hash).used_at is None
    assert [e.action for e in audit_of(store, tid)] == ["test.event"] and audit_of(store, other) == []


def test_expired_host_challenges_are_deleted_and_others_stay(store: Store, tid: str) -> None:
    def challenge(expires: int) -> HostChallenge:
        return store.create_host_challenge(HostChallenge(
            tenant_id=tid, policy_id="web", id=uuid.uuid4().hex, nonce="n", fingerprints=("SHA256:a",),
            created_at=int(T0), expires_at=expires))

    old = [challenge(int(T0) + 10) for _ in range(3)]
    live = challenge(int(T0) + 1000)
    other_tenant = str(uuid.uuid4())
    store.create_host_challenge(HostChallenge(tenant_id=other_tenant, policy_id="web", id=uuid.uuid4().hex,
                                              nonce="n", fingerprints=("SHA256:a",), created_at=int(T0),
                                              expires_at=int(T0) + 10))
    assert store.delete_expired_host_challenges(tid, int(T0) + 500) == 3
    for ch in old:
        with pytest.raises(NotFound):
            store.get_host_challenge(tid, ch.id)
    assert store.get_host_challenge(tid, live.id).id == live.id
    assert store.delete_expired_host_challenges(tid, int(T0) + 500) == 0  # nothing left to remove
    assert store.delete_expired_host_challenges(other_tenant, int(T0) + 500) == 1  # per tenant


def test_revocations_of_the_first_layout_are_read_until_moved(table_store, tid: str) -> None:
    """Table Storage only: rows rev|<policy>|<serial> (not keyed by expiry) written before the index
    are still in every KRL, and housekeeping moves them without changing what is read."""
    store = table_store
    legacy = []
    for serial, request_id, end in ((81, "r81", int(T0) + 100), (82, "", int(T0) + 5000), (83, "r83", int(T0) + 9000)):
        row = {"PartitionKey": tid, "RowKey": f"rev|web|{serial:019d}", "Kind": "revoked", "PolicyId": "web",
               "Serial": str(serial), "RequestId": request_id, "CertKeyId": "k", "RequesterOid": "o",
               "RequesterUpn": "u", "Host": "web1", "Principals": "[]", "ValidAfter": int(T0), "ValidBefore": end,
               "CaFingerprint": "SHA256:abc", "PublicKeyFingerprint": "SHA256:x", "Certificate": "c",
               "RevokedAt": int(T0) + serial, "RevokedBy": "carol"}
        store._table.create_entity(row)
        legacy.append(serial)
    revoke(store, issued(store, tid, 84), T0 + 50)  # one written with the index, earlier than the old ones
    before = {r.serial: r.host for r in store.list_revoked(tid, "web", valid_from=0)}
    assert before == {81: False, 82: True, 83: False, 84: False}  # a row without a request is a host's
    assert [r.serial for r in store.list_revoked_host(tid, valid_from=0)] == [82]
    assert store.migrate_revocations(tid, limit=2) == 2
    assert store.migrate_revocations(tid) == 1
    assert store.migrate_revocations(tid) == 0
    assert not list(store._table.query_entities("PartitionKey eq @pk and RowKey ge 'rev|' and RowKey lt 'rev}'",
                                                parameters={"pk": tid}))
    assert {r.serial: r.host for r in store.list_revoked(tid, "web", valid_from=0)} == before
    assert sorted(r.serial for r in store.list_revoked(tid, "web", valid_from=int(T0) + 101)) == [82, 83, 84]
    assert [r.serial for r in store.list_revoked_host(tid, valid_from=0)] == [82]
    assert sorted(r.serial for r in store.list_revoked_since(tid, "web", revoked_from=0)) == [81, 82, 83, 84]
    # the policy's version: the latest revocation among the moved ones (a KRL's version never goes back)
    assert store.trust_version(tid, "web").at == int(T0) + 83


# ---- request indexes ------------------------------------------------------------------------------
# What the indexes promise (functions/storage/base.py): newest first; a request is in its user's
# index from its creation through a decision (not when issued at once), and in the open indexes of
# its user and its policy while pending or approved; every change of the request changes its copies
# in the same write; expiry keys stay until removed; old rows join once backfilled or changed.


def seed_legacy(store: Store, rec: RequestRecord, *, issued_at_once: bool = False) -> RequestRecord:
    """A request row as written before the indexes existed (no index rows, no Ix marker)."""
    if isinstance(store, MemoryStore):
        return store.put_legacy_request(rec, issued_at_once=issued_at_once)
    entity = {k: v for k, v in store._request_entity(rec).items() if k != "Ix"}  # type: ignore[attr-defined]
    entity["Audit0"] = "{}"
    if issued_at_once:
        entity["Audit1"] = "{}"
    meta = store._table.create_entity(entity)  # type: ignore[attr-defined]
    return replace(rec, etag=meta.get("etag"), indexed=False)


def ids_in(store: Store, tid: str, index: str, key: str, **kw) -> list[str]:
    return [r.id for r in store.list_request_index(tid, index, key, **kw)]


def test_request_indexes_follow_every_change(store: Store, tid: str) -> None:
    from functions.storage.base import BY_USER, OPEN_BY_POLICY, OPEN_BY_USER, OPEN_IN_TENANT

    reqs = [store.create_request(a_request(tid, new_request_id(T0 + i), requester_oid=oid, policy_id=pid,
                                           state=state), an_entry(tid, T0 + i))
            for i, (oid, pid, state) in enumerate([("oid-a", "web", "pending"), ("oid-b", "web", "pending"),
                                                   ("oid-a", "db", "approved"), ("oid-a", "web", "pending")])]
    a0, b1, a2, a3 = (r.id for r in reqs)
    other = str(uuid.uuid4())
    store.create_request(a_request(other, requester_oid="oid-a"), an_entry(other, T0))
    assert ids_in(store, tid, BY_USER, "oid-a") == [a3, a2, a0]  # newest first, this tenant only
    assert ids_in(store, tid, OPEN_BY_USER, "oid-b") == [b1]
    assert ids_in(store, tid, OPEN_BY_POLICY, "web") == [a3, b1, a0]
    assert ids_in(store, tid, OPEN_IN_TENANT, "*") == [a3, a2, b1, a0]
    listed = store.list_request_index(tid, OPEN_BY_POLICY, "web")
    assert listed[0] == reqs[3] and listed[0].etag is None  # a copy: read the request to change it
    # pages: at most `limit`, then on from the position of the last one
    from functions.storage.base import index_position
    first = store.list_request_index(tid, OPEN_BY_POLICY, "web", limit=2)
    assert [r.id for r in first] == [a3, b1]
    assert ids_in(store, tid, OPEN_BY_POLICY, "web", after=index_position(first[-1]), limit=2) == [a0]
    assert ids_in(store, tid, OPEN_BY_POLICY, "web", after=index_position(reqs[0])) == []
    # an approval the request is still pending after changes the copies; a denial closes it
    approved = store.update_request(replace(reqs[3], approvals=(Approval("oid-b", tid, "b@x", int(T0)),)),
                                    reqs[3].etag or "", an_entry(tid, T0 + 10))
    assert [len(r.approvals) for r in store.list_request_index(tid, OPEN_BY_USER, "oid-a")] == [1, 0, 0]
    store.update_request(replace(approved, state="denied"), approved.etag or "", an_entry(tid, T0 + 11))
    assert ids_in(store, tid, OPEN_BY_POLICY, "web") == [b1, a0]
    assert ids_in(store, tid, OPEN_BY_USER, "oid-a") == [a2, a0]
    assert ids_in(store, tid, OPEN_IN_TENANT, "*") == [a2, b1, a0]
    assert [(r.id, r.state) for r in store.list_request_index(tid, BY_USER, "oid-a")][0] == (a3, "denied")
    # the certificate of an approved request closes it too; a request issued at once is in none
    serial = serial_of_request_id(a2)
    issued = replace(reqs[2], state="issued", serial=serial, key_id=f"ezssh/db/{a2}/alice")
    store.record_issuance(issued, reqs[2].etag, a_cert(issued, serial), [an_entry(tid, T0 + 12)])
    at_once = a_request(tid, new_request_id(T0 + 20), requester_oid="oid-a", state="issued")
    at_once = replace(at_once, serial=serial_of_request_id(at_once.id), key_id="k")
    store.record_issuance(at_once, None, a_cert(at_once, at_once.serial), [an_entry(tid, T0 + 20)])
    assert ids_in(store, tid, OPEN_BY_USER, "oid-a") == [a0]
    assert ids_in(store, tid, OPEN_IN_TENANT, "*") == [b1, a0]
    assert ids_in(store, tid, BY_USER, "oid-a") == [a3, a2, a0]
    assert store.list_request_index(tid, BY_USER, "oid-a")[1].state == "issued"


def test_a_failed_write_changes_no_index(store: Store, tid: str) -> None:
    from functions.storage.base import BY_USER, OPEN_BY_POLICY

    rec = store.create_request(a_request(tid, new_request_id(T0)), an_entry(tid, T0))
    with pytest.raises(Conflict):  # a stale ETag: neither the row nor its copies change
        store.update_request(replace(rec, state="denied"), 'W/"stale"', an_entry(tid, T0 + 1))
    with pytest.raises(Conflict):  # the same id again: nothing of the second request is written
        store.create_request(replace(rec, requester_oid="oid-z"), an_entry(tid, T0 + 2))
    assert ids_in(store, tid, OPEN_BY_POLICY, "web") == [rec.id]
    assert ids_in(store, tid, BY_USER, "oid-z") == []


def test_expiry_keys_are_read_by_due_time(store: Store, tid: str) -> None:
    early = store.create_request(a_request(tid, new_request_id(T0), expires_at=int(T0) + 100), an_entry(tid, T0))
    late = store.create_request(a_request(tid, new_request_id(T0 + 1), expires_at=int(T0) + 50),
                                an_entry(tid, T0 + 1))
    assert store.due_requests(tid, int(T0) + 49) == []
    assert store.due_requests(tid, int(T0) + 100) == [(int(T0) + 50, late.id), (int(T0) + 100, early.id)]
    assert store.due_requests(tid, int(T0) + 100, limit=1) == [(int(T0) + 50, late.id)]
    # an approval moves the deadline: a new key; the old one stays for the sweep to drop
    moved = store.update_request(replace(early, state="approved", expires_at=int(T0) + 900), early.etag or "",
                                 an_entry(tid, T0 + 2))
    assert store.due_requests(tid, int(T0) + 1000) == [(int(T0) + 50, late.id), (int(T0) + 100, early.id),
                                                      (int(T0) + 900, moved.id)]
    store.remove_expiry_key(tid, int(T0) + 100, early.id)
    store.remove_expiry_key(tid, int(T0) + 100, early.id)  # gone already is fine
    assert store.due_requests(tid, int(T0) + 1000) == [(int(T0) + 50, late.id), (int(T0) + 900, moved.id)]
    # a decision keeps the deadline and takes its key with it
    store.update_request(replace(late, state="denied"), late.etag or "", an_entry(tid, T0 + 3))
    assert store.due_requests(tid, int(T0) + 1000) == [(int(T0) + 900, moved.id)]
    assert store.due_requests(str(uuid.uuid4()), int(T0) + 1000) == []


def test_pending_slots_are_taken_with_the_request_or_not_at_all(store: Store, tid: str) -> None:
    from functions.storage.base import BY_USER
    from functions.core.records import PendingSlots

    empty = store.get_pending_slots(tid, "web", "oid-alice")
    assert empty == PendingSlots(tid, "web", "oid-alice") and empty.etag is None
    first = a_request(tid, new_request_id(T0))
    store.create_request(first, an_entry(tid, T0), slots=replace(empty, requests=((first.id, first.expires_at),)))
    taken = store.get_pending_slots(tid, "web", "oid-alice")
    assert taken.requests == ((first.id, first.expires_at),) and taken.etag
    # two writers that read the same slots: the second one's request is not written at all
    second, third = a_request(tid, new_request_id(T0 + 1)), a_request(tid, new_request_id(T0 + 2))
    store.create_request(second, an_entry(tid, T0 + 1),
                         slots=replace(taken, requests=(*taken.requests, (second.id, second.expires_at))))
    with pytest.raises(PreconditionFailed):
        store.create_request(third, an_entry(tid, T0 + 2),
                             slots=replace(taken, requests=(*taken.requests, (third.id, third.expires_at))))
    with pytest.raises(PreconditionFailed):  # "no row yet" is an ETag too
        store.create_request(third, an_entry(tid, T0 + 2),
                             slots=replace(empty, requests=((third.id, third.expires_at),)))
    with pytest.raises(NotFound):
        store.get_request(tid, third.id)
    assert ids_in(store, tid, BY_USER, "oid-alice") == [second.id, first.id]
    assert [r for r, _ in store.get_pending_slots(tid, "web", "oid-alice").requests] == [first.id, second.id]
    assert store.get_pending_slots(tid, "db", "oid-alice").requests == ()
    with pytest.raises(ValueError):  # another tenant's slots can't ride along
        store.create_request(third, an_entry(tid, T0 + 2), slots=PendingSlots(str(uuid.uuid4()), "web", "oid-alice"))


def test_old_request_rows_are_indexed_by_a_bounded_backfill(store: Store, tid: str) -> None:
    from functions.storage.base import BY_USER, OPEN_BY_POLICY

    old = [seed_legacy(store, a_request(tid, new_request_id(T0 + i), state=state, expires_at=int(T0) + 100 + i),
                       issued_at_once=state == "issued")
           for i, state in enumerate(["pending", "denied", "issued", "pending", "approved"])]
    uuid_id = seed_legacy(store, a_request(tid, str(uuid.uuid4()), state="pending", created_at=int(T0) - 10))
    assert ids_in(store, tid, BY_USER, "oid-alice") == [] and store.due_requests(tid, int(T0) + 10**6) == []
    # an old row still changes, and that change indexes it (it had no copies to update)
    assert store.get_request(tid, old[3].id).indexed is False
    denied = store.update_request(replace(old[3], state="denied"), old[3].etag or "", an_entry(tid, T0 + 50))
    assert denied.indexed and ids_in(store, tid, BY_USER, "oid-alice") == [old[3].id]
    assert ids_in(store, tid, OPEN_BY_POLICY, "web") == []
    # the backfill reads at most its budget per call, from where it stopped: first the open requests
    # (what approvers and the sweep need), then the rest (six rows: four to index, old[2] was issued
    # at once, old[3] indexed by its change)
    assert store.backfill_request_indexes(tid, 3) == (3, False)  # old[0], old[4], the uuid id: open
    assert ids_in(store, tid, OPEN_BY_POLICY, "web") == [old[4].id, old[0].id, uuid_id.id]
    assert old[1].id not in ids_in(store, tid, BY_USER, "oid-alice")
    runs = [store.backfill_request_indexes(tid, 3) for _ in range(3)]  # no more open, then 6 rows in all
    assert [done for _, done in runs] == [False, False, True] and sum(n for n, _ in runs) == 1  # old[1]
    assert ids_in(store, tid, BY_USER, "oid-alice") == [old[4].id, old[3].id, old[1].id, old[0].id, uuid_id.id]
    assert ids_in(store, tid, OPEN_BY_POLICY, "web") == [old[4].id, old[0].id, uuid_id.id]
    assert ids_in(store, tid, "tenant-open", "*") == [old[4].id, old[0].id, uuid_id.id]
    assert store.due_requests(tid, int(T0) + 10**6) == sorted(
        [(r.expires_at, r.id) for r in (old[0], old[4], uuid_id)])
    assert store.get_request(tid, old[0].id).indexed
    # a fresh tenant has nothing to do
    assert store.backfill_request_indexes(str(uuid.uuid4()), 3) == (0, True)
# ---- live certificates of a person or app (revocation by identity, leavers) ----------------------


def test_live_user_certificates_are_those_of_the_window_still_valid_and_not_revoked(store: Store, tid: str) -> None:
    now = int(T0)

    def issue(at: float, oid: str, valid_for: int, policy: str = "web") -> CertificateRecord:
        rec = a_request(tid, new_request_id(at), state="issued", requester_oid=oid, policy_id=policy,
                        created_at=int(at))
        rec = replace(rec, serial=serial_of_request_id(rec.id), key_id=f"ezssh/{policy}/{rec.id}/x")
        cert = a_cert(rec, rec.serial, valid_after=int(at) - 60, valid_before=int(at) + valid_for)
        store.record_issuance(rec, None, cert, [an_entry(tid, at, "certificate.issued", request_id=rec.id)])
        return cert

    live = issue(now - 600, "oid-bob", 3600)
    other_policy = issue(now - 500, "oid-bob", 3600, policy="db")
    issue(now - 7200, "oid-bob", 3600)  # expired an hour ago
    too_old = issue(now - 5 * 86400, "oid-bob", 10 * 86400)  # outside the window asked for
    alices = issue(now - 300, "oid-alice", 3600)
    revoked = issue(now - 200, "oid-bob", 3600)
    stored = store.get_certificate(tid, "web", revoked.serial)
    store.revoke_certificate(replace(stored, revoked_at=now, revoked_by="carol"), stored.etag or "",
                             an_entry(tid, now, "certificate.revoked", serial=str(revoked.serial)))
    pending = a_request(tid, new_request_id(now - 100), requester_oid="oid-bob")  # no certificate
    store.create_request(pending, an_entry(tid, now - 100, "request.created", request_id=pending.id))
    store.create_request(a_request(other_tid := tid + "-x", new_request_id(now - 50), requester_oid="oid-bob"),
                         an_entry(other_tid, now - 50, "request.created"))

    got = store.live_user_certificates(tid, now, 2 * 86400, requester_oid="oid-bob")
    assert sorted(c.serial for c in got) == sorted([live.serial, other_policy.serial])
    assert all(c.etag for c in got) and {c.policy_id for c in got} == {"web", "db"}
    assert {c.serial for c in store.live_user_certificates(tid, now, 2 * 86400)} == \
        {live.serial, other_policy.serial, alices.serial}
    assert too_old.serial in {c.serial for c in store.live_user_certificates(tid, now, 6 * 86400)}
    # the ETag it carries revokes it
    c = got[0]
    store.revoke_certificate(replace(c, revoked_at=now, revoked_by="x"), c.etag or "",
                             an_entry(tid, now + 1, "certificate.revoked", serial=str(c.serial)))
    assert len(store.live_user_certificates(tid, now, 2 * 86400, requester_oid="oid-bob")) == 1


def test_host_namespaces_first_write_then_etag_guarded(store: Store, tid: str) -> None:
    assert store.get_host_namespaces(tid) is None
    ns = HostNamespaces(tenant_id=tid, namespaces=("*.contoso.internal", "10.20.0.0/16"), updated_at=int(T0),
                        updated_by_oid="oid-carol", updated_by_upn="carol@example.com")
    first = store.put_host_namespaces(ns, None, an_entry(tid, T0, "host_namespaces.changed"))
    got = store.get_host_namespaces(tid)
    assert got is not None and got.namespaces == ns.namespaces and got.etag == first.etag
    # a second first write (a racing admin) and a stale ETag both write nothing, audit included
    before = audit_of(store, tid)
    with pytest.raises(Conflict):
        store.put_host_namespaces(replace(ns, namespaces=("*",)), None, an_entry(tid, T0 + 1, "host_namespaces.changed"))
    second = store.put_host_namespaces(replace(ns, namespaces=("*.fabrikam.internal",)), first.etag,
                                       an_entry(tid, T0 + 2, "host_namespaces.changed"))
    with pytest.raises(PreconditionFailed):
        store.put_host_namespaces(replace(ns, namespaces=("*",)), first.etag,
                                  an_entry(tid, T0 + 3, "host_namespaces.changed"))
    assert store.get_host_namespaces(tid).namespaces == ("*.fabrikam.internal",)  # type: ignore[union-attr]
    assert second.etag != first.etag
    assert len(audit_of(store, tid)) == len(before) + 1
    # one tenant's namespaces are not another's
    assert store.get_host_namespaces(str(uuid.uuid4())) is None


def test_host_namespaces_written_move_the_tenants_version(store: Store, tid: str) -> None:
    """Known-hosts is scoped to the namespaces: their write changes the version it is kept by."""
    from functions.core.records import HostNamespaces

    before = store.trust_version(tid)
    ns = store.put_host_namespaces(HostNamespaces(tenant_id=tid, namespaces=("*.contoso.test",), updated_at=int(T0),
                                                  updated_by_oid="o", updated_by_upn="u"), None, an_entry(tid, T0))
    first = store.trust_version(tid)
    assert first.tag not in ("", before.tag) and first.at == int(T0)
    with pytest.raises(PreconditionFailed):  # a lost race changes no version
        store.put_host_namespaces(replace(ns, namespaces=("*.x.test",)), 'W/"stale"', an_entry(tid, T0 + 1))
    assert store.trust_version(tid) == first
    store.put_host_namespaces(replace(ns, namespaces=("*.x.test",)), ns.etag or "", an_entry(tid, T0 + 2))
    assert store.trust_version(tid).tag not in ("", first.tag)


def test_revocations_since_a_time_whatever_their_expiry(store: Store, tid: str) -> None:
    """list_revoked_since: by time of revocation (what changed since a KRL was built), per policy."""
    at = {91: int(T0) + 10, 92: int(T0) + 20, 93: int(T0) + 30}
    for serial, when in at.items():
        rec = a_request(tid, state="issued", serial=serial)
        store.record_issuance(rec, None, a_cert(rec, serial, valid_before=int(T0) - 99_999 if serial == 92 else
                                                int(T0) + 3600), [an_entry(tid, T0 + serial / 1000)])
        revoke(store, store.get_certificate(tid, "web", serial), when)
    revoke(store, issued(store, tid, 94, "web-prod"), T0 + 25)
    for since, expect in ((0, [91, 92, 93]), (int(T0) + 11, [92, 93]), (int(T0) + 20, [92, 93]),
                          (int(T0) + 31, [])):
        got = store.list_revoked_since(tid, "web", revoked_from=since)
        assert sorted(r.serial for r in got) == expect, since
        assert all((r.revoked_at, r.policy_id) == (at[r.serial], "web") for r in got)
    assert [r.serial for r in store.list_revoked_since(tid, "web-prod", revoked_from=0)] == [94]
    assert store.list_revoked_since(str(uuid.uuid4()), "web", revoked_from=0) == []
