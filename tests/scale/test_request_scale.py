"""On the real Table Storage client against Azurite: what the approver's pending list, a user's own
requests and the expiry sweep read does not grow with the tenant's history, and the pending cap
holds when fifty requests arrive at once.

Rows read are counted by an azure-core response hook on the store's own client (every GET: the
entities a query page returned, or the one entity of a point read), so the count is what Table
Storage served, not what the code under test says it asked for."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

import pytest

from functions.core import requests as sm
from functions.core import serials
from functions.core.errors import Conflict, TooManyPending
from functions.core.evaluation import AccessRequest
from functions.service import Service, ServiceConfig
from tests.contract.test_store import race
from tests.service.helpers import ALICE, BOB, CAROL, DAVE, T0


@dataclass
class RowsRead:
    rows: int = 0
    calls: int = 0

    def __call__(self, response) -> None:  # type: ignore[no-untyped-def]
        if response.http_request.method != "GET" or response.http_response.status_code != 200:
            return
        self.calls += 1
        body = json.loads(response.http_response.text() or "null")
        self.rows += len(body["value"]) if isinstance(body, dict) and "value" in body else 1

    def during(self, fn):  # type: ignore[no-untyped-def]
        self.rows = self.calls = 0
        result = fn()
        return result, self.rows


def table_store(azurite, hook=None):  # type: ignore[no-untyped-def]
    from azure.data.tables import TableServiceClient

    from functions.storage.tables import TableStore

    opts = {"raw_response_hook": hook} if hook else {}
    store = TableStore(TableServiceClient.from_connection_string(azurite.connection_string, **opts),
                       f"scale{uuid.uuid4().hex[:12]}")
    store.ensure_table()
    return store


def seed_history(store, n: int, tid: str) -> None:  # type: ignore[no-untyped-def]
    """n past requests written as the service leaves them: decided (denied, expired, issued after
    approval: the row and the requester's copy) and issued at once (the row only), in batches."""
    ops: list = []
    others = [str(uuid.uuid4()) for _ in range(10)]
    for i in range(n):
        rid = serials.new_request_id(T0 - 30 * 86400 + i * 60)
        kind = i % 4
        requester = ALICE.oid if kind != 1 else others[i % 10]
        rec = sm.RequestRecord(
            id=rid, tenant_id=tid, policy_id="web" if kind == 2 else "gated", requester_oid=requester,
            requester_upn="someone@contoso.test", host="web1", principal="alice", ttl_seconds=3600,
            state=("denied", "issued", "issued", "expired")[kind], created_at=int(T0) - 30 * 86400 + i * 60,
            expires_at=int(T0) - 30 * 86400 + i * 60 + 600, approvals_required=0 if kind == 2 else 1)
        if kind == 2:  # issued at once: one insert of its row
            ops.append(("create", store._request_entity(rec)))
        else:
            ops += [("create", store._request_entity(rec)), *store._index_ops(rec, new=True)]
        if len(ops) >= 98 or i == n - 1:
            store._table.submit_transaction(ops)
            ops = []


@pytest.fixture
def measure(azurite, keys, make_policy_on, clock):  # type: ignore[no-untyped-def]
    """A tenant with `history` past requests and three pending now; what each call reads."""

    def run(history: int) -> dict[str, int]:
        counter = RowsRead()
        store = table_store(azurite, counter)
        # the policy cache held for the test (a reload when it ages is the same few rows at any size)
        service = Service(store, keys, ServiceConfig(signer_backend="pkcs11", policy_cache_seconds=3600), clock=clock)
        make_policy_on(store, "gated", "approval", request_ttl=600)
        make_policy_on(store, "web")
        seed_history(store, history, ALICE.tid)
        ask = lambda who: service.issuance.request_access(  # noqa: E731
            who, AccessRequest(host="web1", principal=who.upn.split("@")[0], policy_id="gated"), None)
        ask(ALICE)
        ask(BOB)
        read = {}
        _, read["request needing approval"] = counter.during(lambda: ask(ALICE))  # her pending slots: one row
        page, read["pending list"] = counter.during(
            lambda: service.requests.list(DAVE, role="approver", state="pending", limit=20))
        assert len(page.requests) == 3 and page.next is None
        page, read["tenant admin's list"] = counter.during(lambda: service.requests.list(CAROL, limit=20))
        assert len(page.requests) == 3 and page.next is None
        page, read["my requests"] = counter.during(lambda: service.requests.list(ALICE, role="requester", limit=5))
        assert len(page.requests) == 5 and page.next  # she has more than a page at either size
        clock.advance(601)  # the three pending ones are due
        done, read["expiry sweep"] = counter.during(lambda: service.requests.expire(ALICE.tid))
        assert len(done) == 3
        _, read["sweep, nothing due"] = counter.during(lambda: service.requests.expire(ALICE.tid))
        return read

    return run


def test_lists_and_the_sweep_read_the_same_rows_at_100_times_the_history(measure):
    small, large = measure(20), measure(2000)
    assert large == small, (small, large)
    assert small["pending list"] <= 3 + 5  # its 3 rows, the policies (2) and their version
    assert small["request needing approval"] == 1
    assert small["tenant admin's list"] <= 3 + 5
    assert small["my requests"] == 5 + 1  # a page, and one more row to know there is more
    assert small["expiry sweep"] <= 3 * 3 + 2  # per due request: its key, its row, its policy
    assert small["sweep, nothing due"] == 0


def test_fifty_requests_at_once_never_pass_the_pending_cap(azurite, keys, make_policy_on, clock):
    store = table_store(azurite)
    service = Service(store, keys, ServiceConfig(signer_backend="pkcs11", request_rate=1000), clock=clock)
    make_policy_on(store, "gated", "approval", request_ttl=600)
    cap = service.base.config.max_pending_requests
    n = 50
    results = race(n, lambda i: service.issuance.request_access(ALICE, AccessRequest(
        host="web1", principal="alice", policy_id="gated", reason=f"attempt {i}"), None).status)
    pending = [r for r in store.list_requests(ALICE.tid) if r.state == sm.PENDING]
    assert len(pending) == cap, results
    assert results.count("pending") == cap
    assert all(isinstance(r, (TooManyPending, Conflict)) for r in results if r != "pending"), results
    assert sum(isinstance(r, TooManyPending) for r in results) >= n - cap - 5
    slots = store.get_pending_slots(ALICE.tid, "gated", ALICE.oid)
    assert sorted(rid for rid, _ in slots.requests) == sorted(r.id for r in pending)
