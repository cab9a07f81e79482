"""Request lists by index (approver's open requests, the user's own), paged with a continuation
token; the expiry sweep by expiry key; the pending cap by slots; the policy cache on refusals."""

from __future__ import annotations

import pytest

from functions.core.errors import Conflict, Denied, InvalidRequest, NoPolicyForHost, TooManyPending
from functions.core.evaluation import AccessRequest
from functions.service import Service, ServiceConfig
from tests.memstore import MemoryStore

from .helpers import ALICE, BOB, DAVE, PAT


@pytest.fixture
def ask(service, make_policy, clock):
    made: set[str] = set()

    def ask(pid: str = "gated", requester=ALICE, **kw) -> str:
        if pid not in made:
            make_policy(pid, "approval", request_ttl=600, **kw)
            made.add(pid)
        out = service.issuance.request_access(requester, AccessRequest(
            host="web1", principal=requester.upn.split("@")[0], policy_id=pid), None)
        assert out.status == "pending"
        clock.advance(1)
        return out.request.id

    return ask


def every_page(service, who, limit: int, **kw) -> list[list[str]]:
    pages, token = [], None
    while True:
        page = service.requests.list(who, limit=limit, continuation=token, **kw)
        pages.append([r.id for r in page.requests])
        token = page.next
        if token is None:
            return pages


def test_an_approvers_pages_merge_every_policy_newest_first(service, ask, clock):
    made = []
    for i in range(7):  # requests of two policies and two requesters, interleaved in time
        made.append(ask("gated" if i % 3 else "other", requester=ALICE if i % 2 else BOB))
    for limit in (1, 2, 3, 7, 100):
        pages = every_page(service, DAVE, limit, role="approver", state="pending")
        flat = [rid for p in pages for rid in p]
        assert flat == made[::-1], limit  # each exactly once, newest first
        assert all(len(p) <= limit for p in pages)
    # bob approves: his own requests are not in his list, and pages still end
    bobs = [rid for rid in every_page(service, BOB, 2, role="approver", state="pending") for rid in rid]
    assert bobs == [rid for i, rid in enumerate(made) if i % 2][::-1]


def test_a_wide_scope_reads_the_tenants_open_requests_once(service, store, ask, make_policy, monkeypatch):
    from functions.service.requests import MAX_POLICY_SOURCES

    pids = [f"wide{i}" for i in range(MAX_POLICY_SOURCES + 2)]
    made = [ask(pid, requester=ALICE if i % 2 else BOB) for i, pid in enumerate(pids * 2)]
    make_policy("elsewhere", "approval", approvers={"users": [PAT.oid]})  # dave does not approve it
    hidden = service.issuance.request_access(BOB, AccessRequest(host="web1", principal="bob",
                                                                policy_id="elsewhere"), None).request.id
    reads: list = []
    real = store.list_request_index
    monkeypatch.setattr(store, "list_request_index", lambda *a, **kw: reads.append(a[1:3]) or real(*a, **kw))
    for limit in (1, 3, 100):
        pages = every_page(service, DAVE, limit, role="approver", state="pending")
        assert [rid for p in pages for rid in p] == made[::-1] and hidden not in made, limit
    assert set(reads) == {("tenant-open", "*")}
    reads.clear()
    assert [r.id for r in service.requests.list(PAT, role="approver").requests] == [hidden]
    assert set(reads) == {("policy-open", "elsewhere")}


def test_my_requests_are_all_of_mine_in_every_state_newest_first(service, ask, clock, make_policy, user_key):
    first, second, third = ask(), ask(), ask("other")
    service.requests.deny(DAVE, first)
    service.requests.approve(BOB, second)
    make_policy("web")
    service.issuance.request_access(ALICE, AccessRequest(host="web1", principal="alice", policy_id="web"), user_key())
    ids = lambda **kw: [r.id for r in service.requests.list(ALICE, role="requester", **kw).requests]  # noqa: E731
    assert ids() == [third, second, first]  # the certificate issued at once is in the audit, not here
    assert ids(state="pending") == [third]
    assert ids(state="approved") == [second]
    assert ids(state="denied") == [first]
    clock.advance(15 * 60 + 1)  # both open ones are now past their deadline
    assert ids(state="expired") == [third, second] and ids(state="pending") == []


@pytest.mark.parametrize("kw, message", [
    (dict(limit=0), "limit"), (dict(limit=1001), "limit"), (dict(role="auditor"), "role"),
    (dict(state="lost"), "state"), (dict(continuation="bm9wZQ"), "continuation"),
    (dict(continuation="!!"), "continuation"), (dict(continuation="eyJhZnRlciI6IDF9"), "continuation"),
    (dict(role="approver", state="denied"), "audit"),
])
def test_bad_list_arguments_are_clear_errors(service, kw, message):
    with pytest.raises(InvalidRequest) as err:
        service.requests.list(ALICE, **kw)
    assert message in err.value.message


