"""Benchmark: what every read, list and timer costs as a tenant's history grows (issue 18).

    .venv/bin/python bench/scale.py [--sizes 1000,100000] [--reps 20] [--threads 4]

Starts its own Azurite (table and queue services), SoftHSM token and OIDC provider on free ports in
a temporary directory, and runs the API in this process (the real FastAPI app over the real
service and TableStore, called through starlette's TestClient), so that its CPU is this process's
and Azurite's is not. Then, for each size N (ascending; each size adds to the one before):

  seed     N past requests over 30 days (85% issued at once, 10% approved then issued, 5% denied),
           N audit rows (refusals by a few hundred users), and N revoked certificates that are still
           valid, plus one policy per 100 N (with real CA keys). Rows are written exactly as the
           service writes them: the TableStore's own write methods build every row (and whatever
           index rows they write with it) against a recorder, and the recorded rows go to Azurite
           in entity-group transactions of 100, from --threads threads.
  measure  each call one at a time, --reps times (p50): the approver's pending list (3 pending), a
           user's own requests, the audit by request / serial / key id / user / the last 24 hours,
           the KRL and known-hosts (with and without If-None-Match), the housekeeping and reconcile
           timers, health, and issuance with and without an Idempotency-Key (a UUIDv7, what the CLI
           sends), and a request that needs approval.

For each call it prints the rows read (entities in Table Storage's answers), the storage round
trips (HTTP responses), both counted by an azure-core raw_response_hook on the service's
TableClient, and the API CPU (this process's CPU time over the call, less the hook's own), at each
size, then one [met] / [NOT met] line per target of the issue. Rows and CPU carry over to Azure;
Azurite's own scans (wall time) do not, so wall times are printed but judge nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "infra" / "local"), str(REPO / "client")]

DAY = 86400
PAGE = 100  # the default page size of every list (GUIDE: pagination convention)
CONSTANT_ROWS = 10  # what "a constant number of rows" more than the page may be
BENCH_SETTINGS = {"EZSSH_REQUEST_RATE": "10000", "EZSSH_MAX_PENDING_REQUESTS": "100"}


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(p / 100 * (len(s) - 1))))]


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


# ---- counting what the service asks of storage ------------------------------------------------------

class StorageCounter:
    """An azure-core raw_response_hook for the service's TableClient: called once per HTTP response
    (after the retry policy, so per round trip), it counts the response and, for reads (GET), the
    entities in it (one "odata.etag" per entity in Table Storage's JSON). Its own CPU is kept apart so the API's can be told without it."""

    ETAG = b'"odata.etag"'

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        self.round_trips = 0
        self.rows = 0
        self.writes = 0
        self.own_cpu = 0.0

    def __call__(self, pipeline_response: Any) -> None:
        c0 = time.thread_time()
        resp = pipeline_response.http_response
        req = pipeline_response.http_request
        try:
            body = resp.body() or b""
        except Exception:  # noqa: BLE001 - a streamed body: nothing to count
            body = b""
        n = body.count(self.ETAG) if req.method == "GET" and body[:1] == b"{" else 0
        with self.lock:
            self.round_trips += 1
            self.rows += n
            self.writes += req.method in ("POST", "PUT", "PATCH", "MERGE", "DELETE")
            self.own_cpu += time.thread_time() - c0


# ---- seeding: the store's own rows, written in batches ---------------------------------------------

class _Page(list):
    def by_page(self) -> Iterator[list]:
        return iter([list(self)])


class Recorder:
    """Stands in for the TableClient of a TableStore while seeding: keeps every row the store's write
    methods make (with merges applied, conditions ignored: nothing races a seed), answers the point
    and range reads those methods make from what it holds (else from the real table), and hands the
    rows over for batched writing."""

    RANGE = re.compile(r"RowKey (ge|gt) @(\w+) and RowKey (lt|le) @(\w+)")
    EQ = re.compile(r"and (\w+) eq @(\w+)")

    def __init__(self, real: Any) -> None:
        self.real = real
        self.rows: dict[tuple[str, str], dict] = {}
        self.n = 0

    def _etag(self) -> dict:
        self.n += 1
        return {"etag": f"W/\"datetime'seed-{self.n}'\""}

    @staticmethod
    def _key(entity: dict) -> tuple[str, str]:
        return entity["PartitionKey"], entity["RowKey"]

    def _entity(self, row: dict) -> Any:
        from azure.data.tables import TableEntity

        e = TableEntity(**row)
        e._metadata = {"etag": self._etag()["etag"], "timestamp": None}
        return e

    def _fetch(self, key: tuple[str, str]) -> dict | None:
        if key in self.rows:
            return self.rows[key]
        from azure.core.exceptions import ResourceNotFoundError

        try:
            row = dict(self.real.get_entity(*key))
        except ResourceNotFoundError:
            return None
        self.rows[key] = row
        return row

    def create_entity(self, entity: dict, **_: Any) -> dict:
        from azure.core.exceptions import ResourceExistsError

        key = self._key(entity)
        if self.rows.get(key):  # seeded rows are new (fresh ids): no read of the real table for them
            raise ResourceExistsError("The specified entity already exists.")
        self.rows[key] = {k: v for k, v in entity.items() if v is not None}
        return self._etag()

    def upsert_entity(self, entity: dict, mode: Any = None, **_: Any) -> dict:
        from azure.data.tables import UpdateMode

        key = self._key(entity)
        old = self.rows.get(key)  # a row not held here is merged into by the batched write (upsert, merge)
        new = {k: v for k, v in entity.items() if v is not None}
        self.rows[key] = {**old, **new} if old and mode != UpdateMode.REPLACE else new
        return self._etag()

    def update_entity(self, entity: dict, mode: Any = None, **_: Any) -> dict:
        from azure.core.exceptions import ResourceNotFoundError
        from azure.data.tables import UpdateMode

        if self._fetch(self._key(entity)) is None:
            raise ResourceNotFoundError("The specified resource does not exist.")
        return self.upsert_entity(entity, mode=mode if mode is not None else UpdateMode.MERGE)

    def delete_entity(self, *args: Any, **_: Any) -> None:
        key = self._key(args[0]) if isinstance(args[0], dict) else (args[0], args[1])
        self.rows[key] = {}  # an empty row: deleted (not written)

    def submit_transaction(self, ops: list, **_: Any) -> list:
        out = []
        for op in ops:
            kind, entity, opts = op[0], op[1], (op[2] if len(op) > 2 else {})
            if kind == "create":
                out.append(self.create_entity(entity))
            elif kind == "upsert":
                out.append(self.upsert_entity(entity, mode=opts.get("mode")))
            elif kind == "update":
                out.append(self.update_entity(entity, mode=opts.get("mode")))
            elif kind == "delete":
                self.delete_entity(entity)
                out.append({})
            else:
                raise ValueError(f"unknown transaction operation {kind!r}")
        return out

    def get_entity(self, partition_key: str, row_key: str, select: Any = None, **_: Any) -> Any:
        from azure.core.exceptions import ResourceNotFoundError

        row = self._fetch((partition_key, row_key))
        if not row:
            raise ResourceNotFoundError("The specified resource does not exist.")
        return self._entity(row)

    def query_entities(self, query_filter: str, parameters: dict | None = None, **_: Any) -> _Page:
        params = parameters or {}
        m = self.RANGE.search(query_filter)
        pk = params.get("pk")
        lo_op, lo, hi_op, hi = (m.group(1), params[m.group(2)], m.group(3), params[m.group(4)]) if m else \
            ("ge", "", "lt", "\uffff")
        eqs = [(f, params[p]) for f, p in self.EQ.findall(query_filter) if f not in ("RowKey",)]
        real = {self._key(dict(e)): dict(e) for e in self.real.query_entities(query_filter, parameters=params)}
        merged = {**real, **{k: v for k, v in self.rows.items() if v}}
        out = []
        for (p, rk), row in sorted(merged.items()):
            if p != pk or not ((rk >= lo) if lo_op == "ge" else (rk > lo)) or not ((rk < hi) if hi_op == "lt" else (rk <= hi)):
                continue
            if all(row.get(f) == v for f, v in eqs):
                out.append(self._entity(row))
        return _Page(out)

    def take(self) -> list[dict]:
        rows = [r for r in self.rows.values() if r]
        self.rows = {}
        return rows


class BatchWriter:
    """Writes rows to Azurite as entity-group transactions of 100 (merge upserts: PATCH without
    If-Match), over raw HTTP from `threads` threads. The same transactions as the SDK's
    submit_transaction, without its ~0.5 ms of CPU per row (it builds and parses the multipart body
    with the email package): seeding is bound by this box's CPU. Rows hold what the store writes
    (str, int32, bool, float), which JSON carries as Table Storage types them."""

    def __init__(self, port: int, table: str, threads: int) -> None:
        import base64

        from devstack.azurite import ACCOUNT, ACCOUNT_KEY

        self.port, self.table, self.threads, self.account = port, table, threads, ACCOUNT
        self.key = base64.b64decode(ACCOUNT_KEY)
        self.local = threading.local()

    def _part(self, row: dict) -> str:
        from urllib.parse import quote

        if any(not isinstance(v, (str, int, float, bool)) for v in row.values()):
            raise TypeError(f"a seeded row holds a value JSON would mistype: {row['RowKey']}")
        pk, rk = (quote(row[k].replace("'", "''"), safe="") for k in ("PartitionKey", "RowKey"))
        url = f"http://127.0.0.1:{self.port}/{self.account}/{self.table}(PartitionKey='{pk}',RowKey='{rk}')"
        return (f"Content-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n\r\n"
                f"PATCH {url} HTTP/1.1\r\nContent-Type: application/json\r\n"
                f"Accept: application/json;odata=minimalmetadata\r\nDataServiceVersion: 3.0\r\n\r\n"
                f"{json.dumps(row, separators=(',', ':'))}\r\n")

    def _send(self, batch: list[dict]) -> None:
        import base64
        import hashlib
        import hmac
        import http.client
        from email.utils import formatdate

        b, c = f"batch_{uuid.uuid4()}", f"changeset_{uuid.uuid4()}"
        body = (f"--{b}\r\nContent-Type: multipart/mixed; boundary={c}\r\n\r\n"
                + "".join(f"--{c}\r\n{self._part(r)}" for r in batch) + f"--{c}--\r\n--{b}--\r\n").encode()
        for attempt in range(5):
            conn = getattr(self.local, "conn", None) or http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
            self.local.conn = conn
            date = formatdate(usegmt=True)
            sig = base64.b64encode(hmac.new(self.key, f"{date}\n/{self.account}/{self.account}/$batch".encode(),
                                            hashlib.sha256).digest()).decode()
            try:
                conn.request("POST", f"/{self.account}/$batch", body, {
                    "x-ms-date": date, "x-ms-version": "2019-02-02", "DataServiceVersion": "3.0",
                    "Content-Type": f"multipart/mixed; boundary={b}", "Authorization": f"SharedKeyLite {self.account}:{sig}"})
                resp = conn.getresponse()
                text = resp.read().decode(errors="replace")
            except (OSError, http.client.HTTPException):
                self.local.conn = None
                if attempt == 4:
                    raise
                time.sleep(0.5 * (attempt + 1))
                continue
            failed = re.search(r"HTTP/1\.1 ([45]\d\d)[^\r\n]*", text)
            if resp.status == 202 and not failed:
                return
            if attempt == 4 or (failed and not failed.group(1).startswith("5")):
                raise RuntimeError(f"seeding batch refused: {resp.status} {failed.group(0) if failed else text[:300]}")
            time.sleep(0.5 * (attempt + 1))

    def write(self, rows: list[dict]) -> None:
        by_pk: dict[str, list[dict]] = {}
        for r in rows:
            by_pk.setdefault(r["PartitionKey"], []).append(r)
        batches = [part[i:i + 100] for part in by_pk.values() for i in range(0, len(part), 100)]
        with ThreadPoolExecutor(self.threads) as pool:
            list(pool.map(self._send, batches))


@dataclass
class Tenant:
    tid: str
    users: list[Any]  # Identity of the synthetic users (alice first)
    alice: Any
    bob: Any
    carol: Any
    auto: Any  # policies
    gated: Any
    long: Any
    template: str  # a real certificate's text: the size of every seeded one
    seeded: int = 0
    rows: int = 0
    policies: int = 3
    picks: dict = field(default_factory=dict)  # old rows the audit calls look up


class Seeder:
    def __init__(self, ctx: Any, tenant: Tenant, threads: int, azurite_port: int, rng_seed: int = 18) -> None:
        import random

        from functions.storage.tables import TableStore

        self.ctx = ctx
        self.t = tenant
        self.threads = threads
        self.rand = random.Random(rng_seed)
        real = ctx.service.store
        self.table = real._table  # the real TableClient (with the counting hook: counters reset after)
        self.recorder = Recorder(self.table)
        self.writer = BatchWriter(azurite_port, real._table_name, threads)
        self.store = TableStore.__new__(TableStore)
        self.store.__dict__.update(real.__dict__)
        self.store._table = self.recorder

    # records as the service makes them (service/issuance.py, service/requests.py, service/hosts.py)
    def _entry(self, who: Any, at: float, action: str, outcome: str = "ok", **fields: Any) -> Any:
        from functions.core.audit import AuditEntry

        return AuditEntry(tenant_id=who.tid, at=at, action=action, outcome=outcome, actor_oid=who.oid,
                          actor_upn=who.upn, **fields)

    def _request(self, who: Any, policy: Any, at: float, *, auto: bool) -> Any:
        from functions.core import requests as sm
        from functions.core import serials

        rid = serials.new_request_id(at)
        return sm.RequestRecord(
            id=rid, tenant_id=who.tid, policy_id=policy.id, requester_oid=who.oid, requester_upn=who.upn,
            host=f"web{self.rand.randrange(500)}", principal=who.upn.split("@")[0], ttl_seconds=3600,
            state=sm.APPROVED if auto else sm.PENDING, created_at=int(at),
            expires_at=int(at) + (sm.ISSUE_WINDOW if auto else policy.request_ttl),
            approvals_required=0 if auto else policy.approvals_required, reason="deploy")

    def _cert(self, rec: Any, at: float, ttl: int) -> Any:
        from functions.core import serials
        from functions.core.records import CertificateRecord

        serial = serials.serial_of_request_id(rec.id)
        ca = next(c for c in self.policy_of(rec.policy_id).ca if c.state == "current")
        return CertificateRecord(
            tenant_id=rec.tenant_id, policy_id=rec.policy_id, serial=serial,
            key_id=f"ezssh/{rec.policy_id}/{rec.id}/{rec.requester_upn}", request_id=rec.id,
            requester_oid=rec.requester_oid, requester_upn=rec.requester_upn, principals=(rec.principal,),
            host=rec.host, valid_after=int(at) - 60, valid_before=int(at) + ttl, ca_fingerprint=ca.fingerprint,
            public_key_fingerprint="SHA256:" + secrets.token_urlsafe(32)[:43], certificate=self.t.template)

    def policy_of(self, pid: str) -> Any:
        return {p.id: p for p in (self.t.auto, self.t.gated, self.t.long)}[pid]

    def _issue_at_once(self, who: Any, policy: Any, at: float, ttl: int = 3600) -> tuple[Any, Any]:
        from functions.core import requests as sm
        from functions.core.audit import link, with_head

        rec = self._request(who, policy, at, auto=True)
        created = link(self._entry(who, at, "request.created", request_id=rec.id, policy_id=policy.id,
                                   host=rec.host, principal=rec.principal, chain=f"req:{rec.id}",
                                   details={"decision": "auto", "ttl_seconds": ttl, "reason": rec.reason}), None)
        cert = self._cert(rec, at, ttl)
        final = replace(rec, state=sm.ISSUED, serial=cert.serial, key_id=cert.key_id)
        issued = link(self._entry(who, at, "certificate.issued", request_id=rec.id, policy_id=policy.id,
                                  key_id=cert.key_id, serial=str(cert.serial), host=rec.host, principal=rec.principal,
                                  chain=f"req:{rec.id}", details={"valid_after": cert.valid_after,
                                                                  "valid_before": cert.valid_before}), created)
        final = with_head(final, issued)
        self.store.record_issuance(final, None, cert, [created, issued])
        return final, cert

    def _approved_then_issued(self, who: Any, at: float, deny: bool) -> Any:
        from functions.core import requests as sm
        from functions.core.audit import link, with_head

        policy = self.t.gated
        rec = self._request(who, policy, at, auto=False)
        created = link(self._entry(who, at, "request.created", request_id=rec.id, policy_id=policy.id,
                                   host=rec.host, principal=rec.principal, chain=f"req:{rec.id}",
                                   details={"decision": "approval"}), None)
        rec = self.store.create_request(with_head(rec, created), created)
        t1 = at + self.rand.uniform(30, 600)
        bob = self.t.bob
        decided = (sm.deny if deny else sm.approve)(rec, bob, int(t1), comment="ok")
        entry = link(self._entry(bob, t1, "request.denied" if deny else "request.approved", request_id=rec.id,
                                 policy_id=policy.id, chain=f"req:{rec.id}"), rec)
        rec = self.store.update_request(with_head(decided, entry), rec.etag, entry)
        if deny:
            return rec
        t2 = t1 + self.rand.uniform(1, 60)
        cert = self._cert(rec, t2, 3600)
        final = sm.mark_issued(rec, who, int(t2), serial=cert.serial, key_id=cert.key_id)
        issued = link(self._entry(who, t2, "certificate.issued", request_id=rec.id, policy_id=policy.id,
                                  key_id=cert.key_id, serial=str(cert.serial), chain=f"req:{rec.id}"), rec)
        self.store.record_issuance(with_head(final, issued), rec.etag, cert, [issued])
        return final

    def _refusal(self, who: Any, at: float) -> None:
        self.store.add_audit(self._entry(who, at, "request.refused", "refused", host=f"db{self.rand.randrange(50)}",
                                         principal="root", error_code="principal_not_allowed",
                                         message="No rule of any policy lets you log in as 'root' there."))

    def _revoked(self, who: Any, at: float) -> None:
        from functions.core.audit import link, with_head

        rec, cert = self._issue_at_once(who, self.t.long, at, ttl=DAY)
        row = self.recorder.get_entity(rec.tenant_id, f"req|{rec.id}")
        revoked_at = at + self.rand.uniform(60, 1800)
        revoked = replace(cert, revoked_at=int(revoked_at), revoked_by=self.t.carol.upn, etag=row.metadata["etag"])
        entry = link(self._entry(self.t.carol, revoked_at, "certificate.revoked", request_id=rec.id,
                                 policy_id=cert.policy_id, key_id=cert.key_id, serial=str(cert.serial), host=rec.host,
                                 chain=f"crt:{cert.policy_id}:{cert.serial}",
                                 details={"reason": "bench", "requester_upn": cert.requester_upn,
                                          "valid_before": cert.valid_before, "own": False}), None)
        self.store.revoke_certificate(revoked, revoked.etag, entry)

    def grow(self, size: int, now: float, chunk: int = 500) -> dict:
        """Seed up to `size` of each kind; returns what it took."""
        t0, rows, recording = time.perf_counter(), 0, 0.0
        users = self.t.users
        start = self.t.seeded
        for lo in range(start, size, chunk):
            r0 = time.perf_counter()
            prof = None
            if os.environ.get("BENCH_PROFILE_SEED") and lo == start:
                import cProfile

                prof = cProfile.Profile(time.process_time)
                prof.enable()
            for i in range(lo, min(size, lo + chunk)):
                who = self.t.alice if i % 10 == 0 else users[1 + self.rand.randrange(len(users) - 1)]
                at = now - 30 * DAY + self.rand.uniform(0, 30 * DAY - 3600)
                kind = i % 20
                if kind < 17:
                    rec, cert = self._issue_at_once(who, self.t.auto, at)
                    if who is self.t.alice and "serial" not in self.t.picks and at < now - 20 * DAY:
                        self.t.picks["serial"], self.t.picks["key_id"] = cert.serial, cert.key_id
                else:
                    rec = self._approved_then_issued(who, at, deny=kind == 19)
                    if kind != 19 and "request" not in self.t.picks and at < now - 20 * DAY:  # an approved one
                        self.t.picks["request"] = rec.id
                self._refusal(users[self.rand.randrange(len(users))], now - 30 * DAY + self.rand.uniform(0, 30 * DAY))
                self._revoked(users[self.rand.randrange(len(users))], now - 20 * 3600 + self.rand.uniform(0, 19 * 3600))
            batch = self.recorder.take()
            recording += time.perf_counter() - r0
            if prof is not None:
                import pstats

                prof.disable()
                pstats.Stats(prof, stream=sys.stderr).sort_stats("cumulative").print_stats(45)
            rows += len(batch)
            self.writer.write(batch)
            done = min(size, lo + chunk)
            if done % max(chunk, size // 10) == 0 or done == size:
                el = time.perf_counter() - t0
                print(f"    seeded {done:,} of {size:,} ({rows:,} rows, {rows / el:.0f} rows/s; making them "
                      f"{recording / el:.0%} of the time; load {load()})", file=sys.stderr, flush=True)
        self.t.seeded = size
        self.t.rows += rows
        return {"rows": rows, "total_rows": self.t.rows, "seconds": time.perf_counter() - t0, "recording": recording}


def start_azurite_in_memory(state: Path) -> Any:
    """Azurite's table and queue services as devstack starts them, but keeping their data in memory:
    at 100,000 a million rows are seeded, and Azurite's disk persistence writes its whole database
    out as one JSON document again and again. NODE_OPTIONS gives Node the heap that takes."""
    import signal

    from devstack.azurite import Azurite
    from devstack.proc import NODE_BIN, free_port, spawn, wait_for_port

    procs, ports = [], []
    env = {**os.environ, "NODE_OPTIONS": "--max-old-space-size=8192"}
    try:
        for service in ("table", "queue"):
            port = free_port()
            proc = spawn(f"azurite-{service}", [str(NODE_BIN / f"azurite-{service}"), f"--{service}Host", "127.0.0.1",
                                                f"--{service}Port", str(port), "--inMemoryPersistence",
                                                "--disableTelemetry", "--skipApiVersionCheck", "--silent"],
                         state / "logs" / f"azurite-{service}.log", env=env, stop_signal=signal.SIGINT)
            procs.append(proc)
            ports.append(port)
            wait_for_port(proc, port, 60)
    except BaseException:
        for proc in procs:
            proc.stop()
        raise
    return Azurite(procs[0], ports[0], procs[1], ports[1])


# ---- the calls --------------------------------------------------------------------------------------

@dataclass
class Sample:
    rows: int
    trips: int
    writes: int
    cpu: float
    wall: float
    status: int


@dataclass
class Call:
    name: str
    run: Callable[[], int]  # returns the HTTP status (200 for a timer that ran)
    reps: int | None = None  # None: --reps
    answer: Callable[[], int] | None = None  # rows the answer itself holds (a KRL's serials), if more than a page
    before: Callable[[], None] | None = None  # untimed, before each rep


def measure(call: Call, counter: StorageCounter, reps: int) -> tuple[list[Sample], int]:
    samples = []
    for _ in range(min(call.reps or reps, reps)):
        if call.before:
            call.before()
        counter.reset()
        c0, w0 = time.process_time(), time.perf_counter()
        status = call.run()
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        with counter.lock:
            samples.append(Sample(counter.rows, counter.round_trips, counter.writes, max(0.0, cpu - counter.own_cpu),
                                  wall, status))
    answer = call.answer() if call.answer else 0
    return samples, answer


# ---- main ---------------------------------------------------------------------------------------------

def main() -> int:  # noqa: C901 - one linear script
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1000,100000", help="tenant sizes N, comma-separated (ascending)")
    ap.add_argument("--reps", type=int, default=20, help="calls per measurement (p50)")
    ap.add_argument("--threads", type=int, default=4, help="seeding threads (entity-group transactions of 100)")
    ap.add_argument("--users", type=int, default=300, help="users the seeded history is spread over")
    ap.add_argument("--max-policies", type=int, default=30, help="policies: one per 100 N, at most this many")
    ap.add_argument("--deadline", type=float, default=None,
                    help="seconds each API request may wait on storage (default: the API's own, 10 s). Azurite "
                         "scans the whole partition for every range read, seconds at a million rows, where Table "
                         "Storage seeks its index: a longer deadline lets the rows and CPU of such calls be counted")
    ap.add_argument("--big", type=int, default=20_000,
                    help="from this N on, a quarter of --reps (at least 5): Azurite answers a range read by "
                         "scanning the partition, seconds a call at a million rows")
    args = ap.parse_args()
    sizes = sorted(int(s.replace("_", "")) for s in args.sizes.split(",") if s.strip())

    from starlette.testclient import TestClient

    from bench.issue import fresh_keys
    from devstack.oidc import sign_in, start_oidc
    from devstack.proc import free_port
    from devstack.softhsm import ensure_token
    from devstack.stack import api_env, ensure_policy, identity_of
    from ezssh.issue import attempt_key
    from functions.api.app import create_app
    from functions.core.policy import Identity
    from functions.settings import load_settings
    from functions.storage import tables
    from functions.wiring import build_context

    counter = StorageCounter()
    tables.CLIENT_OPTIONS["raw_response_hook"] = counter  # every TableClient the service builds from here on
    if args.deadline is not None:
        from functions.api import app as api_app

        api_app.REQUEST_DEADLINE = args.deadline
    results: dict[str, dict[int, tuple[list[Sample], int]]] = {}
    seeding: dict[int, dict] = {}
    load_start = load()
    with tempfile.TemporaryDirectory(prefix="ezssh-scale-") as tmp:
        state = Path(tmp)
        started: list = []
        try:
            azurite = start_azurite_in_memory(state)
            started.append(azurite)
            token = ensure_token(state)
            oidc = start_oidc(state, free_port())
            started.append(oidc)
            env = {**api_env(state, oidc, azurite.port, token, queue_port=azurite.queue_port), **BENCH_SETTINGS}
            ctx = build_context(load_settings(env))
            client = TestClient(create_app(lambda: ctx), raise_server_exceptions=False)
            client.__enter__()
            tokens = {u: sign_in(oidc, u)["access_token"] for u in ("alice", "bob", "carol")}
            auth = {u: {"Authorization": f"Bearer {t}"} for u, t in tokens.items()}
            alice, bob, carol = (identity_of(oidc, u) for u in ("alice", "bob", "carol"))
            users_group = oidc.group_id("contoso", "ezssh-users")
            approvers = oidc.group_id("contoso", "ezssh-approvers")
            admins = oidc.group_id("contoso", "ezssh-admins")
            svc = ctx.service

            def policy(pid: str, action: str, hosts: list[str], **kw: Any) -> Any:
                return ensure_policy(svc, carol, {
                    "id": pid, "name": f"Bench: {pid}", "rules": [{"groups": [users_group], "action": action}],
                    "hosts": hosts, "logins": [{"group": users_group, "logins": ["{username}"]}],
                    "approvers": {"groups": [approvers]}, "admins": {"groups": [admins]}, **kw})

            auto = policy("bench-auto", "auto", ["web*", "127.0.0.1"])
            gated = policy("bench-gated", "approval", ["gated*"])
            long = policy("bench-long", "auto", ["long*"], max_ttl=DAY, default_ttl=DAY)
            keys = fresh_keys(4000)
            key_at = [0]

            def next_key() -> str:
                key_at[0] += 1
                return keys[key_at[0] % len(keys)]

            first = client.post("/api/requests", headers=auth["alice"],
                                json={"host": "web1", "principal": "alice", "public_key": next_key(), "policy": auto.id})
            assert first.status_code == 201, first.text
            synthetic = [Identity(oid=str(uuid.uuid5(uuid.NAMESPACE_URL, f"bench-user-{i}")), tid=alice.tid,
                                  upn=f"user{i}@{alice.upn.split('@')[1]}", groups=alice.groups,
                                  domain_verified=True) for i in range(args.users - 1)]
            tenant = Tenant(alice.tid, [alice, *synthetic], alice, bob, carol, auto, gated, long,
                            first.json()["certificate"])
            seeder = Seeder(ctx, tenant, args.threads, azurite.port)
            host_token = svc.hosts.host_token(long)
            print(f"ezssh scale benchmark: {os.cpu_count()} cores, load average {load_start}; sizes {sizes}",
                  flush=True)

            for size in sizes:
                now = time.time()
                print(f"  seeding to N = {size:,} ...", file=sys.stderr, flush=True)
                seeding[size] = seeder.grow(size, now)
                want_policies = max(3, min(size // 100, args.max_policies))
                t0 = time.perf_counter()
                while tenant.policies < want_policies:
                    tenant.policies += 1
                    policy(f"bench-p{tenant.policies:05d}", "auto", [f"p{tenant.policies}-*"])
                seeding[size]["policies"] = tenant.policies
                seeding[size]["policy_seconds"] = time.perf_counter() - t0
                listed = client.get("/api/requests", headers=auth["bob"], params={"state": "pending", "role": "approver"})
                pending = listed.json().get("requests", []) if listed.status_code == 200 else []
                for _ in range(3 - len(pending) if listed.status_code == 200 else 0):
                    r = client.post("/api/requests", headers=auth["alice"],
                                    json={"host": "gated1", "principal": "alice", "policy": gated.id})
                    assert r.status_code == 202, r.text
                svc.base.policies.changed(alice.tid)
                # The housekeeping timer's one-off backfills (index rows for rows older than the
                # indexes; it reads a bounded batch a run and marks where it stopped) find the seeded
                # rows new to them: run it until it is done with them, untimed, as a deployed timer
                # would have, so the figures below are the steady state.
                backfill = {"runs": 0, "rows": 0}
                last = -1
                while backfill["runs"] < 200:
                    counter.reset()
                    svc.housekeeping(ctx.settings.tenants)
                    backfill["runs"] += 1
                    backfill["rows"] += counter.rows
                    if counter.rows <= PAGE + CONSTANT_ROWS or counter.rows == last:
                        break  # done, or reading the same every run (then that is its steady state)
                    last = counter.rows
                print(f"  housekeeping backfill before measuring: {backfill['rows']:,} rows in {backfill['runs']} runs",
                      file=sys.stderr, flush=True)
                seeding[size]["backfill"] = backfill
                picks = tenant.picks
                etags: dict[str, str | None] = {}

                def get(user: str | None, path: str, params: dict | None = None, tag: str | None = None,
                        conditional: bool = False, headers: dict | None = None) -> Callable[[], int]:
                    def run() -> int:
                        h = dict(auth[user]) if user else {}
                        h.update(headers or {})
                        if conditional and etags.get(tag or path):
                            h["If-None-Match"] = etags[tag or path]  # type: ignore[assignment]
                        r = client.get(path, headers=h, params=params)
                        if not conditional and r.status_code == 200:
                            etags[tag or path] = r.headers.get("etag")
                        return r.status_code
                    return run

                def post(user: str, path: str, body: Callable[[], dict], keyed: bool = False,
                         after: Callable[[Any], None] | None = None) -> Callable[[], int]:
                    def run() -> int:
                        h = dict(auth[user])
                        if keyed:
                            h["Idempotency-Key"] = attempt_key()
                        r = client.post(path, headers=h, json=body())
                        if after:
                            after(r)
                        return r.status_code
                    return run

                cancel_later: list[str] = []

                def cancel_pending() -> None:
                    while cancel_later:
                        client.post(f"/api/requests/{cancel_later.pop()}/cancel", headers=auth["alice"], json={})

                def timer(fn: Callable[[], Any]) -> Callable[[], int]:
                    def run() -> int:
                        try:
                            fn()
                            return 200
                        except Exception as exc:  # noqa: BLE001 - what a timer raised is reported as a 500
                            print(f"    timer failed: {exc!r}", file=sys.stderr)
                            return 500
                    return run

                def fresh_health() -> None:
                    """Each call does the work of one that finds the 3 s cache expired."""
                    cached = getattr(ctx, "health", None)
                    if cached is not None and hasattr(cached, "_last"):
                        cached._last = None
                    elif getattr(svc, "_health", None) is not None:
                        svc._health = None

                revoked_here = tenant.picks.setdefault("revoked_here", [0])

                def revoke_one() -> None:
                    """A new revoked certificate (through the API, untimed): the next KRL is built anew."""
                    r = client.post("/api/requests", headers=auth["alice"], json={
                        "host": "long1", "principal": "alice", "policy": long.id, "public_key": next_key()})
                    assert r.status_code == 201, r.text
                    r = client.post(f"/api/certificates/{long.id}/{r.json()['serial']}/revoke", headers=auth["carol"],
                                    json={"reason": "bench"})
                    assert r.status_code == 200, r.text
                    revoked_here[0] += 1

                krl_path = f"/api/policies/{long.id}/krl"
                krl_params = {"tenant": alice.tid}
                krl_headers = {"X-Ezssh-Host-Token": host_token}
                issue = {"host": "127.0.0.1", "principal": "alice", "policy": auto.id}
                calls = [
                    Call("pending list (approver, 3 pending)",
                         get("bob", "/api/requests", {"state": "pending", "role": "approver"})),
                    Call("my requests (first page)", get("alice", "/api/requests")),
                    Call("audit by request", get("carol", "/api/audit", {"request_id": picks.get("request", "")})),
                    Call("audit by serial", get("carol", "/api/audit", {"serial": str(picks.get("serial", 1))})),
                    Call("audit by key id", get("carol", "/api/audit", {"key_id": picks.get("key_id", "")})),
                    Call("audit by user", get("carol", "/api/audit", {"user": alice.oid})),
                    Call("audit, last 24 h", get("carol", "/api/audit", {"since": str(int(now - DAY)),
                                                                          "until": str(int(now))})),
                    Call("KRL after a revocation (N revoked, valid)", get(None, krl_path, krl_params,
                                                                           headers=krl_headers),
                         answer=lambda: tenant.seeded + revoked_here[0], before=revoke_one, reps=min(args.reps, 5)),
                    Call("KRL, unchanged", get(None, krl_path, krl_params, headers=krl_headers)),
                    Call("KRL, If-None-Match", get(None, krl_path, krl_params, tag=krl_path, conditional=True,
                                                   headers=krl_headers)),
                    Call("known-hosts", get("alice", "/api/known-hosts"), answer=lambda: tenant.policies),
                    Call("known-hosts, If-None-Match", get("alice", "/api/known-hosts", tag="/api/known-hosts",
                                                           conditional=True)),
                    Call("housekeeping timer", timer(lambda: svc.housekeeping(ctx.settings.tenants))),
                    Call("reconcile timer", timer(lambda: ctx.enrolments.reconcile() if ctx.enrolments else None),
                         reps=5),
                    Call("health (uncached)", get(None, "/api/health"), before=fresh_health),
                    Call("issuance, no Idempotency-Key",
                         post("alice", "/api/requests", lambda: {**issue, "public_key": next_key()})),
                    Call("issuance, Idempotency-Key (UUIDv7)",
                         post("alice", "/api/requests", lambda: {**issue, "public_key": next_key()}, keyed=True)),
                    Call("request needing approval",
                         post("alice", "/api/requests", lambda: {"host": "gated2", "principal": "alice",
                                                                  "policy": gated.id},
                              after=lambda r: cancel_later.append(r.json()["id"]) if r.status_code == 202 else None),
                         before=cancel_pending),
                ]
                print(f"  measuring at N = {size:,} (load {load()})", file=sys.stderr, flush=True)
                reps = args.reps if size < args.big else max(5, args.reps // 4)
                for call in calls:
                    t_call = time.perf_counter()
                    samples, answer = measure(call, counter, reps)
                    codes = ",".join(map(str, sorted({x.status for x in samples})))
                    print(f"    {call.name}: rows {pct([x.rows for x in samples], 50):.0f} (most "
                          f"{max(x.rows for x in samples)}), round trips {pct([x.trips for x in samples], 50):.0f}, "
                          f"API CPU {pct([x.cpu for x in samples], 50) * 1000:.2f} ms, status {codes} "
                          f"({len(samples)} calls in {time.perf_counter() - t_call:.1f} s)", file=sys.stderr, flush=True)
                    results.setdefault(call.name, {})[size] = (samples, answer)
                cancel_pending()
            load_end = load()
        finally:
            tables.CLIENT_OPTIONS.pop("raw_response_hook", None)
            for s in reversed(started):
                s.stop()

    from functions.api import app as api_app

    report(results, seeding, sizes, load_start, load_end, api_app.REQUEST_DEADLINE)
    return 0


def report(results: dict, seeding: dict, sizes: list[int], load_start: str, load_end: str, deadline: float) -> None:
    lo, hi = sizes[0], sizes[-1]
    print(f"\nResults ({os.cpu_count()} cores; load average at start {load_start}, at end {load_end}; API request "
          f"deadline {deadline:g} s). Per call, "
          "p50 over the reps: rows read (most in one call) / storage round trips / API CPU ms (wall ms); "
          "status codes seen")
    for n in sizes:
        s = seeding[n]
        print(f"  N = {n:,}: {s['total_rows']:,} rows seeded ({s['rows']:,} of them in {s['seconds']:.0f} s, "
              f"{s['rows'] / max(s['seconds'], 1e-9):.0f} rows/s), {s['policies']} policies; the housekeeping "
              f"timer's one-off backfill read {s['backfill']['rows']:,} rows in {s['backfill']['runs']} runs first")
    head = f"{'call':42s}" + "".join(f" | {'N=' + format(n, ','):>39s}" for n in sizes) + " | CPU ratio"
    print(head)
    print("-" * len(head))
    for name, by in results.items():
        cells = []
        for n in sizes:
            samples, _ = by[n]
            codes = sorted({x.status for x in samples})
            cells.append(f"{pct([x.rows for x in samples], 50):6.0f} ({max(x.rows for x in samples):6d}) / "
                         f"{pct([x.trips for x in samples], 50):3.0f} / "
                         f"{pct([x.cpu for x in samples], 50) * 1000:6.2f} ({pct([x.wall for x in samples], 50) * 1000:5.0f})"
                         f" {','.join(map(str, codes))}")
        ratio = pct([x.cpu for x in by[hi][0]], 50) / max(pct([x.cpu for x in by[lo][0]], 50), 1e-9)
        print(f"{name:42s}" + "".join(f" | {c:>39s}" for c in cells) + f" | {ratio:5.2f}x")
    print(f"\nTargets (issue 18), at N = {hi:,} against N = {lo:,}")
    lines = []
    for name, by in results.items():
        samples, answer = by[hi]
        answer_lo = by[lo][1]
        rows = max(x.rows for x in samples)
        bound = max(PAGE, answer) + CONSTANT_ROWS
        cpu_hi, cpu_lo = pct([x.cpu for x in samples], 50), pct([x.cpu for x in by[lo][0]], 50)
        lines.append((f"{name}: rows read <= {bound}", rows <= bound, f"{rows} rows (most of {len(samples)} calls)"))
        if answer > PAGE:  # an answer that grows with N (a KRL's serials): CPU per row of the answer
            per_hi, per_lo = cpu_hi / answer, cpu_lo / max(answer_lo, 1)
            lines.append((f"{name}: API CPU per answer row <= 1.5x N={lo:,}", per_hi <= 1.5 * per_lo,
                          f"{per_hi * 1e6:.1f} us vs {per_lo * 1e6:.1f} us a row ({per_hi / max(per_lo, 1e-12):.2f}x; "
                          f"{answer:,} vs {answer_lo:,} rows)"))
        else:
            lines.append((f"{name}: API CPU <= 1.5x N={lo:,}", cpu_hi <= 1.5 * cpu_lo,
                          f"{cpu_hi * 1000:.2f} ms vs {cpu_lo * 1000:.2f} ms ({cpu_hi / max(cpu_lo, 1e-9):.2f}x)"))
        fives = [x.status for x in samples if x.status >= 500]
        lines.append((f"{name}: no 5xx", not fives, f"{len(fives)} of {len(samples)}" if fives else "none"))
    for name in ("KRL, If-None-Match", "known-hosts, If-None-Match"):
        codes = [x.status for x in results[name][hi][0]]
        lines.append((f"{name.split(',')[0]} answers 304 when unchanged", all(c == 304 for c in codes),
                      f"{codes.count(304)} of {len(codes)} answered 304"))
    keyed, plain = results["issuance, Idempotency-Key (UUIDv7)"][hi][0], results["issuance, no Idempotency-Key"][hi][0]
    trips = pct([x.trips for x in keyed], 50)
    lines.append(("keyed issuance: one storage round trip", trips == 1 and all(x.status == 201 for x in keyed),
                  f"{trips:.0f} round trip(s), {pct([x.writes for x in keyed], 50):.0f} write(s)"))
    kc, pc = pct([x.cpu for x in keyed], 50), pct([x.cpu for x in plain], 50)
    lines.append(("keyed issuance: API CPU <= 1.2x unkeyed", kc <= 1.2 * pc,
                  f"{kc * 1000:.2f} ms vs {pc * 1000:.2f} ms ({kc / max(pc, 1e-9):.2f}x)"))
    for what, ok, fig in lines:
        print(f"  [{'met' if ok else 'NOT met':7s}] {what:62s} {fig}")


if __name__ == "__main__":
    sys.exit(main())
