"""Enrolment records and jobs: which VM a policy's CA was pushed to, and how that went. Table Storage.

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
from functools import partial
from typing import Any

from azure.core.exceptions import ResourceExistsError, ResourceNotFoundError

from ..core.audit import AuditEntry
from ..core.errors import Conflict, NotFound
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


# ---- jobs -------------------------------------------------------------------------------------------

QUEUED, RUNNING = "queued", "running"  # item states besides SUCCEEDED, FAILED, RETRYING
TERMINAL = (SUCCEEDED, FAILED)


@dataclass(frozen=True)
class JobItem:
    """One VM of a job: its message's progress."""

    tenant_id: str
    job_id: str
    policy_id: str
    vm_id: str
    state: str = QUEUED  # queued | running | retrying | succeeded | failed
    attempts: int = 0  # pushes tried for this job
    deliveries: int = 0  # queue deliveries handled (a crash mid-push shows as deliveries > attempts)
    error_code: str | None = None
    last_error: str | None = None
    output_tail: str = ""
    updated_at: int = 0
    message_id: str | None = None  # the queue message whose delivery claimed it (RUNNING)
    etag: str | None = field(default=None, compare=False)

    @property
    def row_key(self) -> str:
        return f"job|{self.job_id}|{vm_key(self.vm_id)}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "vm_id": self.vm_id,
            "state": self.state,
            "attempts": self.attempts,
            "deliveries": self.deliveries,
            "error_code": self.error_code,
            "last_error": self.last_error,
            "output_tail": self.output_tail,
            "updated_at": self.updated_at,
        }


@dataclass(frozen=True)
class Unsent:
    """An item whose queue message is not known to be on the queue yet (an outbox row)."""

    tenant_id: str
    job_id: str
    policy_id: str
    vm_id: str
    created_at: int


@dataclass(frozen=True)
class Job:
    tenant_id: str
    job_id: str
    policy_id: str
    source: str  # api | event | reconcile
    created_at: int
    total: int
    requested_by: str | None = None
    requested_oid: str | None = None
    api_url: str | None = None  # where pushed scripts fetch KRLs when EZSSH_PUBLIC_URL is not set

    @property
    def row_key(self) -> str:
        return f"job|{self.job_id}"


def job_state(items: list[JobItem]) -> str:
    states = {i.state for i in items}
    if not items or states <= {SUCCEEDED}:
        return SUCCEEDED
    if states <= set(TERMINAL):
        return FAILED
    if RUNNING in states:
        return RUNNING
    if QUEUED in states:
        return QUEUED if states == {QUEUED} else RUNNING
    return RETRYING


def job_dict(job: Job, items: list[JobItem]) -> dict[str, Any]:
    counts: dict[str, int] = {}
    for i in items:
        counts[i.state] = counts.get(i.state, 0) + 1
    return {
        "id": job.job_id,
        "policy": job.policy_id,
        "state": job_state(items),
        "done": all(i.state in TERMINAL for i in items),
        "source": job.source,
        "requested_by": job.requested_by,
        "created_at": job.created_at,
        "updated_at": max([job.created_at] + [i.updated_at for i in items]),
        "total": job.total,
        "counts": counts,
    }


