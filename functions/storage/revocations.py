"""Revocation rows of TableStore (mixed into it; same table, tenant partition): rvp| rvh| rvt|, the
first layout's rev| until migrated, and the version rows ver| (layout: tables.py)."""

from __future__ import annotations

import itertools
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from azure.core.exceptions import ResourceNotFoundError
from azure.data.tables import UpdateMode

from ..core.audit import AuditEntry
from ..core.errors import Conflict, NotFound
from ..core.records import CertificateRecord, Revoked, TrustVersion
from .tablecalls import TENANT_VERSION, UNAUTHENTICATED, _guard, _if_match, _serial_key, transact, version_entity


class Revocations:
    """Revocation rows of TableStore (needs self._table, _legacy_done, _find_certificate, _audit_ops)."""

    _table: Any
    _legacy_done: set[str]

    if TYPE_CHECKING:  # TableStore's, which this class is part of

        def _find_certificate(self, tenant_id: str, policy_id: str, serial: int) -> tuple[CertificateRecord, str]: ...

        @classmethod
        def _audit_ops(cls, a: AuditEntry) -> list[tuple]: ...

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
