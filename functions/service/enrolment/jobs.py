"""The job runner: one queue message pushes one VM of one job; the outbox sweep; the poison queue."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from ...core.audit import AuditEntry
from ...core.errors import Conflict
from ...core.policy import Identity
from ...hosts.azure_vms import in_scope, parse_vm_id
from ...storage.enrolmentjobs import QUEUED, RUNNING, TERMINAL, JobItem
from ...storage.enrolments import FAILED, PENDING, RETRYING, SUCCEEDED
from .outbox import Outbox
from .push import Push

log = logging.getLogger("ezssh.enrolment")


class JobRunner(Push, Outbox):
    def send_unsent(self) -> dict[str, int]:
        """The timer's outbox sweep: send the messages of jobs the queue has not taken yet (older
        than `unsent_grace`, at most `unsent_page` per tenant)."""
        self._need_queue()
        now = int(self.clock())
        counts = {"unsent": 0, "sent": 0}
        for tid in self.config.tenants:
            rows = self.job_store.unsent(
                tid, created_before=now - self.config.unsent_grace, limit=self.config.unsent_page
            )
            counts["unsent"] += len(rows)
            sent = self._send([(r.tenant_id, r.job_id, r.policy_id, r.vm_id) for r in rows])
            counts["sent"] += len(sent)
            if len(sent) < len(rows):
                break  # the queue is refusing: the next tick tries again
        return counts

    def _update_item(
        self, item: JobItem, change: Callable[[JobItem], JobItem | None], audit: AuditEntry | None = None
    ) -> JobItem | None:
        """Write change(item), conditional on the item's ETag; on a race read it again and apply the
        change again (at most 5 times). None when `change` says there is nothing to write, or the
        item is gone."""
        for _ in range(5):
            new = change(item)
            if new is None:
                return None
            try:
                if not item.etag:  # as created (the job's transaction returns no ETags): read it first
                    raise Conflict("no ETag")
                return self.job_store.update_item(replace(new, updated_at=int(self.clock())), item.etag, audit)
            except Conflict:
                fresh = self.job_store.get_item(item.tenant_id, item.job_id, item.vm_id)
                if fresh is None:
                    return None
                item = fresh
        raise Conflict(f"Job {item.job_id}'s item for {item.vm_id} kept changing.")

    def _set_item(self, item: JobItem, audit: AuditEntry | None = None, **changes: Any) -> JobItem:
        """Write an item's progress (its own message's handler is the only writer; retried on a race)."""
        return self._update_item(item, lambda i: replace(i, **changes), audit) or item

    def _claim(self, item: JobItem, message_id: str | None) -> JobItem | None:
        """The item, marked RUNNING for this delivery; None if it is not this message's to run: done,
        or claimed by another message for the same item (one sent twice)."""

        def claim(i: JobItem) -> JobItem | None:
            if i.state in TERMINAL or (
                i.state == RUNNING and message_id and i.message_id and i.message_id != message_id
            ):
                return None
            return replace(i, state=RUNNING, deliveries=i.deliveries + 1, message_id=message_id)

        return self._update_item(item, claim)

    def run_message(self, body: str | bytes, message_id: str | None = None) -> str:
        """One queue message (`message_id`: the queue's id of it, the same on every redelivery): push
        one VM of one job. Returns what happened (for the log).

        Raises only for what a later delivery may fix (storage or the queue unreachable): the host
        then delivers the message again, up to maxDequeueCount, then moves it to the poison queue.
        """
        msg = _parse_message(body)
        if msg is None:
            log.warning("enrolment queue: dropped a message that is not an ezssh job: %r", str(body)[:200])
            return "dropped"
        tid, job_id, vm_id = msg["tenant"], msg["job"], msg["vm"]
        job = self.job_store.get_head(tid, job_id)
        item = self.job_store.get_item(tid, job_id, vm_id) if job is not None else None
        if job is None or item is None:
            log.warning("enrolment queue: job %s has no item for %s; dropped", job_id, vm_id)
            return "dropped"
        if item.state in TERMINAL:
            return "already_done"  # a repeated delivery
        policy = next((p for p in self._policies([tid]) if p.id == job.policy_id), None)
        if policy is None or not in_scope(vm_id, self.config.scopes_for(tid)):
            why = (
                f"Policy {job.policy_id!r} is gone or has no CA key."
                if policy is None
                else f"{vm_id} is no longer inside the enrolment scopes."
            )
            self._set_item(item, state=FAILED, error_code="not_enrollable", last_error=why)
            return "failed"
        claimed = self._claim(item, message_id)
        if claimed is None:
            return "duplicate"  # another message for this item runs it, or ran it
        item = claimed
        who = Identity(oid=job.requested_oid or "", tid=tid, upn=job.requested_by or "") if job.requested_by else None
        # a push asked for by hand runs even if the VM looks up to date; so does a retry the timer found due
        force = (job.source == "api" and item.attempts == 0) or bool(msg.get("retry"))
        rec, outcome = self._attempt(
            policy, parse_vm_id(vm_id), source=job.source, who=who, force=force, api_url=job.api_url, job_id=job_id
        )
        if outcome == "busy":
            deferrals = int(msg.get("deferrals") or 0)
            if deferrals >= self.config.max_deferrals:
                self._set_item(
                    item,
                    state=FAILED,
                    error_code="busy",
                    last_error="Another push to this VM kept running; gave up waiting for it.",
                )
                return "failed"
            wait = max(1, min(self.config.deferral_step, rec.lease_until - int(self.clock()) + 1))
            self.job_queue.send(self._message(job, vm_id, deferrals + 1, bool(msg.get("retry"))), delay=wait)
            self._set_item(item, state=QUEUED, last_error=f"Waiting {wait} s for another push to this VM to end.")
            return "deferred"
        state = {SUCCEEDED: SUCCEEDED, FAILED: FAILED, RETRYING: RETRYING}.get(rec.state, QUEUED)
        if outcome == "not_due" and rec.state == PENDING:
            state = RETRYING  # the timer sends it again when it is due
        self._set_item(
            item,
            state=state,
            attempts=item.attempts + (1 if outcome == "ran" else 0),
            error_code=rec.error_code,
            last_error=rec.last_error,
            output_tail=rec.output_tail,
        )
        return state if outcome == "ran" else f"{state} (nothing to push)"

    def give_up(self, body: str | bytes) -> str:
        """A message from the poison queue: every delivery failed. The item says so; the record's
        lease (if any) runs out by itself."""
        msg = _parse_message(body)
        if msg is None or self.jobs is None:
            return "dropped"
        item = self.job_store.get_item(msg["tenant"], msg["job"], msg["vm"])
        if item is None or item.state in TERMINAL:
            return "already_done"
        why = (
            f"The push was abandoned after {item.deliveries} deliveries that failed "
            "(see the service's logs); the reconcile timer or a new request tries again."
        )
        entry = AuditEntry(
            tenant_id=item.tenant_id,
            at=self.clock(),
            action="enrolment.gave_up",
            outcome="error",
            policy_id=item.policy_id,
            host=item.vm_id,
            error_code="gave_up",
            message=why,
            chain=f"enr:{item.policy_id}",
            details={"job_id": item.job_id, "deliveries": item.deliveries, "attempts": item.attempts},
        ).sealed()
        self._set_item(item, entry, state=FAILED, error_code="gave_up", last_error=why)
        log.error("enrolment job %s: gave up on %s", msg["job"], msg["vm"])
        return "failed"


def _parse_message(body: str | bytes) -> dict[str, Any] | None:
    try:
        msg = json.loads(body.decode() if isinstance(body, bytes) else body)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(msg, dict) or msg.get("v") != 1:
        return None
    if not all(isinstance(msg.get(k), str) and msg.get(k) for k in ("tenant", "job", "policy", "vm")):
        return None
    return msg