class JobStore:
    """Job rows in the TableStore's table."""

    BATCH = 100  # entities per transaction (Table Storage's limit)

    def __init__(self, store: TableStore) -> None:
        self._table = store._table  # one table, one client, by design

    @staticmethod
    def _item_entity(i: JobItem) -> dict:
        return {
            "PartitionKey": i.tenant_id,
            "RowKey": i.row_key,
            "Kind": "enrolment-job-item",
            "JobId": i.job_id,
            "PolicyId": i.policy_id,
            "VmId": i.vm_id,
            "State": i.state,
            "Attempts": i.attempts,
            "Deliveries": i.deliveries,
            "ErrorCode": i.error_code,
            "LastError": (i.last_error or "")[:ERROR_MAX] or None,
            "OutputTail": tail(i.output_tail),
            "UpdatedAt": i.updated_at,
            "MessageId": i.message_id,
        }

    @staticmethod
    def _outbox_entity(i: JobItem) -> dict:
        return {
            "PartitionKey": i.tenant_id,
            "RowKey": f"out|{i.job_id}|{vm_key(i.vm_id)}",
            "Kind": "enrolment-outbox",
            "JobId": i.job_id,
            "PolicyId": i.policy_id,
            "VmId": i.vm_id,
            "CreatedAt": i.updated_at,
        }

    @staticmethod
    def _item(x: Any) -> JobItem:
        return JobItem(
            tenant_id=x["PartitionKey"],
            job_id=x["JobId"],
            policy_id=x["PolicyId"],
            vm_id=x["VmId"],
            state=x.get("State") or QUEUED,
            attempts=int(x.get("Attempts") or 0),
            deliveries=int(x.get("Deliveries") or 0),
            error_code=x.get("ErrorCode"),
            last_error=x.get("LastError"),
            output_tail=x.get("OutputTail") or "",
            updated_at=int(x.get("UpdatedAt") or 0),
            message_id=x.get("MessageId"),
            etag=x.metadata.get("etag"),
        )

    @staticmethod
    def _job_entity(j: Job) -> dict:
        return {
            "PartitionKey": j.tenant_id,
            "RowKey": j.row_key,
            "Kind": "enrolment-job",
            "JobId": j.job_id,
            "PolicyId": j.policy_id,
            "Source": j.source,
            "CreatedAt": j.created_at,
            "Total": j.total,
            "RequestedBy": j.requested_by,
            "RequestedOid": j.requested_oid,
            "ApiUrl": j.api_url,
        }

    @staticmethod
    def _job(x: Any) -> Job:
        return Job(
            tenant_id=x["PartitionKey"],
            job_id=x["JobId"],
            policy_id=x["PolicyId"],
            source=x.get("Source") or "api",
            created_at=int(x.get("CreatedAt") or 0),
            total=int(x.get("Total") or 0),
            requested_by=x.get("RequestedBy"),
            requested_oid=x.get("RequestedOid"),
            api_url=x.get("ApiUrl"),
        )

    def create(self, job: Job, items: list[JobItem], audit: AuditEntry | None = None) -> None:
        """The job, its audit entry and its items each with its unsent message (outbox row), in
        transactions of at most 100 rows: the job row and its audit entry in the first; an item and
        its outbox row always in the same one."""
        groups = [[self._job_entity(job)] + (TableStore._audit_rows(audit) if audit is not None else [])]
        groups += [[self._item_entity(i), self._outbox_entity(i)] for i in items]
        batches: list[list[dict]] = [[]]
        for g in groups:
            if len(batches[-1]) + len(g) > self.BATCH:
                batches.append([])
            batches[-1] += g
        exists = Conflict(f"Enrolment job {job.job_id} (or its audit entry) already exists; nothing was queued.")
        for rows in batches:
            transact(
                self._table,
                "create enrolment job",
                [("create", r) for r in rows],
                not_found=f"Enrolment job {job.job_id} was not found.",
                lost=exists,
                exists=exists,
            )

    def unsent(self, tenant_id: str, *, created_before: int, limit: int = 1000) -> list[Unsent]:
        """Messages not yet known to be on the queue, made before `created_before` (a range read over
        the outbox rows only, at most `limit`)."""
        pages = self._table.query_entities(
            "PartitionKey eq @pk and RowKey ge @lo and RowKey lt @hi and CreatedAt lt @before",
            parameters={"pk": tenant_id, "lo": "out|", "hi": "out}", "before": created_before},
            results_per_page=min(limit, 1000),
        ).by_page()
        rows = _guard("list unsent enrolment messages", lambda: list(next(pages, [])))
        return [
            Unsent(
                tenant_id=tenant_id,
                job_id=x["JobId"],
                policy_id=x["PolicyId"],
                vm_id=x["VmId"],
                created_at=int(x.get("CreatedAt") or 0),
            )
            for x in rows[:limit]
        ]

    def mark_sent(self, tenant_id: str, sent: list[tuple[str, str]]) -> None:
        """Delete the outbox rows of messages now on the queue ((job id, vm id) pairs): in batches,
        one by one where a batch meets a row already gone (the timer sent it meanwhile)."""
        keys = [f"out|{job_id}|{vm_key(vm_id)}" for job_id, vm_id in sent]
        for k in range(0, len(keys), self.BATCH):
            chunk = keys[k : k + self.BATCH]
            try:
                transact(
                    self._table,
                    "mark enrolment messages sent",
                    [("delete", {"PartitionKey": tenant_id, "RowKey": rk}) for rk in chunk],
                    not_found="gone",
                    lost=Conflict("changed"),
                    exists=Conflict("changed"),
                )
            except NotFound:
                for rk in chunk:
                    _guard("mark an enrolment message sent", partial(self._table.delete_entity, tenant_id, rk))

    def get(self, tenant_id: str, job_id: str) -> tuple[Job, list[JobItem]] | None:
        rows = _guard(
            "get enrolment job",
            lambda: list(
                self._table.query_entities(
                    "PartitionKey eq @pk and RowKey ge @lo and RowKey lt @hi",
                    parameters={"pk": tenant_id, "lo": f"job|{job_id}", "hi": f"job|{job_id}}}"},
                )
            ),
        )
        head = next((r for r in rows if r["RowKey"] == f"job|{job_id}"), None)
        if head is None:
            return None
        items = [self._item(r) for r in rows if r["RowKey"].startswith(f"job|{job_id}|")]
        return self._job(head), sorted(items, key=lambda i: i.vm_id.lower())

    def get_head(self, tenant_id: str, job_id: str) -> Job | None:
        """The job row alone (one point read)."""
        try:
            x = _guard("get enrolment job", lambda: self._table.get_entity(tenant_id, f"job|{job_id}"))
        except ResourceNotFoundError:
            return None
        return self._job(x)

    def get_item(self, tenant_id: str, job_id: str, vm_id: str) -> JobItem | None:
        try:
            x = _guard(
                "get enrolment job item", lambda: self._table.get_entity(tenant_id, f"job|{job_id}|{vm_key(vm_id)}")
            )
        except ResourceNotFoundError:
            return None
        return self._item(x)

    def update_item(self, item: JobItem, etag: str, audit: AuditEntry | None = None) -> JobItem:
        """Replace the item if unchanged since read; with an audit entry, both in one transaction."""
        return replace(
            item,
            etag=_update(
                self._table,
                "update enrolment job item",
                self._item_entity(item),
                etag,
                audit,
                not_found=f"Job {item.job_id} has no item for {item.vm_id}.",
                lost=Conflict(f"Job {item.job_id}'s item for {item.vm_id} changed at the same time."),
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
