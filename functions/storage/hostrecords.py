"""Table Storage rows for host certificates (mixed into TableStore; same table, tenant partition):

    htk|<sha256 of the token>         a one-time host enrolment token (the token itself is never stored)
    hch|<challenge id>                a renewal challenge (single use)
    hky|<policy>|<32 hex of sha256(fingerprint)>   the latest host certificate of one host key
    hns|                              the tenant's host namespaces (one row)

Host certificate records themselves are `crt|<policy>|<serial>` rows like user certificates, so
revocation and the KRL treat both alike. An issuance writes them, the host key rows, the audit
entries and the used token or challenge in one entity-group transaction; the token or challenge
update is conditional on its ETag, so a token is used once even when two hosts race.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import replace
from functools import partial
from typing import TYPE_CHECKING, Any

from azure.core import MatchConditions
from azure.core.exceptions import ResourceExistsError, ResourceNotFoundError
from azure.data.tables import TableTransactionError, UpdateMode

from ..core.audit import AuditEntry
from ..core.errors import Conflict, NotFound, PreconditionFailed
from ..core.records import CertificateRecord, HostChallenge, HostEnrolmentToken, HostKeyRecord, HostNamespaces
from .tablecalls import TENANT_VERSION, _guard, _if_match, transact, version_entity


def host_key_row(policy_id: str, fingerprint: str) -> str:
    return f"hky|{policy_id}|{hashlib.sha256(fingerprint.encode()).hexdigest()[:32]}"


class HostRecords:
    """Host-certificate rows of TableStore (needs self._table, _cert_entity, _audit_ops)."""

    _table: Any

    if TYPE_CHECKING:  # TableStore's, which this class is part of

        @classmethod
        def _cert_entity(cls, c: CertificateRecord) -> dict[str, Any]: ...

        @classmethod
        def _audit_ops(cls, a: AuditEntry) -> list[tuple[Any, ...]]: ...

    # ---- host namespaces --------------------------------------------------------------------
    def get_host_namespaces(self, tenant_id: str) -> HostNamespaces | None:
        try:
            e = _guard("get host namespaces", lambda: self._table.get_entity(tenant_id, "hns|"))
        except ResourceNotFoundError:
            return None
        return HostNamespaces(
            tenant_id=tenant_id,
            namespaces=tuple(json.loads(e["Namespaces"])),
            updated_at=int(e["UpdatedAt"]),
            updated_by_oid=e["UpdatedByOid"],
            updated_by_upn=e["UpdatedByUpn"],
            etag=e.metadata.get("etag"),
        )

    def put_host_namespaces(self, ns: HostNamespaces, etag: str | None, audit: AuditEntry) -> HostNamespaces:
        row = {
            "PartitionKey": ns.tenant_id,
            "RowKey": "hns|",
            "Kind": "host-namespaces",
            "Namespaces": json.dumps(list(ns.namespaces)),
            "UpdatedAt": ns.updated_at,
            "UpdatedByOid": ns.updated_by_oid,
            "UpdatedByUpn": ns.updated_by_upn,
        }
        first = ("create", row) if etag is None else ("update", row, _if_match(etag))
        changed = PreconditionFailed(
            "The host namespaces changed since you read them (ETag mismatch); read them again and retry."
        )
        ops = [
            first,
            *self._audit_ops(audit),
            version_entity(ns.tenant_id, TENANT_VERSION, audit.at),
        ]  # known-hosts changes with them
        resp = transact(
            self._table,
            "put host namespaces",
            ops,
            not_found="The host namespaces were not found.",
            lost=changed,
            exists=Conflict("The host namespaces were set at the same time; read them again and retry."),
        )
        return replace(ns, etag=resp[0].get("etag"))

    # ---- tokens -----------------------------------------------------------------------------
    @staticmethod
    def _token_entity(t: HostEnrolmentToken) -> dict:
        return {
            "PartitionKey": t.tenant_id,
            "RowKey": f"htk|{t.token_hash}",
            "Kind": "host-enrolment-token",
            "PolicyId": t.policy_id,
            "Hosts": json.dumps(list(t.hosts)),
            "CreatedAt": t.created_at,
            "ExpiresAt": t.expires_at,
            "CreatedByOid": t.created_by_oid,
            "CreatedByUpn": t.created_by_upn,
            "UsedAt": t.used_at,
            "UsedBy": t.used_by,
        }

    @staticmethod
    def _token_from(e: Any) -> HostEnrolmentToken:
        return HostEnrolmentToken(
            tenant_id=e["PartitionKey"],
            policy_id=e["PolicyId"],
            token_hash=e["RowKey"][4:],
            hosts=tuple(json.loads(e["Hosts"])),
            created_at=int(e["CreatedAt"]),
            expires_at=int(e["ExpiresAt"]),
            created_by_oid=e["CreatedByOid"],
            created_by_upn=e["CreatedByUpn"],
            used_at=int(e["UsedAt"]) if e.get("UsedAt") is not None else None,
            used_by=e.get("UsedBy"),
            etag=e.metadata.get("etag"),
        )

    def create_host_enrolment_token(self, token: HostEnrolmentToken, audit: AuditEntry) -> HostEnrolmentToken:

        ops = [("create", self._token_entity(token)), *self._audit_ops(audit)]
        try:
            resp = _guard("create host token", lambda: self._table.submit_transaction(ops))
        except TableTransactionError as exc:
            raise Conflict("That enrolment token already exists; mint another.") from exc
        return replace(token, etag=resp[0].get("etag"))

    def get_host_enrolment_token(self, tenant_id: str, token_hash: str) -> HostEnrolmentToken:

        try:
            e = _guard("get host token", lambda: self._table.get_entity(tenant_id, f"htk|{token_hash}"))
        except ResourceNotFoundError:
            raise NotFound("No such enrolment token.") from None
        return self._token_from(e)

    # ---- challenges -------------------------------------------------------------------------
    @staticmethod
    def _challenge_entity(c: HostChallenge) -> dict:
        return {
            "PartitionKey": c.tenant_id,
            "RowKey": f"hch|{c.id}",
            "Kind": "host-challenge",
            "PolicyId": c.policy_id,
            "Nonce": c.nonce,
            "Fingerprints": json.dumps(list(c.fingerprints)),
            "CreatedAt": c.created_at,
            "ExpiresAt": c.expires_at,
            "UsedAt": c.used_at,
        }

    def create_host_challenge(self, challenge: HostChallenge) -> HostChallenge:

        try:
            meta = _guard("create host challenge", lambda: self._table.create_entity(self._challenge_entity(challenge)))
        except ResourceExistsError:
            raise Conflict("That challenge already exists; ask again.") from None
        return replace(challenge, etag=meta.get("etag"))

    def delete_expired_host_challenges(self, tenant_id: str, now: int) -> int:
        rows = _guard(
            "list host challenges",
            lambda: list(
                self._table.query_entities(
                    "PartitionKey eq @pk and RowKey ge @lo and RowKey lt @hi and ExpiresAt lt @now",
                    parameters={"pk": tenant_id, "lo": "hch|", "hi": "hch}", "now": now},
                    select=["PartitionKey", "RowKey"],
                )
            ),
        )
        for k in range(0, len(rows), 100):  # Table Storage's limit per transaction
            batch = [("delete", {"PartitionKey": r["PartitionKey"], "RowKey": r["RowKey"]}) for r in rows[k : k + 100]]
            _guard("delete host challenges", partial(self._table.submit_transaction, batch))
        return len(rows)

    def get_host_challenge(self, tenant_id: str, challenge_id: str) -> HostChallenge:

        try:
            e = _guard("get host challenge", lambda: self._table.get_entity(tenant_id, f"hch|{challenge_id}"))
        except ResourceNotFoundError:
            raise NotFound("No such challenge.") from None
        return HostChallenge(
            tenant_id=e["PartitionKey"],
            policy_id=e["PolicyId"],
            id=e["RowKey"][4:],
            nonce=e["Nonce"],
            fingerprints=tuple(json.loads(e["Fingerprints"])),
            created_at=int(e["CreatedAt"]),
            expires_at=int(e["ExpiresAt"]),
            used_at=int(e["UsedAt"]) if e.get("UsedAt") is not None else None,
            etag=e.metadata.get("etag"),
        )

    # ---- host keys --------------------------------------------------------------------------
    @staticmethod
    def _host_key_entity(k: HostKeyRecord) -> dict:
        return {
            "PartitionKey": k.tenant_id,
            "RowKey": host_key_row(k.policy_id, k.fingerprint),
            "Kind": "host-key",
            "PolicyId": k.policy_id,
            "Fingerprint": k.fingerprint,
            "PublicKey": k.public_key,
            "Principals": json.dumps(list(k.principals)),
            "Serial": str(k.serial),
            "ValidAfter": k.valid_after,
            "ValidBefore": k.valid_before,
            "Proof": k.proof,
            "Subject": k.subject,
            "UpdatedAt": k.updated_at,
        }

    @staticmethod
    def _host_key_from(e: Any) -> HostKeyRecord:
        return HostKeyRecord(
            tenant_id=e["PartitionKey"],
            policy_id=e["PolicyId"],
            fingerprint=e["Fingerprint"],
            public_key=e["PublicKey"],
            principals=tuple(json.loads(e["Principals"])),
            serial=int(e["Serial"]),
            valid_after=int(e["ValidAfter"]),
            valid_before=int(e["ValidBefore"]),
            proof=e["Proof"],
            subject=e["Subject"],
            updated_at=int(e["UpdatedAt"]),
            etag=e.metadata.get("etag"),
        )

    def get_host_key(self, tenant_id: str, policy_id: str, fingerprint: str) -> HostKeyRecord | None:

        try:
            e = _guard("get host key", lambda: self._table.get_entity(tenant_id, host_key_row(policy_id, fingerprint)))
        except ResourceNotFoundError:
            return None
        return self._host_key_from(e)

    def list_host_keys(self, tenant_id: str, policy_id: str, subject: str | None = None) -> list[HostKeyRecord]:

        flt = "PartitionKey eq @pk and RowKey ge @lo and RowKey lt @hi"
        params: dict[str, Any] = {"pk": tenant_id, "lo": f"hky|{policy_id}|", "hi": f"hky|{policy_id}}}"}
        if subject is not None:
            flt += " and Subject eq @subject"
            params["subject"] = subject
        rows = _guard("list host keys", lambda: list(self._table.query_entities(flt, parameters=params)))
        return [self._host_key_from(e) for e in rows]

    # ---- issuance ---------------------------------------------------------------------------
    def record_host_issuance(
        self,
        certs: Sequence[CertificateRecord],
        keys: Sequence[HostKeyRecord],
        audit: Sequence[AuditEntry],
        used: HostEnrolmentToken | HostChallenge | None = None,
    ) -> None:

        ops: list[tuple[Any, ...]] = [("create", self._cert_entity(c)) for c in certs]
        ops += [("upsert", self._host_key_entity(k), {"mode": UpdateMode.REPLACE}) for k in keys]
        ops += [op for a in audit for op in self._audit_ops(a)]
        if used is not None:
            entity = self._token_entity(used) if isinstance(used, HostEnrolmentToken) else self._challenge_entity(used)
            ops.insert(
                0,
                (
                    "update",
                    entity,
                    {"mode": UpdateMode.REPLACE, "etag": used.etag, "match_condition": MatchConditions.IfNotModified},
                ),
            )

        transact(
            self._table,
            "record host issuance",
            ops,
            not_found="That token or challenge is gone; nothing was issued.",
            lost=Conflict("That token or challenge was used at the same time; nothing was issued."),
            exists=Conflict("The host certificate could not be recorded (serial already used); retry."),
        )
