"""Audit rows of TableStore (mixed into it; same table, tenant partition): aud|<position>, its index
rows axr| axu| axp| axs| axk|, the entries embedded in request rows (Audit0..) and the backfill
marker mig|audit (layout: tables.py)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, TypeVar, cast

from azure.core.exceptions import ResourceNotFoundError
from azure.data.tables import TableEntity, UpdateMode

from ..core.audit import AuditEntry
from ..core.errors import Conflict
from ..core.serials import SERIAL_RANDOM_BITS, request_of, serial_floor, serial_of_request_id
from .base import (
    AuditPage,
    AuditQuery,
    Positioned,
    audit_position,
    merge_pages,
    position_ms,
    read_audit,
)
from .tablecalls import UNAUTHENTICATED, _guard, transact

if TYPE_CHECKING:
    from .base import Store


def _in_order(rows: list[Positioned], lo: str, hi: str) -> list[Positioned]:
    return sorted((r for r in rows if lo < r[0] < hi), key=lambda r: r[0])


R = TypeVar("R")  # what a range read's rows are made into


class AuditRows:
    """Audit rows of TableStore (needs self._table)."""

    _table: Any

    # ---- audit ------------------------------------------------------------------------------
    # An audit entry is a row aud|<position> (storage/base.py: time, sequence number, entry id) plus
    # copies of it under each key it is asked by, written in the same transaction:
    #     axr|<request id>|<position>     axu|<actor oid>|<position>     axp|<policy id>|<position>
    #     axs|<serial, 19 digits>|<position>     axk|<sha-256 of the key id, 32 hex>|<position>
    # so every question is one range read of its own rows, bounded by the page. The entries written
    # with a new request (its creation, and its certificate when issued at once) are properties
    # Audit0, Audit1 of the request's own row instead, so that row stays the only write: a question
    # about a request, serial or key id reads them with that row (one point read); a time window,
    # user or policy reads them from the window's request rows (request ids sort by time).
    EMBEDDED = tuple(f"Audit{i}" for i in range(4))
    INDEXES = {"request_id": "axr", "actor_oid": "axu", "policy_id": "axp", "serial": "axs", "key_id": "axk"}
    CHUNK = 25  # rows per read when pages of several indexes are merged

    @staticmethod
    def _entry_json(a: AuditEntry) -> str:
        return json.dumps(a.body() | {"hash": a.hash}, separators=(",", ":"), default=str)

    @classmethod
    def _embedded_audit(cls, tenant_id: str, entries: Sequence[AuditEntry]) -> dict:
        if len(entries) > len(cls.EMBEDDED):
            raise ValueError("too many audit entries for one request row")
        if any((a.tenant_id or UNAUTHENTICATED) != tenant_id for a in entries):
            # what the SDK says of a batch across partitions: an entry belongs to its row's tenant
            raise ValueError("Partition Keys in the batch must all be the same.")
        return {name: cls._entry_json(a) for name, a in zip(cls.EMBEDDED[: len(entries)], entries, strict=True)}

    @classmethod
    def _index_key(cls, field_name: str, value: str) -> str:
        if field_name == "key_id":  # free text (a RowKey may not hold / \ # ?)
            value = hashlib.sha256(value.encode()).hexdigest()[:32]
        elif field_name == "serial":
            value = f"{int(value):019d}"
        return f"{cls.INDEXES[field_name]}|{value}|"

    @classmethod
    def _index_prefixes(cls, a: AuditEntry) -> list[str]:
        out = []
        for name in cls.INDEXES:
            value = getattr(a, name)
            if value and (name != "serial" or str(value).isdigit()):
                out.append(cls._index_key(name, str(value)))
        return out

    @classmethod
    def _audit_rows(cls, a: AuditEntry, *, primary: bool = True) -> list[dict]:
        """The entry's row and its index rows (one transaction's worth; all in the entry's partition)."""
        pk, pos, doc = a.tenant_id or UNAUTHENTICATED, audit_position(a), cls._entry_json(a)
        rows = (
            [
                {
                    "PartitionKey": pk,
                    "RowKey": f"aud|{pos}",
                    "Kind": "audit",
                    "Action": a.action,
                    "Outcome": a.outcome,
                    "RequestId": a.request_id,
                    "PolicyId": a.policy_id,
                    "KeyId": a.key_id,
                    "Serial": a.serial,
                    "Entry": doc,
                }
            ]
            if primary
            else []
        )
        return rows + [
            {"PartitionKey": pk, "RowKey": prefix + pos, "Kind": "audit-index", "Entry": doc}
            for prefix in cls._index_prefixes(a)
        ]

    @classmethod
    def _audit_ops(cls, a: AuditEntry) -> list[tuple]:
        return [("create", row) for row in cls._audit_rows(a)]

    def add_audit(self, entry: AuditEntry) -> None:
        exists = Conflict("An audit entry with that id already exists.")
        transact(
            self._table,
            "add audit",
            self._audit_ops(entry),
            not_found="The audit partition is gone.",
            lost=exists,
            exists=exists,
        )

    def list_audit(
        self,
        tenant_id: str,
        *,
        since: float | None = None,
        until: float | None = None,
        request_id: str | None = None,
        limit: int = 200,
    ) -> list[AuditEntry]:
        return read_audit(
            cast("Store", self), tenant_id, AuditQuery(since=since, until=until, request_id=request_id), limit
        )

    def audit_page(self, tenant_id: str, query: AuditQuery, *, limit: int = 100, after: str | None = None) -> AuditPage:
        """One index's rows (the most selective the query names) merged with the embedded entries of
        the request rows that question reaches; `limit` rows read at most past the first read of each."""
        lo, hi = query.window(after)
        rid = query.request_id or request_of(query.key_id, query.serial)
        if query.request_id or query.serial or query.key_id:
            name = "request_id" if query.request_id else ("serial" if query.serial else "key_id")
            value = str(getattr(query, name))
            if name == "serial" and not value.isdigit():
                return AuditPage([], None)
            ranges = [self._index_key(name, value)]
            embedded = [self._embedded_of(tenant_id, rid, lo, hi)] if rid else []
        else:
            if query.user is not None:
                ranges = [self._index_key("actor_oid", query.user)]
            elif query.policies is not None:
                ranges = [self._index_key("policy_id", p) for p in query.policies]
            else:
                ranges = ["aud|"]
            embedded = [self._embedded_in(tenant_id, lo, hi)]
        chunk = limit if len(ranges) + len(embedded) == 1 else min(limit, self.CHUNK)
        streams = [self._index_rows(tenant_id, prefix, lo, hi, chunk) for prefix in ranges] + embedded
        return merge_pages(streams, query, limit)

    def _index_rows(self, tenant_id: str, prefix: str, lo: str, hi: str, chunk: int) -> Iterator[Positioned]:
        flt = "PartitionKey eq @pk and RowKey gt @lo and RowKey lt @hi"
        params = {"pk": tenant_id, "lo": prefix + lo, "hi": prefix + hi if hi != "}" else prefix[:-1] + "}"}
        yield from self._paged(
            "list audit",
            flt,
            params,
            chunk,
            ["RowKey", "Entry"],
            lambda e: [(e["RowKey"][len(prefix) :], AuditEntry(**json.loads(e["Entry"])))],
        )

    def _paged(
        self, op: str, flt: str, params: dict, chunk: int, select: list[str], rows_of: Callable[[Any], list[R]]
    ) -> Iterator[R]:
        """Rows of a range read, `chunk` per round trip, each read only when the merge needs it."""
        pages = self._table.query_entities(flt, parameters=params, results_per_page=chunk, select=select).by_page()
        while (page := _guard(op, lambda: next(pages, None))) is not None:
            for e in page:
                yield from rows_of(e)

    def _embedded_of(self, tenant_id: str, request_id: str, lo: str, hi: str) -> Iterator[Positioned]:
        """The entries in request `request_id`'s own row (one point read)."""
        try:
            e = _guard(
                "list audit", lambda: self._table.get_entity(tenant_id, f"req|{request_id}", select=list(self.EMBEDDED))
            )
        except ResourceNotFoundError:
            return
        yield from (p for p in self._embedded_rows(request_id, e) if lo < p[0] < hi)

    def _embedded_in(self, tenant_id: str, lo: str, hi: str) -> Iterator[Positioned]:
        """The embedded entries of the request rows made within positions (lo, hi), in position order:
        rows of one millisecond are gathered first (within it, request ids are random)."""
        lo_ms = int(lo[:13]) if lo else 0
        hi_key = f"req|{serial_floor(int(hi[:13])):016x}" if hi != "}" else "req}"
        flt = "PartitionKey eq @pk and RowKey ge @lo and RowKey lt @hi"
        params = {"pk": tenant_id, "lo": f"req|{serial_floor(lo_ms):016x}", "hi": hi_key}
        group: list[Positioned] = []
        for pos, entry in self._paged(
            "list audit",
            flt,
            params,
            self.CHUNK,
            ["RowKey", *self.EMBEDDED],
            lambda e: self._embedded_rows(e["RowKey"][4:], e, marker=True),
        ):
            if group and pos[:13] != group[0][0][:13]:
                yield from _in_order(group, lo, hi)
                group = []
            group.append((pos, entry))
        yield from _in_order(group, lo, hi)

    def _embedded_rows(self, request_id: str, e: Any, marker: bool = False) -> list[Positioned]:
        entries = [AuditEntry(**json.loads(e[name])) for name in self.EMBEDDED if e.get(name)]
        rows: list[Positioned] = [(audit_position(a, request_id, slot), a) for slot, a in enumerate(entries)]
        if marker and not rows:  # a row read that holds no entry still counts against the page
            ms = (serial_of_request_id(request_id) or 0) >> SERIAL_RANDOM_BITS
            rows = [(position_ms(ms), None)]
        return rows

    AUDIT_MIGRATION = "mig|audit"  # how far the backfill of audit rows written before the indexes has got
    BACKFILL_CHUNK = 100  # rows per read: the run that meets the first newer row reads no more than this

    def backfill_audit_indexes(self, tenant_id: str, budget: int) -> tuple[int, bool]:
        """Index rows for audit rows aud|<ms>|<entry id> written before indexes, reading at most
        `budget` of them from where the last call stopped (upserts: a repeat is harmless). Those rows
        sort before every newer one, so the first row with a sequence number ends the work; once
        ended, a call is one point read."""
        try:
            mark = _guard("audit backfill", lambda: self._table.get_entity(tenant_id, self.AUDIT_MIGRATION))
        except ResourceNotFoundError:
            mark = TableEntity()
        if mark.get("Done"):
            return 0, True
        flt = "PartitionKey eq @pk and RowKey gt @lo and RowKey lt @hi"
        params = {"pk": tenant_id, "lo": f"aud|{mark.get('After') or ''}", "hi": "aud}"}
        last, ops, done, indexed = None, [], True, 0
        rows = self._paged(
            "audit backfill",
            flt,
            params,
            min(budget + 1, self.BACKFILL_CHUNK),
            ["RowKey", "Entry"],
            lambda e: [(e["RowKey"][4:], AuditEntry(**json.loads(e["Entry"])))],
        )
        for pos, entry in rows:
            if pos.count("|") > 1:  # a row with a sequence number: every older row is indexed
                break
            if indexed == budget:
                done = False
                break
            ops += [("upsert", row, {"mode": UpdateMode.REPLACE}) for row in self._audit_rows(entry, primary=False)]
            last, indexed = pos, indexed + 1
        lost = Conflict("The audit index changed at the same time; retry.")
        for k in range(0, len(ops), 100):
            transact(
                self._table,
                "audit backfill",
                ops[k : k + 100],
                not_found="The audit partition is gone.",
                lost=lost,
                exists=lost,
            )
        marker = {
            "PartitionKey": tenant_id,
            "RowKey": self.AUDIT_MIGRATION,
            "Kind": "migration",
            "After": last or mark.get("After"),
            "Done": done,
        }
        _guard("audit backfill", lambda: self._table.upsert_entity(marker, mode=UpdateMode.REPLACE))
        return indexed, done
