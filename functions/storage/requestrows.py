"""Request rows of TableStore (mixed into it; same table, tenant partition): req|<request id>, its
index rows rqu| rqm| rqo| rqt|, expiry keys rqx|, pending slots rqc|, the backfill marker mig|requests
and idempotency keys idk| (layout: tables.py)."""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from dataclasses import replace
from functools import partial
from typing import TYPE_CHECKING, Any

from azure.core.exceptions import HttpResponseError, ResourceExistsError, ResourceNotFoundError
from azure.data.tables import TableEntity, UpdateMode

from ..core.audit import AuditEntry
from ..core.errors import Conflict, EzsshError, NotFound, PreconditionFailed
from ..core.records import IdempotencyRecord, PendingSlots
from ..core.requests import APPROVED, OPEN_STATES, PENDING, Approval, RequestRecord
from .base import BY_USER, OPEN_BY_POLICY, OPEN_BY_USER, OPEN_IN_TENANT, index_position
from .tablecalls import _guard, _if_match, transact

INDEX_PREFIX = {BY_USER: "rqu", OPEN_BY_USER: "rqm", OPEN_BY_POLICY: "rqo", OPEN_IN_TENANT: "rqt"}


def _expiry_key(expires_at: int, request_id: str) -> str:
    return f"rqx|{expires_at:010d}|{request_id}"


