"""Enrolment jobs: what one request (the API, an Event Grid event, the reconcile timer) asked to be
pushed, and how each VM of it went. Table Storage, in the tenant's partition (layout: enrolments.py).

A job's VMs are each one queue message and one item row, which only that message's handler changes.
The messages go through an outbox: each item row is written with an `out|` row (its message, not yet
sent) in the same transaction as the job row and its audit entry; the `out|` row is deleted once the
message is on the queue (see enrolments.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

from azure.core.exceptions import ResourceNotFoundError

from ..core.audit import AuditEntry
from ..core.errors import Conflict, NotFound
from .enrolments import ERROR_MAX, FAILED, RETRYING, SUCCEEDED, _update, tail, vm_key
from .tablecalls import _guard, transact
from .tables import TableStore

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
