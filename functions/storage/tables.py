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

TableStore is composed of one class per kind of row: requestrows.py (requests, their indexes and
idempotency keys), auditrows.py, revocations.py and hostrecords.py; policies, certificates and host
tokens are here, the calls they all make in tablecalls.py.

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

import json
import logging
from collections.abc import Sequence
from dataclasses import replace
from functools import partial
from typing import Any

from azure.core.exceptions import ResourceExistsError, ResourceNotFoundError
from azure.data.tables import TableClient, TableServiceClient, UpdateMode

from ..core.audit import AuditEntry
from ..core.errors import Conflict, NotFound, PreconditionFailed
from ..core.policy import Policy
from ..core.policydoc import policy_from_row
from ..core.records import CertificateRecord, IdempotencyRecord
from ..core.requests import RequestRecord
from ..core.serials import request_id_of_serial, serial_floor, serial_of_request_id
from ..deadline import deadline_hook
from .auditrows import AuditRows
from .hostrecords import HostRecords
from .requestrows import RequestRows
from .revocations import Revocations
from .tablecalls import TENANT_VERSION, _guard, _if_match, _serial_key, transact, version_entity
from .tablecalls import UNAUTHENTICATED as UNAUTHENTICATED  # where callers have always found it
from .transport import client_options, endpoint_of

log = logging.getLogger(__name__)
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


class TableStore(RequestRows, AuditRows, Revocations, HostRecords):
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
