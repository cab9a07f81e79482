"""Table Storage repositories (azure-data-tables). Azurite locally, a storage account in Azure.

One table holds everything, partitioned by tenant id, so that a change and its audit entries are
written in one atomic write (one row, or one entity-group transaction in that partition):

    PartitionKey = <tid>
    RowKey       = pol|<policy id>              a policy (document as JSON)
                   req|<request id>             an access request; once issued also its certificate;
                                                the audit entries written with it (Audit0, Audit1)
                   rvp|<policy id>|<valid_before>|<serial>   a revoked certificate, per policy by expiry
                   rvh|<valid_before>|<policy id>|<serial>   a revoked HOST certificate, per tenant by expiry
                                                (valid_before: 10 digits; serial zero-padded to 19)
                   ver|<policy id>  ver|*       versions of what hosts and clients cache: a policy's
                                                revocations (its KRL); the tenant's policies and host
                                                revocations (known-hosts). See trust_version.
                   aud|<position>               an audit entry (oldest first; storage/base.py)
                   axr| axu| axp| axs| axk|     copies of it by request, actor, policy, serial, key id
                   idk|<oid>|<key hash>         an idempotency key and the request it made (keys
                                                that name their request ride on its row instead)
                   rqu|<oid>|<newest-first id>  request index: a user's requests (a copy of each)
                   rqm|<oid>|<newest-first id>  request index: a user's open (pending/approved) requests
                   rqo|<policy>|<newest-first id>  request index: a policy's open requests (approvers')
                   rqt|*|<newest-first id>      request index: the tenant's open requests
                   rqx|<expires_at>|<request id>   expiry key of an open request (the sweep's index)
                   rqc|<policy>|<oid>           pending slots: a user's pending requests under a policy
                   mig|requests                 how far the backfill of old request rows has got
                   htk| hch| hky|               host enrolment tokens, renewal challenges, host keys
                                                (hostrecords.py)

A request id is the serial of its certificate in hex, time first (core.serials): request rows sort
by time, a serial is unique in its tenant because the row is, and a certificate is one point read
from its serial or key id. An auto-approved issuance is ONE insert of the request row.

Refusals from callers whose token did not verify have no trustworthy tenant; their audit entries go
to the partition `_unauthenticated`.

Every state change on a policy or request is conditional on the ETag it was read with (If-Match). A
lost race raises Conflict (409). If-Match holds inside a batch too (Table Storage and Azurite 3.37
alike; tests/contract/test_store.py checks it). A batch costs the client several times
the CPU of a single insert whatever its size (azure-core builds and parses it with the email package,
in thread pools of its own; bench/issue.py measures both): the hot path writes one row.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from functools import partial
from typing import Any, TypeVar

from azure.core.exceptions import HttpResponseError, ResourceExistsError, ResourceNotFoundError
from azure.data.tables import TableClient, TableEntity, TableServiceClient, UpdateMode

from ..core.audit import AuditEntry
from ..core.errors import Conflict, EzsshError, NotFound, PreconditionFailed
from ..core.policy import Policy
from ..core.policydoc import policy_from_row
from ..core.records import CertificateRecord, IdempotencyRecord, PendingSlots, Revoked, TrustVersion
from ..core.requests import APPROVED, OPEN_STATES, PENDING, Approval, RequestRecord
from ..core.serials import SERIAL_RANDOM_BITS, request_id_of_serial, request_of, serial_floor, serial_of_request_id
from ..deadline import deadline_hook
from .base import (
    BY_USER,
    OPEN_BY_POLICY,
    OPEN_BY_USER,
    OPEN_IN_TENANT,
    AuditPage,
    AuditQuery,
    Positioned,
    audit_position,
    index_position,
    merge_pages,
    position_ms,
    read_audit,
)
from .hostrecords import HostRecords
from .tablecalls import TENANT_VERSION, _guard, _if_match, transact, version_entity
from .transport import client_options, endpoint_of

log = logging.getLogger(__name__)
UNAUTHENTICATED = "_unauthenticated"
# A user waits on every call: retry briefly, then answer 503 rather than hang for azure-core's
# default of ten retries with exponential backoff.
CLIENT_OPTIONS = dict(
    retry_total=3,
    retry_backoff_factor=0.2,
    retry_backoff_max=2,
    connection_timeout=5,
    read_timeout=20,
    raw_request_hook=deadline_hook,
)


def _serial_key(serial: int) -> str:
    return f"{serial:019d}"


INDEX_PREFIX = {BY_USER: "rqu", OPEN_BY_USER: "rqm", OPEN_BY_POLICY: "rqo", OPEN_IN_TENANT: "rqt"}


def _expiry_key(expires_at: int, request_id: str) -> str:
    return f"rqx|{expires_at:010d}|{request_id}"


def _in_order(rows: list[Positioned], lo: str, hi: str) -> list[Positioned]:
    return sorted((r for r in rows if lo < r[0] < hi), key=lambda r: r[0])


R = TypeVar("R")  # what a range read's rows are made into


class TableStore(HostRecords):
    def __init__(self, service: TableServiceClient, table_name: str = "ezssh") -> None:
        self._service = service
        self._table_name = table_name
        self._table: TableClient = service.get_table_client(table_name)
        self._legacy_done: set[str] = set()  # tenants with no revocation rows of the first layout

    @classmethod
    def from_connection_string(cls, conn: str, table_name: str = "ezssh") -> TableStore:
        return cls(
            TableServiceClient.from_connection_string(conn, **client_options(endpoint_of(conn), CLIENT_OPTIONS)),
            table_name,
        )

    @classmethod
    def from_account_url(cls, url: str, credential: Any, table_name: str = "ezssh") -> TableStore:
        return cls(
            TableServiceClient(endpoint=url, credential=credential, **client_options(url, CLIENT_OPTIONS)), table_name
        )

    def ensure_table(self) -> None:
        def create() -> None:
            try:
                self._service.create_table(self._table_name)
            except ResourceExistsError:
                pass

        _guard("create table", create)

    def health(self) -> None:
        rows = self._table.query_entities("PartitionKey eq @pk", parameters={"pk": "_health"}, results_per_page=1)
        _guard("health", lambda: next(iter(rows), None))

    # ---- policies ---------------------------------------------------------------------------
    @staticmethod
    def _policy_entity(policy: Policy) -> dict:
        return {
            "PartitionKey": policy.tenant_id,
            "RowKey": f"pol|{policy.id}",
            "Kind": "policy",
            "Doc": json.dumps(policy.to_dict(), separators=(",", ":")),
            "Deleted": policy.deleted,
            "AuditHead": policy.audit_head,
            "AuditSeq": policy.audit_seq,
        }

    @staticmethod
    def _policy_from_entity(e: Any) -> Policy:
        return policy_from_row(
            json.loads(e["Doc"]),
            etag=e.metadata.get("etag"),
            audit_head=e.get("AuditHead"),
            audit_seq=int(e.get("AuditSeq") or 0),
        )

    def list_policies(self, tenant_id: str) -> list[Policy]:
        rows = _guard(
            "list policies",
            lambda: list(
                self._table.query_entities(
                    "PartitionKey eq @pk and RowKey ge @lo and RowKey lt @hi",
                    parameters={"pk": tenant_id, "lo": "pol|", "hi": "pol}"},
                )
            ),
        )
        return [self._policy_from_entity(e) for e in rows]

    def get_policy(self, tenant_id: str, policy_id: str) -> Policy:
        try:
            e = _guard("get policy", lambda: self._table.get_entity(tenant_id, f"pol|{policy_id}"))
        except ResourceNotFoundError:
            raise NotFound(f"Policy {policy_id!r} was not found.") from None
        return self._policy_from_entity(e)

    def create_policy(self, policy: Policy, audit: AuditEntry) -> Policy:
        ops = [
            ("create", self._policy_entity(policy)),
            *self._audit_ops(audit),
            version_entity(policy.tenant_id, TENANT_VERSION, audit.at),
        ]
        resp = transact(
            self._table,
            "create policy",
            ops,
            not_found=f"Policy {policy.id!r} was not found.",
            lost=Conflict(f"A policy with id {policy.id!r} already exists."),
            exists=Conflict(f"A policy with id {policy.id!r} already exists."),
        )
        return self._with_etag(policy, resp[0].get("etag"))

    def replace_policy(self, policy: Policy, etag: str, audit: AuditEntry) -> Policy:
        """The policy row (only if still at `etag`), its audit entry and the tenant's version row
        (known-hosts), in one transaction."""
        ops = [
            ("update", self._policy_entity(policy), _if_match(etag)),
            *self._audit_ops(audit),
            version_entity(policy.tenant_id, TENANT_VERSION, audit.at),
        ]
        resp = transact(
            self._table,
            "update policy",
            ops,
            not_found=f"Policy {policy.id!r} was not found.",
            lost=PreconditionFailed(
                f"Policy {policy.id!r} changed since you read it (ETag mismatch); read it again and retry."
            ),
            exists=Conflict("That audit entry was already written; read the policy again."),
        )
        return self._with_etag(policy, resp[0].get("etag"))

    @staticmethod
    def _with_etag(policy: Policy, etag: str | None) -> Policy:
        return replace(policy, etag=etag)

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

    # ---- certificates -----------------------------------------------------------------------
    # A user certificate lives in its request's row (its serial is the request id: core.serials),
    # so recording an issuance is one write and finding a certificate by serial one point read. Host
    # certificates have rows crt|<policy id>|<serial> (hostrecords.py). Revoked certificates of
    # either kind also get index rows keyed by expiry (see "revocation" below).
    @staticmethod
    def _cert_fields(c: CertificateRecord) -> dict:
        return {
            "CertKeyId": c.key_id,
            "Principals": json.dumps(list(c.principals)),
            "ValidAfter": c.valid_after,
            "ValidBefore": c.valid_before,
            "CaFingerprint": c.ca_fingerprint,
            "PublicKeyFingerprint": c.public_key_fingerprint,
            "Certificate": c.certificate,
            "RevokedAt": c.revoked_at,
            "RevokedBy": c.revoked_by,
            "RevokedByOid": c.revoked_by_oid,
        }

    @classmethod
    def _cert_entity(cls, c: CertificateRecord) -> dict:
        """A host certificate's own row (hostrecords.py; a user certificate lives in its request's row)."""
        return {
            "PartitionKey": c.tenant_id,
            "RowKey": f"crt|{c.policy_id}|{_serial_key(c.serial)}",
            "Kind": "certificate",
            "PolicyId": c.policy_id,
            "Serial": str(c.serial),
            "RequestId": c.request_id,
            "RequesterOid": c.requester_oid,
            "RequesterUpn": c.requester_upn,
            "Host": c.host,
            **cls._cert_fields(c),
        }

    @staticmethod
    def _cert_from_entity(e: Any, request_id: str | None = None) -> CertificateRecord:
        return CertificateRecord(
            tenant_id=e["PartitionKey"],
            policy_id=e["PolicyId"],
            serial=int(e["Serial"]),
            key_id=e["CertKeyId"] if "CertKeyId" in e else e["KeyId"],
            request_id=request_id or e["RequestId"],
            requester_oid=e["RequesterOid"],
            requester_upn=e["RequesterUpn"],
            principals=tuple(json.loads(e["Principals"])),
            host=e["Host"],
            valid_after=int(e["ValidAfter"]),
            valid_before=int(e["ValidBefore"]),
            ca_fingerprint=e["CaFingerprint"],
            public_key_fingerprint=e["PublicKeyFingerprint"],
            certificate=e["Certificate"],
            revoked_at=e.get("RevokedAt"),
            revoked_by=e.get("RevokedBy"),
            revoked_by_oid=e.get("RevokedByOid"),
            etag=e.metadata.get("etag"),
        )

    @staticmethod
    def _check_issuance(rec: RequestRecord, cert: CertificateRecord) -> None:
        if (cert.tenant_id, cert.policy_id, cert.request_id, cert.serial) != (
            rec.tenant_id,
            rec.policy_id,
            rec.id,
            rec.serial,
        ):
            raise ValueError("The certificate record does not belong to this request.")
        if serial_of_request_id(rec.id) != cert.serial:
            raise Conflict(f"The certificate's serial must be its request's own ({rec.id}); nothing was recorded.")

    def record_issuance(
        self,
        rec: RequestRecord,
        etag: str | None,
        cert: CertificateRecord,
        audit: Sequence[AuditEntry],
        idempotency: IdempotencyRecord | None = None,
    ) -> None:
        """The request in its "issued" state, its certificate and the audit entries, atomically.

        A new request (etag None) is ONE insert of its row carrying the certificate and the audit
        entries (and an idempotency key that names it; a key in a row of its own: one transaction
        with that row). An approved request
        is one transaction: its row merged only if still at `etag` (the claim that exactly one caller
        moves it to "issued") and the issuance's audit row. The serial is the request id's, so a used
        serial is a used request id: a lost race or a used serial, request id or idempotency key
        leaves everything unwritten."""
        self._check_issuance(rec, cert)
        entity = self._request_entity(rec) | self._cert_fields(cert)
        exists = Conflict("The certificate could not be recorded (serial or request already used); retry.")
        if etag is None:
            entity |= self._embedded_audit(rec.tenant_id, audit)
            if idempotency is None or idempotency.on_request_row:
                self._insert("record issuance", entity | self._key_on_row(rec, idempotency), exists)
                return
            ops: list = [("create", entity), ("create", self._idempotency_entity(idempotency))]
        else:
            ops = [("update", entity, _if_match(etag, UpdateMode.MERGE)), *self._index_ops(rec, new=False)]
            ops += [op for a in audit for op in self._audit_ops(a)]
            if idempotency is not None:
                ops.append(("create", self._idempotency_entity(idempotency)))
        transact(
            self._table,
            "record issuance",
            ops,
            not_found=f"Request {rec.id!r} was not found.",
            lost=Conflict(f"Request {rec.id} changed at the same time; read it again."),
            exists=exists,
        )

    def get_certificate(self, tenant_id: str, policy_id: str, serial: int) -> CertificateRecord:
        return self._find_certificate(tenant_id, policy_id, serial)[0]

    def live_user_certificates(
        self, tenant_id: str, now: int, window: int, requester_oid: str | None = None
    ) -> list[CertificateRecord]:
        flt = "PartitionKey eq @pk and RowKey ge @lo and RowKey lt @hi and ValidBefore gt @now"
        params: dict[str, Any] = {
            "pk": tenant_id,
            "lo": f"req|{serial_floor((now - window) * 1000):016x}",
            "hi": "req}",
            "now": now,
        }
        if requester_oid is not None:
            flt += " and RequesterOid eq @oid"
            params["oid"] = requester_oid
        rows = _guard("list live certificates", lambda: list(self._table.query_entities(flt, parameters=params)))
        return [
            self._cert_from_entity(e, request_id=e["RowKey"][4:])
            for e in rows
            if e.get("Certificate") and e.get("RevokedAt") is None
        ]

    def _find_certificate(self, tenant_id: str, policy_id: str, serial: int) -> tuple[CertificateRecord, str]:
        """The certificate and the row that holds it: its request's row (user certificates, one point
        read), else its own crt| row (host certificates)."""
        missing = NotFound(f"No certificate with serial {serial} was issued under policy {policy_id!r}.")
        if not 0 < serial < 1 << 63:
            raise missing
        rid = request_id_of_serial(serial)
        for row_key in (f"req|{rid}", f"crt|{policy_id}|{_serial_key(serial)}"):
            try:
                e = _guard("get certificate", partial(self._table.get_entity, tenant_id, row_key))
            except ResourceNotFoundError:
                continue
            if e.get("PolicyId") == policy_id and e.get("Certificate") and e.get("Serial") == str(serial):
                return self._cert_from_entity(e, request_id=rid if row_key.startswith("req|") else None), row_key
        raise missing

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
        return read_audit(self, tenant_id, AuditQuery(since=since, until=until, request_id=request_id), limit)

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

    # ---- revocation -------------------------------------------------------------------------
    # A revocation writes index rows keyed by the certificate's expiry, so a KRL is a range read from
    # "now minus the grace" that never reaches expired revocations: rvp| per policy (the policy's
    # KRL, user and host certificates) and, for a host certificate, rvh| per tenant (known-hosts,
    # which never reads a user revocation); and rvt|<policy>|<revoked_at>|<serial>, by time of
    # revocation, so a worker holding a KRL reads only what was revoked since. Rows of the first layout (rev|<policy>|<serial>, not
    # keyed by expiry) are read too until migrate_revocations (the housekeeping timer) moved them.
    LEGACY = ("rev|", "rev}")
    REVOKED_FIELDS = ["PolicyId", "Serial", "CaFingerprint", "ValidBefore", "RevokedAt", "HostCert"]

    @staticmethod
    def _revoked_rows(r: Revoked, tenant_id: str) -> list[tuple]:
        fields = {
            "PartitionKey": tenant_id,
            "Kind": "revoked",
            "PolicyId": r.policy_id,
            "Serial": str(r.serial),
            "CaFingerprint": r.ca_fingerprint,
            "ValidBefore": r.valid_before,
            "RevokedAt": r.revoked_at,
            "HostCert": r.host,
        }
        keys = [
            f"rvp|{r.policy_id}|{r.valid_before:010d}|{_serial_key(r.serial)}",
            f"rvt|{r.policy_id}|{max(0, r.revoked_at):010d}|{_serial_key(r.serial)}",
        ]
        if r.host:
            keys.append(f"rvh|{r.valid_before:010d}|{r.policy_id}|{_serial_key(r.serial)}")
        return [("upsert", fields | {"RowKey": k}, {"mode": UpdateMode.REPLACE}) for k in keys]

    @staticmethod
    def _revoked_from(e: Any) -> Revoked:
        host = e.get("HostCert")
        return Revoked(
            policy_id=e["PolicyId"],
            serial=int(e["Serial"]),
            ca_fingerprint=e["CaFingerprint"],
            valid_before=int(e["ValidBefore"]),
            revoked_at=int(e.get("RevokedAt") or 0),
            host=bool(host) if host is not None else not e.get("RequestId"),
        )  # old rows: no request

    def revoke_certificate(self, cert: CertificateRecord, etag: str, audit: AuditEntry) -> CertificateRecord:
        """In one transaction: RevokedAt/RevokedBy on the row holding the certificate (its request's,
        or its own crt| row for a host certificate) if unchanged since read, its audit entry, the
        index rows the KRLs are read from, and the version rows of what changed (the policy's KRL;
        for a host certificate also the tenant's known-hosts)."""
        if (audit.tenant_id or UNAUTHENTICATED) != cert.tenant_id:
            raise ValueError("Partition Keys in the batch must all be the same.")
        _, row_key = self._find_certificate(
            cert.tenant_id, cert.policy_id, cert.serial
        )  # NotFound unless this policy's
        host = row_key.startswith("crt|")
        entity = {
            "PartitionKey": cert.tenant_id,
            "RowKey": row_key,
            "RevokedAt": cert.revoked_at,
            "RevokedBy": cert.revoked_by,
            "RevokedByOid": cert.revoked_by_oid,
        }
        index = Revoked(cert.policy_id, cert.serial, cert.ca_fingerprint, cert.valid_before, cert.revoked_at or 0, host)
        ops = [
            ("update", entity, _if_match(etag, UpdateMode.MERGE)),
            *self._audit_ops(audit),
            *self._revoked_rows(index, cert.tenant_id),
            version_entity(cert.tenant_id, f"ver|{cert.policy_id}", audit.at),
        ]
        if host:
            ops.append(version_entity(cert.tenant_id, TENANT_VERSION, audit.at))
        lost = Conflict(f"Certificate {cert.serial} changed at the same time; read it again.")
        resp = transact(
            self._table,
            "revoke certificate",
            ops,
            not_found=f"No certificate with serial {cert.serial} was issued under policy {cert.policy_id!r}.",
            lost=lost,
            exists=lost,
        )
        return replace(cert, etag=resp[0].get("etag"))

    def _range(self, op: str, tenant_id: str, lo: str, hi: str, select: list[str] | None = None) -> list:
        return _guard(
            op,
            lambda: list(
                self._table.query_entities(
                    "PartitionKey eq @pk and RowKey ge @lo and RowKey lt @hi",
                    parameters={"pk": tenant_id, "lo": lo, "hi": hi},
                    select=select,
                )
            ),
        )

    def list_revoked(self, tenant_id: str, policy_id: str, *, valid_from: int) -> list[Revoked]:
        rows = self._range(
            "list revoked",
            tenant_id,
            f"rvp|{policy_id}|{max(0, valid_from):010d}",
            f"rvp|{policy_id}}}",
            self.REVOKED_FIELDS,
        )
        if self._legacy_left(tenant_id):
            rows += self._range(
                "list revoked",
                tenant_id,
                f"rev|{policy_id}|",
                f"rev|{policy_id}}}",
                self.REVOKED_FIELDS + ["RequestId"],
            )
        return [self._revoked_from(e) for e in rows]

    def list_revoked_since(self, tenant_id: str, policy_id: str, *, revoked_from: int) -> list[Revoked]:
        rows = self._range(
            "list revoked",
            tenant_id,
            f"rvt|{policy_id}|{max(0, revoked_from):010d}",
            f"rvt|{policy_id}}}",
            self.REVOKED_FIELDS,
        )
        return [self._revoked_from(e) for e in rows]

    def list_revoked_host(self, tenant_id: str, *, valid_from: int) -> list[Revoked]:
        rows = self._range("list revoked", tenant_id, f"rvh|{max(0, valid_from):010d}", "rvh}", self.REVOKED_FIELDS)
        out = [self._revoked_from(e) for e in rows]
        if self._legacy_left(tenant_id):
            legacy = self._range("list revoked", tenant_id, *self.LEGACY, self.REVOKED_FIELDS + ["RequestId"])
            out += [r for r in map(self._revoked_from, legacy) if r.host]
        return out

    def _legacy_left(self, tenant_id: str) -> bool:
        """Are there revocation rows of the first layout in this tenant? Once none are (this code
        writes none), the answer is kept for the worker's life: one read per tenant and worker."""
        if tenant_id in self._legacy_done:
            return False
        left = _guard(
            "list revoked",
            lambda: next(
                iter(
                    self._table.query_entities(
                        "PartitionKey eq @pk and RowKey ge @lo and RowKey lt @hi",
                        parameters={"pk": tenant_id, "lo": self.LEGACY[0], "hi": self.LEGACY[1]},
                        select=["RowKey"],
                        results_per_page=1,
                    )
                ),
                None,
            ),
        )
        if left is None:
            self._legacy_done.add(tenant_id)
        return left is not None

    def migrate_revocations(self, tenant_id: str, limit: int = 300) -> int:
        """Old rev| rows to the expiry-keyed layout: per policy, one transaction writes the index rows,
        deletes the old rows and moves the policy's version forward (conditional on the version row
        read, so a revocation landing meanwhile is never overwritten)."""
        rows = _guard(
            "migrate revoked",
            lambda: list(
                itertools.islice(
                    self._table.query_entities(
                        "PartitionKey eq @pk and RowKey ge @lo and RowKey lt @hi",
                        parameters={"pk": tenant_id, "lo": self.LEGACY[0], "hi": self.LEGACY[1]},
                        select=self.REVOKED_FIELDS + ["RequestId", "RowKey"],
                        results_per_page=min(limit, 1000),
                    ),
                    limit,
                )
            ),
        )
        by_policy: dict[str, list] = {}
        for e in rows:
            by_policy.setdefault(e["PolicyId"], []).append(e)
        moved = 0
        for pid, group in by_policy.items():
            for k in range(0, len(group), 24):  # 4 rows each at most, plus the version: under 100 a transaction
                chunk = group[k : k + 24]
                version = self.trust_version(tenant_id, pid)
                at = max([version.at] + [int(e.get("RevokedAt") or 0) for e in chunk])
                ops: list = []
                for e in chunk:
                    ops += self._revoked_rows(self._revoked_from(e), tenant_id)
                    ops.append(("delete", {"PartitionKey": tenant_id, "RowKey": e["RowKey"]}))
                ver = {"PartitionKey": tenant_id, "RowKey": f"ver|{pid}", "Kind": "version", "At": at}
                ops.append(("update", ver, _if_match(version.tag)) if version.tag else ("create", ver))
                try:
                    transact(
                        self._table,
                        "migrate revoked",
                        ops,
                        not_found="revocation moved meanwhile",
                        lost=Conflict("revoked meanwhile"),
                        exists=Conflict("revoked meanwhile"),
                    )
                except (Conflict, NotFound):
                    continue  # a revocation (or another worker's migration) meanwhile: the next sweep retries
                moved += len(chunk)
        return moved

    def trust_version(self, tenant_id: str, policy_id: str | None = None) -> TrustVersion:
        row_key = f"ver|{policy_id}" if policy_id is not None else TENANT_VERSION
        try:
            e = _guard("get version", lambda: self._table.get_entity(tenant_id, row_key))
        except ResourceNotFoundError:
            return TrustVersion("")
        return TrustVersion(e.metadata.get("etag") or "", int(e.get("At") or 0))

    # ---- host tokens ------------------------------------------------------------------------
    # Row hst|<policy id>: the per-policy capability hosts present to fetch the KRL without an
    # Entra token. Kept out of the policy document so it never appears in policy reads or audit.
    def get_host_token(self, tenant_id: str, policy_id: str) -> str | None:
        try:
            e = _guard("get host token", lambda: self._table.get_entity(tenant_id, f"hst|{policy_id}"))
        except ResourceNotFoundError:
            return None
        return e.get("Token")

    def ensure_host_token(self, tenant_id: str, policy_id: str, candidate: str) -> str:
        entity = {
            "PartitionKey": tenant_id,
            "RowKey": f"hst|{policy_id}",
            "Kind": "host-token",
            "PolicyId": policy_id,
            "Token": candidate,
        }
        try:
            _guard("create host token", lambda: self._table.create_entity(entity))
            return candidate
        except ResourceExistsError:
            existing = self.get_host_token(tenant_id, policy_id)
            if existing is None:  # pragma: no cover - deleted between the two calls
                raise Conflict("The host token changed at the same time; retry.") from None
            return existing
