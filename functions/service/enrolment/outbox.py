"""A job's creation with its queue messages, through the outbox: the job, its audit entry and its
items land in one transaction, then the messages are sent and struck off."""

from __future__ import annotations

import contextvars
import logging
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ...core.audit import AuditEntry
from ...core.errors import BackendUnavailable, EzsshError
from ...core.policy import Identity, Policy
from ...hosts.azure_vms import VmRef
from ...storage.enrolmentjobs import Job, JobItem
from .base import EnrolmentBase

log = logging.getLogger("ezssh.enrolment")


class Outbox(EnrolmentBase):
    def _need_queue(self) -> None:
        if self.queue is None or self.jobs is None:
            raise BackendUnavailable(
                "Enrolment jobs need a queue: set EZSSH_QUEUE_ACCOUNT_URL (Azure) or a "
                "storage connection string with a QueueEndpoint."
            )

    @staticmethod
    def _message(job: Job, vm_id: str, deferrals: int = 0, retry: bool = False) -> dict[str, Any]:
        return {
            "v": 1,
            "tenant": job.tenant_id,
            "job": job.job_id,
            "policy": job.policy_id,
            "vm": vm_id,
            "deferrals": deferrals,
            "retry": retry,
        }

    def submit(
        self, policy: Policy, refs: list[VmRef], *, source: str, who: Identity | None = None, api_url: str | None = None
    ) -> tuple[Job, list[JobItem]]:
        """A job for these VMs, its items, and one queue message per VM."""
        self._need_queue()
        now = int(self.clock())
        job = Job(
            tenant_id=policy.tenant_id,
            job_id=uuid.uuid4().hex,
            policy_id=policy.id,
            source=source,
            created_at=now,
            total=len(refs),
            requested_by=who.upn if who else None,
            requested_oid=who.oid if who else None,
            api_url=api_url,
        )
        items = [
            JobItem(tenant_id=job.tenant_id, job_id=job.job_id, policy_id=policy.id, vm_id=r.id, updated_at=now)
            for r in refs
        ]
        entry = AuditEntry(
            tenant_id=policy.tenant_id,
            at=self.clock(),
            action="enrolment.queued",
            outcome="ok",
            actor_oid=who.oid if who else None,
            actor_upn=who.upn if who else None,
            policy_id=policy.id,
            chain=f"enr:{policy.id}",
            details={"job_id": job.job_id, "source": source, "total": len(refs), "vms": [r.id for r in refs][:50]},
        ).sealed()
        self.job_store.create(job, items, entry)  # the job, its audit entry, its items and their unsent messages
        sent = self._send([(job.tenant_id, job.job_id, job.policy_id, i.vm_id) for i in items])
        if len(sent) < len(items):
            log.warning(
                "enrolment job %s: %d of %d messages not queued yet; the timer sends them",
                job.job_id,
                len(items) - len(sent),
                len(items),
            )
        log.info(
            "enrolment job %s (%s) for policy %s: %d VMs, %d messages queued",
            job.job_id,
            source,
            policy.id,
            len(refs),
            len(sent),
        )
        return job, items

    def _send(self, messages: list[tuple[str, str, str, str]]) -> list[tuple[str, str]]:
        """Queue (tenant, job, policy, vm) messages and strike them off the outbox; returns the
        (job, vm) pairs sent. Stops at the first the queue refuses (the rest stay in the outbox);
        every queue call is bounded by the request's deadline (storage/queue.py)."""
        failed = threading.Event()

        def send(m: tuple[str, str, str, str]) -> tuple[str, str] | None:
            tid, job_id, pid, vm_id = m
            if failed.is_set():
                return None
            try:
                self.job_queue.send(
                    {"v": 1, "tenant": tid, "job": job_id, "policy": pid, "vm": vm_id, "deferrals": 0, "retry": False}
                )
                return job_id, vm_id
            except BackendUnavailable:
                failed.set()
                return None

        with ThreadPoolExecutor(max_workers=max(1, min(self.config.send_concurrency, len(messages)))) as pool:
            # each worker thread runs in a copy of this call's context: the request's deadline holds there too
            ctx = contextvars.copy_context()
            done = list(pool.map(lambda m: ctx.copy().run(send, m), messages))
        sent = [d for d in done if d is not None]
        by_tenant: dict[str, list[tuple[str, str]]] = {}
        for (tid, *_), d in zip(messages, done, strict=True):
            if d is not None:
                by_tenant.setdefault(tid, []).append(d)
        for tid, pairs in by_tenant.items():
            try:
                self.job_store.mark_sent(tid, pairs)
            except EzsshError as exc:  # sent, not struck off: the timer sends them again, the handler drops them
                log.warning(
                    "enrolment messages sent but still in the outbox (%s); they will be sent again", exc.message
                )
        return sent
