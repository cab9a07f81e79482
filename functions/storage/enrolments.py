"""Enrolment records: which VM a policy's CA was pushed to, and how that went. Table Storage.

Rows live in the tenant's partition of the one ezssh table (see tables.py):

    RowKey = enr|<policy id>|<sha256 of the lower-cased VM resource id, 32 hex>

Resource ids are case-insensitive in Azure and may hold characters a RowKey cannot, hence the hash;
the id itself is a property. Every change after the first insert is conditional on the ETag the
record was read with, so two workers (an Event Grid delivery and the reconcile timer, say) never
both push to one VM: the loser of the race gets Conflict and leaves it to the winner.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from typing import Any

from azure.core.exceptions import ResourceExistsError, ResourceNotFoundError

from ..core.errors import Conflict
from .tables import TableStore, _guard, conditional_update

PENDING, SUCCEEDED, FAILED, RETRYING = "pending", "succeeded", "failed", "retrying"
STATES = (PENDING, SUCCEEDED, FAILED, RETRYING)
OUTPUT_TAIL = 4096  # Run Command itself returns at most the last 4,096 bytes
ERROR_MAX = 1000


def vm_key(vm_id: str) -> str:
    return hashlib.sha256(vm_id.strip().lower().encode()).hexdigest()[:32]


def tail(text: str | None, limit: int = OUTPUT_TAIL) -> str:
    """The last `limit` characters of `text` (a bounded record, whatever the script printed)."""
    text = text or ""
    return text if len(text) <= limit else "…" + text[-(limit - 1):]


@dataclass(frozen=True)
class Enrolment:
    tenant_id: str
    policy_id: str
    vm_id: str  # ARM resource id as first seen
    state: str = PENDING
    attempts: int = 0
    output_tail: str = ""
    last_error: str | None = None
    error_code: str | None = None  # vm_not_found | forbidden | agent_not_ready | script_failed | ...
    created_at: int = 0
    updated_at: int = 0
    next_attempt_at: int = 0  # when a pending/retrying record is due
    lease_until: int = 0  # a push in progress until then (another worker leaves it alone)
    ca_fingerprints: tuple[str, ...] = ()  # what the last successful push made the host trust
    krl_version: int | None = None  # ... and the KRL version it carried
    source: str = "api"  # api | event | reconcile
    requested_by: str | None = None
    duration_ms: int | None = None  # of the last push
    lro_polls: int | None = None  # operation-status polls of the last push
    etag: str | None = field(default=None, compare=False)

    @property
    def row_key(self) -> str:
        return f"enr|{self.policy_id}|{vm_key(self.vm_id)}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "policy": self.policy_id,
            "vm_id": self.vm_id,
            "state": self.state,
            "attempts": self.attempts,
            "output_tail": self.output_tail,
            "last_error": self.last_error,
            "error_code": self.error_code,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "next_attempt_at": self.next_attempt_at if self.state in (PENDING, RETRYING) else None,
            "ca_fingerprints": list(self.ca_fingerprints),
            "krl_version": self.krl_version,
            "source": self.source,
            "requested_by": self.requested_by,
            "duration_ms": self.duration_ms,
            "lro_polls": self.lro_polls,
        }


class EnrolmentStore:
    """Enrolment rows in the TableStore's table (it shares the store's TableClient)."""

    def __init__(self, store: TableStore) -> None:
        self._table = store._table  # noqa: SLF001 - one table, one client, by design

    @staticmethod
    def _entity(e: Enrolment) -> dict:
        return {
            "PartitionKey": e.tenant_id,
            "RowKey": e.row_key,
            "Kind": "enrolment",
            "PolicyId": e.policy_id,
            "VmId": e.vm_id,
            "State": e.state,
            "Attempts": e.attempts,
            "OutputTail": tail(e.output_tail),
            "LastError": (e.last_error or "")[:ERROR_MAX] or None,
            "ErrorCode": e.error_code,
            "CreatedAt": e.created_at,
            "UpdatedAt": e.updated_at,
            "NextAttemptAt": e.next_attempt_at,
            "LeaseUntil": e.lease_until,
            "CaFingerprints": json.dumps(list(e.ca_fingerprints)),
            "KrlVersion": e.krl_version,
            "Source": e.source,
            "RequestedBy": e.requested_by,
            "DurationMs": e.duration_ms,
            "LroPolls": e.lro_polls,
        }

    @staticmethod
    def _from_entity(x: Any) -> Enrolment:
        return Enrolment(
            tenant_id=x["PartitionKey"],
            policy_id=x["PolicyId"],
            vm_id=x["VmId"],
            state=x.get("State") or PENDING,
            attempts=int(x.get("Attempts") or 0),
            output_tail=x.get("OutputTail") or "",
            last_error=x.get("LastError"),
            error_code=x.get("ErrorCode"),
            created_at=int(x.get("CreatedAt") or 0),
            updated_at=int(x.get("UpdatedAt") or 0),
            next_attempt_at=int(x.get("NextAttemptAt") or 0),
            lease_until=int(x.get("LeaseUntil") or 0),
            ca_fingerprints=tuple(json.loads(x.get("CaFingerprints") or "[]")),
            krl_version=x.get("KrlVersion"),
            source=x.get("Source") or "api",
            requested_by=x.get("RequestedBy"),
            duration_ms=x.get("DurationMs"),
            lro_polls=x.get("LroPolls"),
            etag=x.metadata.get("etag"),
        )

    def get(self, tenant_id: str, policy_id: str, vm_id: str) -> Enrolment | None:
        rk = f"enr|{policy_id}|{vm_key(vm_id)}"
        try:
            x = _guard("get enrolment", lambda: self._table.get_entity(tenant_id, rk))
        except ResourceNotFoundError:
            return None
        return self._from_entity(x)

    def list(self, tenant_id: str, policy_id: str | None = None) -> list[Enrolment]:
        lo, hi = (f"enr|{policy_id}|", f"enr|{policy_id}}}") if policy_id else ("enr|", "enr}")
        rows = _guard("list enrolments", lambda: list(self._table.query_entities(
            "PartitionKey eq @pk and RowKey ge @lo and RowKey lt @hi",
            parameters={"pk": tenant_id, "lo": lo, "hi": hi})))
        return [self._from_entity(x) for x in rows]

    def create(self, e: Enrolment) -> Enrolment:
        """Insert a new record; Conflict if one exists for this policy and VM."""
        try:
            meta = _guard("create enrolment", lambda: self._table.create_entity(self._entity(e)))
        except ResourceExistsError:
            raise Conflict(f"VM {e.vm_id} already has an enrolment record for policy {e.policy_id!r}.") from None
        return replace(e, etag=meta.get("etag"))

    def update(self, e: Enrolment, etag: str) -> Enrolment:
        """Replace the record if it is unchanged since read (If-Match); Conflict otherwise."""
        meta = conditional_update(
            self._table, "update enrolment", self._entity(e), etag,
            not_found=f"The enrolment of {e.vm_id} in policy {e.policy_id!r} is gone.",
            lost=Conflict(f"The enrolment of {e.vm_id} changed at the same time."),
        )
        return replace(e, etag=meta.get("etag"))
