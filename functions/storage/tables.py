"""Table Storage repositories (azure-data-tables). Azurite locally, a storage account in Azure.

One table holds everything, partitioned by tenant id, so that a certificate record, its request and
its audit entry can be written in one atomic entity-group transaction:

    PartitionKey = <tid>
    RowKey       = pol|<policy id>              a policy (document as JSON)
                   req|<request id>             an access request
                   crt|<policy id>|<serial>     an issued certificate (serial zero-padded to 19 digits)
                   aud|<ms since epoch>|<id>    an audit entry (ascending by time)
                   htk| hch| hky|               host enrolment tokens, renewal challenges, host keys
                                                (hostrecords.py)

Refusals from callers whose token did not verify have no trustworthy tenant; their audit entries go
to the partition `_unauthenticated`.

Every state change on a policy or request is conditional on the ETag it was read with (If-Match). A
lost race raises Conflict (409). If-Match holds inside a batch too (Table Storage and Azurite 3.37
alike; tests/contract/test_store.py checks it), so an issuance is one transaction.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from typing import Any, Callable, Sequence, TypeVar

from azure.core import MatchConditions
from azure.core.exceptions import (
    AzureError,
    HttpResponseError,
    ResourceExistsError,
    ResourceModifiedError,
    ResourceNotFoundError,
)
from azure.data.tables import TableClient, TableServiceClient, TableTransactionError, UpdateMode

from ..core.approval import Approval, RequestRecord
from ..deadline import storage_hook
from ..core.audit import AuditEntry
from ..core.errors import Conflict, EzsshError, NotFound, PreconditionFailed, StorageUnavailable
from ..core.policy import Policy, policy_from_row
from .base import CertificateRecord, IdempotencyRecord
from .transport import client_options, endpoint_of
from .hostrecords import HostRecords

log = logging.getLogger(__name__)
T = TypeVar("T")
UNAUTHENTICATED = "_unauthenticated"
# A user waits on every call: retry briefly, then answer 503 rather than hang for azure-core's
# default of ten retries with exponential backoff.
CLIENT_OPTIONS = dict(retry_total=3, retry_backoff_factor=0.2, retry_backoff_max=2, connection_timeout=5,
                      read_timeout=20, raw_request_hook=storage_hook)


def _serial_key(serial: int) -> str:
    return f"{serial:019d}"


def _guard(op: str, fn: Callable[[], T]) -> T:
    """Map transport failures to StorageUnavailable (503); let domain errors through."""
    try:
        return fn()
    except (ResourceNotFoundError, ResourceModifiedError, ResourceExistsError, TableTransactionError):
        raise
    except HttpResponseError as exc:
        if exc.status_code in (412, 409):
            raise
        if exc.status_code and exc.status_code < 500 and exc.status_code not in (403, 408, 429):
            raise
        log.warning("table storage %s failed: %s", op, exc)
        raise StorageUnavailable("Storage is unavailable; try again shortly.") from exc
    except AzureError as exc:
        log.warning("table storage %s failed: %s", op, exc)
        raise StorageUnavailable("Storage is unavailable; try again shortly.") from exc


def conditional_update(table: TableClient, op: str, entity: dict, etag: str, *, not_found: str,
                       lost: EzsshError, mode: UpdateMode = UpdateMode.REPLACE) -> dict:
    """Write `entity` only if the row still has `etag` (If-Match). A missing row is NotFound; a
    changed one raises `lost` (the caller's 409 or 412), never a silent overwrite."""
    try:
        return _guard(op, lambda: table.update_entity(entity, mode=mode, etag=etag,
                                                      match_condition=MatchConditions.IfNotModified))
    except ResourceNotFoundError:
        raise NotFound(not_found) from None
    except (ResourceModifiedError, HttpResponseError):
        raise lost from None


def _if_match(etag: str, mode: UpdateMode = UpdateMode.REPLACE) -> dict:
    if not etag:
        raise ValueError("IfNotModified must be specified with etag.")  # as the SDK's own single writes do
    return {"mode": mode, "etag": etag, "match_condition": MatchConditions.IfNotModified}


def transact(table: TableClient, op: str, ops: list, *, not_found: str, lost: EzsshError,
             exists: EzsshError) -> list:
    """One entity-group transaction (all rows in one partition): every write lands, or none.

    A conditional row that changed meanwhile raises `lost` (409/412), a missing one NotFound, a row
    that already exists `exists`; a storage outage StorageUnavailable. If-Match holds inside the
    transaction on Table Storage and on Azurite alike (tests/contract/test_store.py)."""
    try:
        return _guard(op, lambda: table.submit_transaction(ops))
    except TableTransactionError as exc:
        status = exc.status_code
        if status == 404:
            raise NotFound(not_found) from None
        if status == 412:
            raise lost from None
        if status == 409 or "EntityAlreadyExists" in str(exc):
            raise exists from None
        if status and (status >= 500 or status in (408, 429)):
            log.warning("table storage %s failed: %s", op, exc)
            raise StorageUnavailable("Storage is unavailable; try again shortly.") from exc
        log.warning("table storage refused %s: %s", op, exc)
        raise StorageUnavailable("Storage refused the write; try again.") from exc


class TableStore(HostRecords):
    def __init__(self, service: TableServiceClient, table_name: str = "ezssh") -> None:
        self._service = service
        self._table_name = table_name
        self._table: TableClient = service.get_table_client(table_name)

    @classmethod
    def from_connection_string(cls, conn: str, table_name: str = "ezssh") -> "TableStore":
        return cls(TableServiceClient.from_connection_string(conn, **client_options(endpoint_of(conn), CLIENT_OPTIONS)),
                   table_name)

    @classmethod
    def from_account_url(cls, url: str, credential: Any, table_name: str = "ezssh") -> "TableStore":
        return cls(TableServiceClient(endpoint=url, credential=credential, **client_options(url, CLIENT_OPTIONS)),
                   table_name)

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
        }

    @staticmethod
    def _policy_from_entity(e: Any) -> Policy:
        return policy_from_row(json.loads(e["Doc"]), etag=e.metadata.get("etag"), audit_head=e.get("AuditHead"))

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
        ops = [("create", self._policy_entity(policy)), ("create", self._audit_entity(audit))]
        resp = transact(self._table, "create policy", ops, not_found=f"Policy {policy.id!r} was not found.",
                        lost=Conflict(f"A policy with id {policy.id!r} already exists."),
                        exists=Conflict(f"A policy with id {policy.id!r} already exists."))
        return self._with_etag(policy, resp[0].get("etag"))

    def replace_policy(self, policy: Policy, etag: str, audit: AuditEntry) -> Policy:
        """The policy row (only if still at `etag`) and its audit entry, in one transaction."""
        ops = [("update", self._policy_entity(policy), _if_match(etag)), ("create", self._audit_entity(audit))]
        resp = transact(self._table, "update policy", ops, not_found=f"Policy {policy.id!r} was not found.",
                        lost=PreconditionFailed(f"Policy {policy.id!r} changed since you read it (ETag mismatch); "
                                                "read it again and retry."),
                        exists=Conflict("That audit entry was already written; read the policy again."))
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
            "DecidedAt": rec.decided_at,
            "Comment": rec.comment,
            "Serial": str(rec.serial) if rec.serial is not None else None,
            "KeyId": rec.key_id,
            "AuditHead": rec.audit_head,
        }

    @staticmethod
    def _request_from_entity(e: Any) -> RequestRecord:
        return RequestRecord(
            id=e["RowKey"][4:],
            tenant_id=e["PartitionKey"],
            policy_id=e["PolicyId"],
            requester_oid=e["RequesterOid"],
            requester_upn=e["RequesterUpn"],
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
            decided_at=int(e["DecidedAt"]) if e.get("DecidedAt") is not None else None,
            comment=e.get("Comment"),
            serial=int(e["Serial"]) if e.get("Serial") else None,
            key_id=e.get("KeyId"),
            audit_head=e.get("AuditHead") or "0" * 64,
            etag=e.metadata.get("etag"),
        )

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

    def create_request(self, rec: RequestRecord, audit: AuditEntry,
                       idempotency: IdempotencyRecord | None = None) -> RequestRecord:
        ops = [("create", self._request_entity(rec)), ("create", self._audit_entity(audit))]
        if idempotency is not None:
            ops.append(("create", self._idempotency_entity(idempotency)))
        resp = transact(self._table, "create request", ops, not_found=f"Request {rec.id!r} was not found.",
                        lost=Conflict("That request already exists."), exists=Conflict("That request already exists."))
        return replace(rec, etag=resp[0].get("etag"))

    def update_request(self, rec: RequestRecord, etag: str, audit: AuditEntry) -> RequestRecord:
        """The request row (only if still at `etag`) and its audit entry, in one transaction."""
        ops = [("update", self._request_entity(rec), _if_match(etag)), ("create", self._audit_entity(audit))]
        resp = transact(self._table, "update request", ops, not_found=f"Request {rec.id!r} was not found.",
                        lost=Conflict(f"Request {rec.id} changed at the same time; read it again."),
                        exists=Conflict(f"Request {rec.id} changed at the same time; read it again."))
        return replace(rec, etag=resp[0].get("etag"))

    # ---- idempotency keys ---------------------------------------------------------------------
    # Row idk|<requester oid>|<sha-256 of the client's key>: which request a client's attempt made,
    # written in the same transaction as that request, so a retry finds the first answer.
    @staticmethod
    def _idempotency_entity(i: IdempotencyRecord) -> dict:
        return {"PartitionKey": i.tenant_id, "RowKey": f"idk|{i.owner_oid}|{i.key_hash}", "Kind": "idempotency",
                "RequestId": i.request_id, "Digest": i.digest, "CreatedAt": i.created_at}

    def get_idempotency(self, tenant_id: str, owner_oid: str, key_hash: str) -> IdempotencyRecord | None:
        try:
            e = _guard("get idempotency key",
                       lambda: self._table.get_entity(tenant_id, f"idk|{owner_oid}|{key_hash}"))
        except ResourceNotFoundError:
            return None
        return IdempotencyRecord(tenant_id=tenant_id, owner_oid=owner_oid, key_hash=key_hash,
                                 request_id=e["RequestId"], digest=e["Digest"], created_at=int(e["CreatedAt"]))

    # ---- certificates -----------------------------------------------------------------------
    @staticmethod
    def _cert_entity(c: CertificateRecord) -> dict:
        return {
            "PartitionKey": c.tenant_id,
            "RowKey": f"crt|{c.policy_id}|{_serial_key(c.serial)}",
            "Kind": "certificate",
            "PolicyId": c.policy_id,
            "Serial": str(c.serial),
            "KeyId": c.key_id,
            "RequestId": c.request_id,
            "RequesterOid": c.requester_oid,
            "RequesterUpn": c.requester_upn,
            "Principals": json.dumps(list(c.principals)),
            "Host": c.host,
            "ValidAfter": c.valid_after,
            "ValidBefore": c.valid_before,
            "CaFingerprint": c.ca_fingerprint,
            "PublicKeyFingerprint": c.public_key_fingerprint,
            "Certificate": c.certificate,
            "RevokedAt": c.revoked_at,
            "RevokedBy": c.revoked_by,
        }

    @staticmethod
    def _cert_from_entity(e: Any) -> CertificateRecord:
        return CertificateRecord(
            tenant_id=e["PartitionKey"],
            policy_id=e["PolicyId"],
            serial=int(e["Serial"]),
            key_id=e["KeyId"],
            request_id=e["RequestId"],
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
            etag=e.metadata.get("etag"),
        )

    def record_issuance(
        self, rec: RequestRecord, etag: str | None, cert: CertificateRecord, audit: Sequence[AuditEntry],
        idempotency: IdempotencyRecord | None = None,
    ) -> None:
        """One entity-group transaction: the request row (new, or replaced only if still at `etag`: the
        claim that exactly one caller moves it to "issued"), the certificate record, the audit entries
        and the client's idempotency key. A lost race, a used serial, request id or idempotency key
        leaves all of them unwritten."""
        ops: list = [("create", self._cert_entity(cert))] + [("create", self._audit_entity(a)) for a in audit]
        if etag is None:
            ops.insert(0, ("create", self._request_entity(rec)))
        else:
            ops.insert(0, ("update", self._request_entity(rec), _if_match(etag)))
        if idempotency is not None:
            ops.append(("create", self._idempotency_entity(idempotency)))
        transact(self._table, "record issuance", ops, not_found=f"Request {rec.id!r} was not found.",
                 lost=Conflict(f"Request {rec.id} changed at the same time; read it again."),
                 exists=Conflict("The certificate could not be recorded (serial or request already used); retry."))

    def get_certificate(self, tenant_id: str, policy_id: str, serial: int) -> CertificateRecord:
        try:
            e = _guard(
                "get certificate",
                lambda: self._table.get_entity(tenant_id, f"crt|{policy_id}|{_serial_key(serial)}"),
            )
        except ResourceNotFoundError:
            raise NotFound(f"No certificate with serial {serial} was issued under policy {policy_id!r}.") from None
        return self._cert_from_entity(e)

    # ---- audit ------------------------------------------------------------------------------
    @staticmethod
    def _audit_entity(a: AuditEntry) -> dict:
        ms = int(a.at * 1000)
        return {
            "PartitionKey": a.tenant_id or UNAUTHENTICATED,
            "RowKey": f"aud|{ms:013d}|{a.entry_id}",
            "Kind": "audit",
            "Action": a.action,
            "Outcome": a.outcome,
            "RequestId": a.request_id,
            "PolicyId": a.policy_id,
            "KeyId": a.key_id,
            "Serial": a.serial,
            "Entry": json.dumps(a.body() | {"hash": a.hash}, separators=(",", ":"), default=str),
        }

    def add_audit(self, entry: AuditEntry) -> None:
        _guard("add audit", lambda: self._table.create_entity(self._audit_entity(entry)))

    def list_audit(
        self,
        tenant_id: str,
        *,
        since: float | None = None,
        until: float | None = None,
        request_id: str | None = None,
        limit: int = 200,
    ) -> list[AuditEntry]:
        lo = f"aud|{int((since or 0) * 1000):013d}"
        hi = f"aud|{int(until * 1000):013d}}}" if until is not None else "aud}"
        flt = "PartitionKey eq @pk and RowKey ge @lo and RowKey lt @hi"
        params: dict[str, Any] = {"pk": tenant_id, "lo": lo, "hi": hi}
        if request_id:
            flt += " and RequestId eq @rid"
            params["rid"] = request_id
        out: list[AuditEntry] = []
        for e in _guard("list audit", lambda: self._table.query_entities(flt, parameters=params)):
            out.append(AuditEntry(**json.loads(e["Entry"])))
            if len(out) >= limit:
                break
        return out

    # ---- revocation -------------------------------------------------------------------------
    def revoke_certificate(self, cert: CertificateRecord, etag: str, audit: AuditEntry) -> CertificateRecord:
        """Set RevokedAt/RevokedBy on the certificate row if it is unchanged since read, and write its
        audit entry, in one transaction."""
        entity = {
            "PartitionKey": cert.tenant_id,
            "RowKey": f"crt|{cert.policy_id}|{_serial_key(cert.serial)}",
            "RevokedAt": cert.revoked_at,
            "RevokedBy": cert.revoked_by,
        }
        ops = [("update", entity, _if_match(etag, UpdateMode.MERGE)), ("create", self._audit_entity(audit))]
        lost = Conflict(f"Certificate {cert.serial} changed at the same time; read it again.")
        resp = transact(self._table, "revoke certificate", ops,
                        not_found=f"No certificate with serial {cert.serial} was issued under policy {cert.policy_id!r}.",
                        lost=lost, exists=lost)
        return replace(cert, etag=resp[0].get("etag"))

    def list_revoked(self, tenant_id: str, policy_id: str) -> list[CertificateRecord]:
        """Every revoked certificate of a policy, expired or not (the caller decides what to drop)."""
        flt = "PartitionKey eq @pk and RowKey ge @lo and RowKey lt @hi and RevokedAt gt @zero"
        params = {"pk": tenant_id, "lo": f"crt|{policy_id}|", "hi": f"crt|{policy_id}}}", "zero": 0}
        rows = _guard("list revoked", lambda: list(self._table.query_entities(flt, parameters=params)))
        return [self._cert_from_entity(e) for e in rows]

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
        entity = {"PartitionKey": tenant_id, "RowKey": f"hst|{policy_id}", "Kind": "host-token",
                  "PolicyId": policy_id, "Token": candidate}
        try:
            _guard("create host token", lambda: self._table.create_entity(entity))
            return candidate
        except ResourceExistsError:
            existing = self.get_host_token(tenant_id, policy_id)
            if existing is None:  # pragma: no cover - deleted between the two calls
                raise Conflict("The host token changed at the same time; retry.") from None
            return existing
