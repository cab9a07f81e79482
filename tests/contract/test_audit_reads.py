"""What an audit question costs on Table Storage: the rows it reads are bounded by its page, not by
the tenant's history. TableStore runs against Azurite; a hook on the real SDK client counts every
row each response carries and records every query's filter (a filter on anything but the keys makes
the service scan, whatever it returns)."""

from __future__ import annotations

import json
import random
import re
import uuid
from dataclasses import replace
from urllib.parse import parse_qs, urlparse

import pytest

from functions.core.serials import new_request_id, serial_of_request_id
from functions.core.audit import AuditEntry, link
from functions.storage.base import AuditQuery
from tests.contract.test_store import a_cert, a_request

T0 = 1_790_000_000.0
USERS = [str(uuid.UUID(int=0xA0000 + i)) for i in range(12)]
LIMIT = 20


class Reads:
    """raw_response_hook: rows read and queries made since `reset()`."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.rows, self.filters = 0, []

    def __call__(self, response) -> None:
        req, res = response.http_request, response.http_response
        if req.method != "GET" or res.status_code != 200:
            return
        body = json.loads(res.text() or "{}")
        self.rows += len(body["value"]) if "value" in body else 1
        self.filters += parse_qs(urlparse(req.url).query).get("$filter", [])


@pytest.fixture(scope="module")
def counted(azurite):
    from azure.data.tables import TableServiceClient

    from functions.storage.tables import CLIENT_OPTIONS, TableStore

    reads = Reads()
    service = TableServiceClient.from_connection_string(azurite.connection_string, **CLIENT_OPTIONS,
                                                        raw_response_hook=reads)
    store = TableStore(service, f"auditreads{uuid.uuid4().hex[:10]}")
    store.ensure_table()
    return store, reads


def entry(tid: str, at: float, action: str, actor: str, **kw) -> AuditEntry:
    return AuditEntry(tenant_id=tid, at=at, action=action, outcome="ok", actor_oid=actor, actor_upn=f"{actor[-4:]}@x",
                      **kw).sealed()


def seed(store, tid: str, n: int, rng: random.Random) -> dict:
    """`n` requests of a busy tenant written as the service writes them, one second apart: most issued
    at once (one insert carrying its two entries), every fifth approved first (created, approved,
    issued), refusals in between; policy "rare" has one request in the middle."""
    picked: dict = {}
    for i in range(n):
        t = T0 + i
        user = USERS[i % len(USERS)]
        pid = "rare" if i == n // 2 else "web"
        rec = replace(a_request(tid, new_request_id(t), policy_id=pid, requester_oid=user), created_at=int(t))
        serial = serial_of_request_id(rec.id)
        key_id = f"ezssh/{pid}/{rec.id}/{user[-4:]}@x"
        created = link(entry(tid, t, "request.created", user, request_id=rec.id, policy_id=pid, chain=f"req:{rec.id}"),
                       None)
        if i % 5:
            issued = link(entry(tid, t + 0.003, "certificate.issued", user, request_id=rec.id, policy_id=pid,
                                serial=str(serial), key_id=key_id, chain=f"req:{rec.id}"), created)
            final = replace(rec, state="issued", serial=serial, key_id=key_id)
            store.record_issuance(final, None, a_cert(final, serial, key_id=key_id), [created, issued])
        else:
            saved = store.create_request(replace(rec, audit_head=created.hash), created)
            approved = link(entry(tid, t + 0.2, "request.approved", USERS[-1], request_id=rec.id, policy_id=pid,
                                  chain=f"req:{rec.id}"), created)
            saved = store.update_request(replace(saved, state="approved"), saved.etag, approved)
            issued = link(entry(tid, t + 0.4, "certificate.issued", user, request_id=rec.id, policy_id=pid,
                                serial=str(serial), key_id=key_id, chain=f"req:{rec.id}"), approved)
            final = replace(saved, state="issued", serial=serial, key_id=key_id)
            store.record_issuance(final, saved.etag, a_cert(final, serial, key_id=key_id), [issued])
            store.add_audit(entry(tid, t + 0.6, "request.refused", rng.choice(USERS), policy_id=pid))
        if i == n // 2:
            picked = {"request_id": rec.id, "serial": str(serial), "key_id": key_id, "approved": bool(i % 5 == 0)}
    return picked


def questions(picked: dict) -> dict[str, AuditQuery]:
    return {
        "request": AuditQuery(request_id=picked["request_id"]),
        "serial": AuditQuery(serial=picked["serial"]),
        "key id": AuditQuery(key_id=picked["key_id"]),
        "user": AuditQuery(user=USERS[3], since=T0),
        "window": AuditQuery(since=T0),
        "last entries": AuditQuery(since=T0 + 10),
        "policy admin of web": AuditQuery(policies=("web",), since=T0),
        "policy admin of rare": AuditQuery(policies=("rare",), since=T0),
        "policy admin of both": AuditQuery(policies=("rare", "web"), since=T0),
    }


def cost(store, reads: Reads, tid: str, q: AuditQuery) -> tuple[int, list]:
    reads.reset()
    page = store.audit_page(tid, q, limit=LIMIT)
    return reads.rows, page.entries


def test_an_audit_page_reads_its_page_not_the_history(counted) -> None:
    store, reads = counted
    rng = random.Random(18)
    small, large = str(uuid.uuid4()), str(uuid.uuid4())
    picks = {small: seed(store, small, 15, rng), large: seed(store, large, 300, rng)}
    rows: dict[str, dict[str, int]] = {}
    for tid, picked in picks.items():
        rows[tid] = {}
        for name, q in questions(picked).items():
            n, entries = cost(store, reads, tid, q)
            rows[tid][name] = n
            assert all(q.matches(e) for e in entries), name
            if name in ("request", "serial", "key id"):
                assert entries and all(e.request_id == picked["request_id"] for e in entries), name
    # and through the service, as GET /api/audit asks (a tenant admin; the default window is a day)
    from functions.core.policy import ADMIN_ROLE, Identity
    from functions.service import Service, ServiceConfig

    service = Service(store, None, ServiceConfig(signer_backend="pkcs11"),  # type: ignore[arg-type]
                      clock=lambda: T0 + 3600)  # no key store: reading the audit signs nothing
    for tid, picked in picks.items():
        admin = Identity(oid=USERS[-2], tid=tid, upn="admin@x", roles=frozenset({ADMIN_ROLE}))
        for name, kw in (("api: last day", {}), ("api: request", {"request_id": picked["request_id"]}),
                         ("api: sshd line", {"key_id": picked["key_id"], "serial": picked["serial"]})):
            reads.reset()
            service.audit.query(admin, limit=LIMIT, **kw)
            rows[tid][name] = reads.rows
    print("\nrows read per page of", LIMIT, "(15 requests -> 300 requests):",
          {name: (rows[small][name], rows[large][name]) for name in rows[large]})
    for name in rows[large]:
        # a page reads its `limit` rows plus at most one chunk per index it merges, at any history
        assert rows[large][name] <= LIMIT + 2 * store.CHUNK + 4, (name, rows[large][name], rows[small][name])
    assert sum(rows[large].values()) < 3 * sum(rows[small].values())  # not 20x, as the history is


def test_no_audit_query_filters_on_anything_but_the_keys(counted) -> None:
    """Table Storage answers a filter on another property by scanning every row in the key range."""
    store, reads = counted
    tid = str(uuid.uuid4())
    picked = seed(store, tid, 12, random.Random(19))
    for name, q in questions(picked).items():
        reads.reset()
        store.audit_page(tid, q, limit=LIMIT)
        assert reads.filters, name
        for f in reads.filters:
            names = set(re.findall(r"\b([A-Za-z]+) (?:eq|ne|gt|ge|lt|le) ", f))
            assert names <= {"PartitionKey", "RowKey"}, (name, f)


def test_audit_rows_written_before_the_indexes_are_indexed_by_a_bounded_backfill(counted) -> None:
    """Rows aud|<ms>|<entry id> as the service wrote them before indexes are found by request, user,
    serial, key id and policy once the backfill (housekeeping's, a bounded batch per run, resumed
    from a marker row) has passed over them; then a run costs one point read."""
    from functions.service import Service, ServiceConfig

    store, reads = counted
    tid = str(uuid.uuid4())
    rid = new_request_id(T0)
    serial = serial_of_request_id(rid)
    key_id = f"ezssh/web/{rid}/u@x"
    old = [entry(tid, T0 + i, action, USERS[i], request_id=rid, policy_id="web", serial=str(serial), key_id=key_id)
           for i, action in enumerate(("request.approved", "certificate.issued", "certificate.revoked"))]
    for e in old:  # the old layout: one row per entry, no index rows
        store._table.create_entity({"PartitionKey": tid, "RowKey": f"aud|{int(e.at * 1000):013d}|{e.entry_id}",
                                    "Kind": "audit", "RequestId": rid, "Entry": store._entry_json(e)})
    store.add_audit(newer := entry(tid, T0 + 10, "policy.updated", USERS[5], policy_id="web"))
    q = {"request": AuditQuery(request_id=rid), "user": AuditQuery(user=USERS[1]),
         "serial": AuditQuery(serial=str(serial)), "key id": AuditQuery(key_id=key_id),
         "policy": AuditQuery(policies=("web",))}
    assert store.audit_page(tid, q["request"]).entries == []  # not indexed yet
    assert store.audit_page(tid, AuditQuery()).entries == old + [newer]  # the time order reads them already
    steps = []
    while not steps or not steps[-1][1]:
        reads.reset()
        steps.append(store.backfill_audit_indexes(tid, 2))
        assert reads.rows <= 2 + 2  # the marker, at most its budget plus one
    assert steps == [(2, False), (1, True)]
    assert store.audit_page(tid, q["request"]).entries == old
    assert store.audit_page(tid, q["user"]).entries == [old[1]]
    assert store.audit_page(tid, q["serial"]).entries == old
    assert store.audit_page(tid, q["key id"]).entries == old
    assert store.audit_page(tid, q["policy"]).entries == old + [newer]
    busy = str(uuid.uuid4())  # a tenant with only rows written with their indexes: one short read ends it
    seed(store, busy, 120, random.Random(20))
    reads.reset()
    assert store.backfill_audit_indexes(busy, 500) == (0, True)
    assert reads.rows <= store.BACKFILL_CHUNK
    reads.reset()
    service = Service(store, None, ServiceConfig(signer_backend="pkcs11"))  # type: ignore[arg-type] # signs nothing
    assert service.housekeeping([tid])["audit_rows_indexed"] == 0  # finished: the timer only reads the marker
    assert store.backfill_audit_indexes(tid, 10) == (0, True)
    assert store.audit_page(tid, q["request"]).entries == old