def test_the_sweep_expires_what_is_due_and_drops_keys_that_moved(service, store, ask, clock):
    waiting, approved = ask(), ask()
    service.requests.approve(BOB, approved)  # its deadline moves: now + 15 minutes
    clock.advance(600)
    assert service.requests.expire(ALICE.tid) == [waiting]  # the approved one's old key is dropped
    assert store.get_request(ALICE.tid, approved).state == "approved"
    assert [rid for _, rid in store.due_requests(ALICE.tid, int(clock()) + 10**6)] == [approved]
    clock.advance(15 * 60)
    assert service.requests.expire(ALICE.tid) == [approved]
    assert store.due_requests(ALICE.tid, int(clock()) + 10**6) == []


def test_the_sweep_reads_at_most_its_batch(service, store, ask, clock):
    made = [ask() for _ in range(5)]
    clock.advance(600)
    assert service.requests.expire(ALICE.tid, limit=2) == made[:2]
    assert service.requests.expire(ALICE.tid, limit=2) == made[2:4]
    assert service.requests.expire(ALICE.tid) == made[4:]


def test_the_pending_cap_frees_a_slot_when_a_request_is_decided(service, store, ask):
    made = [ask() for _ in range(5)]
    with pytest.raises(TooManyPending):
        ask()
    service.requests.deny(DAVE, made[0])
    sixth = ask()
    slots = store.get_pending_slots(ALICE.tid, "gated", ALICE.oid)
    assert [rid for rid, _ in slots.requests] == made[1:] + [sixth]
    ask("other")  # the cap is per policy
    assert ask(requester=BOB)  # and per user


def test_an_expired_slot_is_free_without_reading_its_request(service, store, ask, clock):
    for _ in range(5):
        ask()
    clock.advance(600)
    reads = []
    get = store.get_request
    store.get_request = lambda *a: reads.append(a) or get(*a)  # type: ignore[method-assign]
    ask()
    assert reads == []


class CountingStore(MemoryStore):
    def __init__(self) -> None:
        super().__init__()
        self.policy_lists = 0

    def list_policies(self, tenant_id):
        self.policy_lists += 1
        return super().list_policies(tenant_id)


def test_a_refusal_keeps_the_policy_cache_until_a_policy_changes(keys, clock, make_policy_on):
    store = CountingStore()
    service = Service(store, keys, ServiceConfig(signer_backend="pkcs11", policy_cache_seconds=3600), clock=clock)
    make_policy_on(store, "web", hosts=["web*"])
    nowhere = AccessRequest(host="db1", principal="alice")
    for _ in range(3):
        with pytest.raises(NoPolicyForHost):
            service.issuance.request_access(ALICE, nowhere, None)
    assert store.policy_lists == 1  # read once; each refusal only asked whether any policy changed
    make_policy_on(store, "db", hosts=["db*"])  # on another worker: this one's cache is now stale
    out = service.issuance.request_access(ALICE, nowhere, None)
    assert out.request.policy_id == "db" and store.policy_lists == 2
    with pytest.raises(Denied):
        service.issuance.request_access(PAT, nowhere, None)
    assert store.policy_lists == 2


def test_requests_at_once_never_pass_the_cap_in_memory(service, store, ask):
    from tests.contract.test_store import race

    ask()  # the policy, and one pending request
    results = race(20, lambda i: service.issuance.request_access(ALICE, AccessRequest(
        host="web1", principal="alice", policy_id="gated"), None).status)
    assert all(r == "pending" or isinstance(r, (TooManyPending, Conflict)) for r in results), results
    assert results.count("pending") == 4, results
    assert len([r for r in store.list_requests(ALICE.tid) if r.state == "pending"]) == 5


def test_old_request_rows_join_the_lists_through_the_housekeeping_timer(service, store, make_policy, clock):
    from functions.core import requests as sm
    from functions.core import serials

    make_policy("gated", "approval", request_ttl=600)
    now = int(clock())
    old = [store.put_legacy_request(sm.RequestRecord(
        id=serials.new_request_id(clock() - 100 + i), tenant_id=ALICE.tid, policy_id="gated", requester_oid=ALICE.oid,
        requester_upn=ALICE.upn, host="web1", principal="alice", ttl_seconds=3600, state=state,
        created_at=now - 100 + i, expires_at=now + 500 + i, approvals_required=1))
        for i, state in enumerate(["pending", "denied", "pending"])]
    listed = lambda: [r.id for r in service.requests.list(DAVE, role="approver").requests]  # noqa: E731
    assert listed() == []  # not yet indexed, but they work: a decision indexes one
    service.requests.approve(BOB, old[2].id)
    assert listed() == [old[2].id]
    assert service.housekeeping([ALICE.tid])["indexed_requests"] == 2  # old[0] (open: first), old[1]
    assert listed() == [old[2].id, old[0].id]
    assert [r.id for r in service.requests.list(ALICE, role="requester").requests] == [r.id for r in old[::-1]]
    assert service.housekeeping([ALICE.tid])["indexed_requests"] == 0
    clock.advance(600)  # the old pending one is swept by its expiry key like any other
    assert service.requests.expire(ALICE.tid) == [old[0].id]