class RequestRows:
    """Request rows of TableStore (needs self._table, _embedded_audit, _audit_ops)."""

    _table: Any

    if TYPE_CHECKING:  # TableStore's, which this class is part of

        @classmethod
        def _embedded_audit(cls, tenant_id: str, entries: Sequence[AuditEntry]) -> dict: ...

        @classmethod
        def _audit_ops(cls, a: AuditEntry) -> list[tuple]: ...

    # ---- requests ---------------------------------------------------------------------------
    @staticmethod
    def _request_entity(rec: RequestRecord) -> dict:
        return {
            "PartitionKey": rec.tenant_id,
            "RowKey": f"req|{rec.id}",
            "Kind": "request",
            "PolicyId": rec.policy_id,
            "RequesterOid": rec.requester_oid,
            "RequesterUpn": rec.requester_upn,
            "RequesterName": rec.requester_name,
            "Host": rec.host,
            "Principal": rec.principal,
            "TtlSeconds": rec.ttl_seconds,
            "State": rec.state,
            "CreatedAt": rec.created_at,
            "ExpiresAt": rec.expires_at,
            "ApprovalsRequired": rec.approvals_required,
            "Reason": rec.reason,
            "Approvals": json.dumps([a.to_dict() for a in rec.approvals]),
            "DecidedBy": rec.decided_by,
            "DecidedByOid": rec.decided_by_oid,
            "DecidedByName": rec.decided_by_name,
            "DecidedAt": rec.decided_at,
            "Comment": rec.comment,
            "Serial": str(rec.serial) if rec.serial is not None else None,
            "KeyId": rec.key_id,
            "AuditHead": rec.audit_head,
            "Ix": 1,  # its index rows exist (rows written before the indexes lack it)
            "AuditSeq": rec.audit_seq,
        }

    @staticmethod
    def _request_from_entity(e: Any) -> RequestRecord:
        return RequestRecord(
            id=e.get("RequestId") or e["RowKey"][4:],
            tenant_id=e["PartitionKey"],
            policy_id=e["PolicyId"],
            requester_oid=e["RequesterOid"],
            requester_upn=e["RequesterUpn"],
            requester_name=e.get("RequesterName") or "",
            host=e["Host"],
            principal=e["Principal"],
            ttl_seconds=int(e["TtlSeconds"]),
            state=e["State"],
            created_at=int(e["CreatedAt"]),
            expires_at=int(e["ExpiresAt"]),
            approvals_required=int(e.get("ApprovalsRequired") or 0),
            reason=e.get("Reason"),
            approvals=tuple(Approval(**a) for a in json.loads(e.get("Approvals") or "[]")),
            decided_by=e.get("DecidedBy"),
            decided_by_oid=e.get("DecidedByOid"),
            decided_by_name=e.get("DecidedByName") or "",
            decided_at=int(e["DecidedAt"]) if e.get("DecidedAt") is not None else None,
            comment=e.get("Comment"),
            serial=int(e["Serial"]) if e.get("Serial") else None,
            key_id=e.get("KeyId"),
            audit_head=e.get("AuditHead") or "0" * 64,
            audit_seq=int(e.get("AuditSeq") or 0),
            etag=e.metadata.get("etag"),
            indexed=bool(e.get("Ix")),
        )

    @classmethod
    def _index_ops(cls, rec: RequestRecord, *, new: bool) -> list:
        """The index rows of `rec` in its new state, for the transaction that writes it: the user's
        copy always; while open, the copies under the user's, the policy's and the tenant's open
        requests and the expiry key; once decided, the open copies and the expiry key deleted. A
        request not yet indexed (an old row) gets its rows added, never deleted. The key of the
        deadline an approval replaced stays until the sweep finds it due and drops it."""
        copy = {k: v for k, v in cls._request_entity(rec).items() if k != "Ix"} | {
            "RequestId": rec.id,
            "Kind": "request-index",
        }
        turned = index_position(rec)
        write = "create" if new else "upsert"
        opts = () if new else ({"mode": UpdateMode.REPLACE},)
        ops: list = [(write, copy | {"RowKey": f"rqu|{rec.requester_oid}|{turned}"}, *opts)]
        open_keys = (f"rqm|{rec.requester_oid}|{turned}", f"rqo|{rec.policy_id}|{turned}", f"rqt|*|{turned}")
        if rec.state in OPEN_STATES:
            ops += [(write, copy | {"RowKey": key}, *opts) for key in open_keys]
            ops.append(
                (
                    write,
                    {
                        "PartitionKey": rec.tenant_id,
                        "RowKey": _expiry_key(rec.expires_at, rec.id),
                        "Kind": "request-expiry",
                        "RequestId": rec.id,
                    },
                    *opts,
                )
            )
        elif rec.indexed and not new:  # decisions keep the deadline, so its key is the one written
            ops += [
                ("delete", {"PartitionKey": rec.tenant_id, "RowKey": key})
                for key in (*open_keys, _expiry_key(rec.expires_at, rec.id))
            ]
        return ops

    def get_request(self, tenant_id: str, request_id: str) -> RequestRecord:
        try:
            e = _guard("get request", lambda: self._table.get_entity(tenant_id, f"req|{request_id}"))
        except ResourceNotFoundError:
            raise NotFound(f"Request {request_id!r} was not found.") from None
        return self._request_from_entity(e)

    def list_requests(self, tenant_id: str, state: str | None = None) -> list[RequestRecord]:
        flt = "PartitionKey eq @pk and RowKey ge @lo and RowKey lt @hi"
        params = {"pk": tenant_id, "lo": "req|", "hi": "req}"}
        if state:
            flt += " and State eq @state"
            params["state"] = state
        rows = _guard("list requests", lambda: list(self._table.query_entities(flt, parameters=params)))
        return [self._request_from_entity(e) for e in rows]

    def list_request_index(
        self, tenant_id: str, index: str, key: str, *, after: str | None = None, limit: int = 100
    ) -> list[RequestRecord]:
        prefix = f"{INDEX_PREFIX[index]}|{key}|"
        lo = prefix + after if after else prefix
        flt = f"PartitionKey eq @pk and RowKey {'gt' if after else 'ge'} @lo and RowKey lt @hi"
        params = {"pk": tenant_id, "lo": lo, "hi": prefix[:-1] + "}"}
        rows = _guard(
            "list requests",
            lambda: list(
                itertools.islice(
                    self._table.query_entities(flt, parameters=params, results_per_page=max(1, limit)), max(0, limit)
                )
            ),
        )
        return [replace(self._request_from_entity(e), etag=None, indexed=True) for e in rows]

    def due_requests(self, tenant_id: str, now: int, limit: int = 100) -> list[tuple[int, str]]:
        flt = "PartitionKey eq @pk and RowKey ge @lo and RowKey lt @hi"
        params = {"pk": tenant_id, "lo": "rqx|", "hi": f"rqx|{now + 1:010d}"}
        rows = _guard(
            "list due requests",
            lambda: list(
                itertools.islice(
                    self._table.query_entities(
                        flt, parameters=params, results_per_page=max(1, limit), select=["RowKey"]
                    ),
                    max(0, limit),
                )
            ),
        )
        return [(int(e["RowKey"].split("|")[1]), e["RowKey"].split("|")[2]) for e in rows]

    def remove_expiry_key(self, tenant_id: str, expires_at: int, request_id: str) -> None:
        try:
            _guard(
                "remove expiry key", lambda: self._table.delete_entity(tenant_id, _expiry_key(expires_at, request_id))
            )
        except ResourceNotFoundError:
            pass

    # Row rqc|<policy id>|<oid>: the pending slots of one user under one policy (PendingSlots).
    def get_pending_slots(self, tenant_id: str, policy_id: str, owner_oid: str) -> PendingSlots:
        try:
            e = _guard("get pending slots", lambda: self._table.get_entity(tenant_id, f"rqc|{policy_id}|{owner_oid}"))
        except ResourceNotFoundError:
            return PendingSlots(tenant_id, policy_id, owner_oid)
        return PendingSlots(
            tenant_id,
            policy_id,
            owner_oid,
            tuple((str(r), int(x)) for r, x in json.loads(e.get("Requests") or "[]")),
            etag=e.metadata.get("etag"),
        )

    @staticmethod
    def _slots_op(slots: PendingSlots) -> tuple:
        entity = {
            "PartitionKey": slots.tenant_id,
            "RowKey": f"rqc|{slots.policy_id}|{slots.owner_oid}",
            "Kind": "pending-slots",
            "Requests": json.dumps([list(r) for r in slots.requests]),
        }
        if slots.etag is None:
            return ("create", entity)
        return ("update", entity, _if_match(slots.etag))

    def create_request(
        self,
        rec: RequestRecord,
        audit: AuditEntry,
        idempotency: IdempotencyRecord | None = None,
        slots: PendingSlots | None = None,
    ) -> RequestRecord:
        """One transaction: the request row carrying its first audit entry (and an idempotency key that
        names it), its index rows, an idempotency key's row of its own and the pending slots (only if
        still at their ETag)."""
        if slots is not None and slots.tenant_id != rec.tenant_id:
            raise ValueError("Partition Keys in the batch must all be the same.")
        entity = self._request_entity(rec) | self._embedded_audit(rec.tenant_id, [audit])
        exists = Conflict("That request already exists.")
        ops = [("create", entity), *self._index_ops(rec, new=True)]
        if idempotency is not None and idempotency.on_request_row:
            entity |= self._key_on_row(rec, idempotency)
        elif idempotency is not None:
            ops.append(("create", self._idempotency_entity(idempotency)))
        lost: EzsshError = exists
        if slots is not None:
            ops.append(self._slots_op(slots))
            lost = PreconditionFailed("Your pending requests under this policy changed at the same time; retry.")
        try:
            resp = transact(
                self._table,
                "create request",
                ops,
                not_found=f"Request {rec.id!r} was not found.",
                lost=lost,
                exists=exists,
            )
        except Conflict:
            if (
                slots is not None
                and slots.etag is None
                and self.get_pending_slots(rec.tenant_id, slots.policy_id, slots.owner_oid).etag is not None
            ):
                raise lost from None  # the slots row was created meanwhile: a lost race, not a used id
            raise
        return replace(rec, etag=resp[0].get("etag"), indexed=True)

    def update_request(self, rec: RequestRecord, etag: str, audit: AuditEntry) -> RequestRecord:
        """The request row (only if still at `etag`) and its audit entry, in one transaction. The row is
        merged, so what it carries besides the request (its first audit entries) stays."""
        ops = [
            ("update", self._request_entity(rec), _if_match(etag, UpdateMode.MERGE)),
            *self._audit_ops(audit),
            *self._index_ops(rec, new=False),
        ]
        resp = transact(
            self._table,
            "update request",
            ops,
            not_found=f"Request {rec.id!r} was not found.",
            lost=Conflict(f"Request {rec.id} changed at the same time; read it again."),
            exists=Conflict(f"Request {rec.id} changed at the same time; read it again."),
        )
        return replace(rec, etag=resp[0].get("etag"), indexed=True)

    def backfill_request_indexes(self, tenant_id: str, budget: int) -> tuple[int, bool]:
        """Rows req| without Ix (written before the indexes) get their index rows, each in one
        transaction with Ix set on the row if it is still at the ETag read (a request changed
        meanwhile was indexed by that change). A request issued at once (its certificate's audit
        entry in its own row, Audit1) has none: only requests that waited for a decision are indexed.
        First the open ones (what approvers and the sweep need; the store picks them out, as this
        runs once per tenant), then all the rest in order. Row mig|requests keeps where each pass
        stopped, so each call reads at most `budget` rows."""
        try:
            mark = dict(_guard("read backfill marker", lambda: self._table.get_entity(tenant_id, "mig|requests")))
        except ResourceNotFoundError:
            mark = {"PartitionKey": tenant_id, "RowKey": "mig|requests", "Kind": "migration"}
        if mark.get("Finished"):
            return 0, True
        indexed, left = 0, max(1, budget)
        for pass_, done in (("Open", "OpenDone"), ("All", "Finished")):
            if mark.get(done):
                continue
            flt = "PartitionKey eq @pk and RowKey gt @lo and RowKey lt @hi"
            if pass_ == "Open":
                flt += " and ( State eq @pending or State eq @approved )"  # the SDK binds @names between spaces
            params = {
                "pk": tenant_id,
                "lo": f"req|{mark.get(pass_ + 'After') or ''}",
                "hi": "req}",
                "pending": PENDING,
                "approved": APPROVED,
            }
            pages = self._table.query_entities(flt, parameters=params, results_per_page=min(left, 1000))  # lazy
            rows: list[TableEntity] = _guard("backfill request indexes", partial(list, itertools.islice(pages, left)))
            indexed += sum(self._backfill_one(tenant_id, e) for e in rows if not (e.get("Ix") or e.get("Audit1")))
            if rows:
                mark[pass_ + "After"] = rows[-1]["RowKey"][4:]
            left -= len(rows)
            if not left:
                break  # the budget is spent; this pass goes on at the next call
            mark[done] = True
        _guard("write backfill marker", lambda: self._table.upsert_entity(mark, mode=UpdateMode.REPLACE))
        return indexed, bool(mark.get("Finished"))

    def _backfill_one(self, tenant_id: str, e: Any) -> bool:
        rec = self._request_from_entity(e)
        ops = [
            (
                "update",
                {"PartitionKey": tenant_id, "RowKey": e["RowKey"], "Ix": 1},
                _if_match(rec.etag or "", UpdateMode.MERGE),
            ),
            *self._index_ops(rec, new=False),
        ]
        try:
            transact(
                self._table,
                "backfill request indexes",
                ops,
                not_found="gone",
                lost=Conflict("changed"),
                exists=Conflict("changed"),
            )
            return True
        except (Conflict, NotFound):
            return False  # changed meanwhile (and so indexed by that change), or deleted

    def _insert(self, op: str, entity: dict, exists: EzsshError) -> dict:
        try:
            return _guard(op, lambda: self._table.create_entity(entity))
        except ResourceExistsError:
            raise exists from None
        except HttpResponseError as exc:  # 409/412 that the SDK did not map
            raise exists from exc

    # ---- idempotency keys ---------------------------------------------------------------------
    # A key that names its request's id (a UUIDv7: core.serials.keyed_request_id) is carried by the
    # request row itself (IdemKey, IdemDigest): a retry's insert finds the row, and one point read
    # the first answer. Any other key has a row idk|<requester oid>|<sha-256 of the key>, written in
    # the same transaction as its request.
    @staticmethod
    def _idempotency_entity(i: IdempotencyRecord) -> dict:
        return {
            "PartitionKey": i.tenant_id,
            "RowKey": f"idk|{i.owner_oid}|{i.key_hash}",
            "Kind": "idempotency",
            "RequestId": i.request_id,
            "Digest": i.digest,
            "CreatedAt": i.created_at,
        }

    @staticmethod
    def _key_on_row(rec: RequestRecord, i: IdempotencyRecord | None) -> dict:
        if i is None:
            return {}
        if (i.tenant_id, i.owner_oid, i.request_id) != (rec.tenant_id, rec.requester_oid, rec.id):
            raise ValueError("An idempotency key rides only on the row of the request it names, of its owner.")
        return {"IdemKey": i.key_hash, "IdemDigest": i.digest, "IdemAt": i.created_at}

    def get_idempotency(
        self, tenant_id: str, owner_oid: str, key_hash: str, request_id: str | None = None
    ) -> IdempotencyRecord | None:
        row_key = f"req|{request_id}" if request_id is not None else f"idk|{owner_oid}|{key_hash}"
        try:
            e = _guard(
                "get idempotency key",
                lambda: self._table.get_entity(
                    tenant_id,
                    row_key,
                    select=None if request_id is None else ["RequesterOid", "IdemKey", "IdemDigest", "IdemAt"],
                ),
            )
        except ResourceNotFoundError:
            return None
        if request_id is None:
            return IdempotencyRecord(
                tenant_id=tenant_id,
                owner_oid=owner_oid,
                key_hash=key_hash,
                request_id=e["RequestId"],
                digest=e["Digest"],
                created_at=int(e["CreatedAt"]),
            )
        if e.get("IdemKey") != key_hash or e.get("RequesterOid") != owner_oid:
            return None
        return IdempotencyRecord(
            tenant_id=tenant_id,
            owner_oid=owner_oid,
            key_hash=key_hash,
            request_id=request_id,
            digest=e["IdemDigest"],
            created_at=int(e["IdemAt"]),
            on_request_row=True,
        )
