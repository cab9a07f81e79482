"""Enrolment records and jobs: which VM a policy's CA was pushed to, and how that went. Table Storage.
The records are here; the jobs (JobItem, Job, JobStore) are in enrolmentjobs.py.

Rows live in the tenant's partition of the one ezssh table (see tables.py):

    RowKey = enr|<policy id>|<sha256 of the lower-cased VM resource id, 32 hex>   the VM's record
    RowKey = job|<job id>                                                          a job (who asked, when)
    RowKey = job|<job id>|<sha256 of the VM id, 32 hex>                            one VM of that job
    RowKey = out|<job id>|<sha256 of the VM id, 32 hex>                            its message, unsent

A job is what one request (the API, an Event Grid event, the reconcile timer) asked for; each of its
VMs is one queue message and one item row, which only that message's handler changes.

The job's messages go through an outbox: each item row is written with an `out|` row (its message,
not yet sent) in the same transaction as the job row and its audit entry; the `out|` row is deleted
once the message is on the queue. Whatever the queue did not take (down, slow, the answer lost) is
still there for the timer to send (`unsent`): a range read bounded by the messages not yet sent,
never by the jobs of the past. A message sent twice is harmless: the handler claims its item with
the queue's message id and a second message for the same item finds it claimed or done.

Resource ids are case-insensitive in Azure and may hold characters a RowKey cannot, hence the hash;
the id itself is a property. Every change after the first insert is conditional on the ETag the
record was read with, so two workers (an Event Grid delivery and the reconcile timer, say) never
both push to one VM: the loser of the race gets Conflict and leaves it to the winner.
"""

from __future__ import annotations

import builtins
import hashlib
import itertools
import json
from dataclasses import dataclass, field, replace
from typing import Any

from azure.core.exceptions import ResourceExistsError, ResourceNotFoundError

from ..core.audit import AuditEntry
from ..core.errors import Conflict
from .tablecalls import _guard, _if_match, conditional_update, transact
from .tables import TableStore

PENDING, SUCCEEDED, FAILED, RETRYING = "pending", "succeeded", "failed", "retrying"
STATES = (PENDING, SUCCEEDED, FAILED, RETRYING)
OUTPUT_TAIL = 4096  # Run Command itself returns at most the last 4,096 bytes
ERROR_MAX = 1000


def vm_key(vm_id: str) -> str:
    return hashlib.sha256(vm_id.strip().lower().encode()).hexdigest()[:32]


def tail(text: str | None, limit: int = OUTPUT_TAIL) -> str:
    """The last `limit` characters of `text` (a bounded record, whatever the script printed)."""
    text = text or ""
    return text if len(text) <= limit else "…" + text[-(limit - 1) :]


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
    job_id: str | None = None  # the job whose message pushes (or will retry) this record
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
            "job_id": self.job_id,
        }


class EnrolmentStore:
    """Enrolment rows in the TableStore's table (it shares the store's TableClient)."""

    def __init__(self, store: TableStore) -> None:
        self._table = store._table  # one table, one client, by design

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
            "JobId": e.job_id,
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
            job_id=x.get("JobId"),
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
        rows = _guard(
            "list enrolments",
            lambda: list(
                self._table.query_entities(
                    "PartitionKey eq @pk and RowKey ge @lo and RowKey lt @hi",
                    parameters={"pk": tenant_id, "lo": lo, "hi": hi},
                )
            ),
        )
        return [self._from_entity(x) for x in rows]

    def list_page(
        self, tenant_id: str, policy_id: str, *, after: str | None = None, limit: int = 100
    ) -> tuple[builtins.list[Enrolment], bool]:
        """A policy's records in row key order (the hash of the VM id) after the VM key `after`:
        at most `limit`, and whether more follow. One range read of at most `limit` + 1 rows."""
        lo = f"enr|{policy_id}|{after}" if after else f"enr|{policy_id}|"
        pages = self._table.query_entities(
            "PartitionKey eq @pk and RowKey gt @lo and RowKey lt @hi",
            parameters={"pk": tenant_id, "lo": lo, "hi": f"enr|{policy_id}}}"},
            results_per_page=limit + 1,
        )
        rows = _guard("list enrolments", lambda: list(itertools.islice(pages, limit + 1)))
        return [self._from_entity(x) for x in rows[:limit]], len(rows) > limit

    def create(self, e: Enrolment) -> Enrolment:
        """Insert a new record; Conflict if one exists for this policy and VM."""
        try:
            meta = _guard("create enrolment", lambda: self._table.create_entity(self._entity(e)))
        except ResourceExistsError:
            raise Conflict(f"VM {e.vm_id} already has an enrolment record for policy {e.policy_id!r}.") from None
        return replace(e, etag=meta.get("etag"))

    def update(self, e: Enrolment, etag: str, audit: AuditEntry | None = None) -> Enrolment:
        """Replace the record if it is unchanged since read (If-Match); Conflict otherwise. With an
        audit entry, both land in one transaction or neither does."""
        return replace(
            e,
            etag=_update(
                self._table,
                "update enrolment",
                self._entity(e),
                etag,
                audit,
                not_found=f"The enrolment of {e.vm_id} in policy {e.policy_id!r} is gone.",
                lost=Conflict(f"The enrolment of {e.vm_id} changed at the same time."),
            ),
        )


def _update(
    table: Any, op: str, entity: dict, etag: str, audit: AuditEntry | None, *, not_found: str, lost: Conflict
) -> str | None:
    """Replace a row if unchanged since read (If-Match); with an audit entry, both in one transaction.
    Returns the new ETag."""
    if audit is None:
        return conditional_update(table, op, entity, etag, not_found=not_found, lost=lost).get("etag")
    ops = [("update", entity, _if_match(etag)), *TableStore._audit_ops(audit)]
    return transact(table, op, ops, not_found=not_found, lost=lost, exists=lost)[0].get("etag")
