"""Enrolment without a person: Event Grid's VM writes, and the timer's reconcile."""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

from ...core.errors import Conflict, InvalidRequest, NotFound
from ...core.policy import Policy
from ...hosts.azure_vms import PushError, Vm, VmRef, in_scope, parse_vm_id
from ...storage.enrolmentjobs import TERMINAL, Job
from ...storage.enrolments import PENDING, RETRYING, Enrolment, vm_key
from .base import _tag
from .outbox import Outbox
from .push import Push

log = logging.getLogger("ezssh.enrolment")

POLICY_TAG = "ezssh-policy"
VM_WRITE = "microsoft.compute/virtualmachines/write"
WRITE_SUCCESS = "Microsoft.Resources.ResourceWriteSuccess"


class Reconcile(Push, Outbox):
    def covering(self, vm: Vm, policies: list[Policy], tenant_hint: str | None = None) -> list[Policy]:
        """The policies that cover a VM by its ezssh-policy tag or by their resource id / tag patterns."""
        named = [x.strip() for x in (_tag(vm.tags, POLICY_TAG) or "").replace(";", ",").split(",") if x.strip()]
        out: dict[tuple[str, str], Policy] = {}
        for name in named:
            tid, _, pid = name.rpartition("/")
            hits = [p for p in policies if p.id == pid and (not tid or p.tenant_id.lower() == tid.lower())]
            if len({p.tenant_id for p in hits}) > 1:
                narrowed = [p for p in hits if tenant_hint and p.tenant_id.lower() == tenant_hint.lower()]
                if len(narrowed) != 1:
                    log.warning(
                        "VM %s: tag %s=%s is ambiguous across tenants; write <tenant id>/%s",
                        vm.id,
                        POLICY_TAG,
                        name,
                        pid,
                    )
                    continue
                hits = narrowed
            for p in hits:
                out[(p.tenant_id, p.id)] = p
        facts = {**vm.tags, "_resource_id": vm.id}
        for p in policies:
            arm_patterns = tuple(h for h in p.hosts if h.startswith(("/subscriptions/", "tag:")))
            if arm_patterns and replace(p, hosts=arm_patterns).covers_host(vm.ref.name, facts):
                out[(p.tenant_id, p.id)] = p
        return list(out.values())

    def handle_event(self, event_type: str, subject: str | None, data: dict[str, Any] | None) -> list[Job]:
        """One Event Grid event: queue a job per policy that covers the VM and is due there. Anything
        that is not a successful VM write in scope is ignored. Returns the jobs queued."""
        data = data or {}
        op = str(data.get("operationName") or "")
        if event_type != WRITE_SUCCESS or op.lower() != VM_WRITE:
            log.info("event ignored: %s %s", event_type, op)
            return []
        if str(data.get("status") or "Succeeded").lower() != "succeeded":
            return []
        raw_id = data.get("resourceUri") or subject or ""
        try:
            ref = parse_vm_id(raw_id)
        except InvalidRequest:
            log.warning("event ignored: %r is not a VM resource id", str(raw_id)[:300])
            return []
        if not self.config.scopes or not in_scope(ref.id, self.config.all_scopes):
            log.info("event ignored: %s is outside the enrolment scopes", ref.id)
            return []
        try:
            vm = self.vms.get_vm(ref)
        except PushError as exc:
            if exc.transient:
                raise  # the function fails, and Event Grid delivers the event again later
            log.warning("event for %s: %s", ref.id, exc.message)
            return []
        tenant_hint = str(data.get("tenantId") or "") or None
        policies = self.covering(vm, self._policies(self.config.tenants, cached=True), tenant_hint)
        jobs = []
        now = int(self.clock())
        for p in policies:
            if not in_scope(ref.id, self.config.scopes_for(p.tenant_id)):
                continue
            rec = self.record_for(p, vm.ref, "event")
            if self._due(rec, now, self._desired(p), "event", False):
                jobs.append(self.submit(p, [vm.ref], source="event")[0])
        return jobs

    def reconcile(self) -> dict[str, int]:
        """Queue due retries (on their own job), re-pushes after CA/KRL changes, and VMs in scope not
        enrolled yet (one new job per policy). Reads: one range read of each tenant's records (every
        policy's), then the VMs ARM lists are looked up in those rows (no point read per VM); a
        policy's KRL version and due host certificates are read only where a record needs comparing."""
        counts = {"vms_seen": 0, "retries_queued": 0, "jobs": 0, "queued": 0, "scope_errors": 0}
        self._need_queue()
        policies = self._policies(self.config.tenants)
        by_key = {(p.tenant_id, p.id): p for p in policies}
        desired = {k: self._desired(p, every_vm=True) for k, p in by_key.items()}
        now = int(self.clock())
        work: dict[tuple[str, str, str], tuple[Policy, VmRef]] = {}
        known: set[tuple[str, str, str]] = set()  # the records read here: a listed VM is looked up in them
        for tid in dict.fromkeys(t for t, _ in by_key):
            for rec in self.store.list(tid):  # every policy's records of the tenant: one range read
                pid = rec.policy_id
                p = by_key.get((tid, pid))
                if p is None:
                    continue  # a deleted policy's, or one without a CA key
                known.add((tid, pid, vm_key(rec.vm_id)))
                if not in_scope(rec.vm_id, self.config.scopes_for(tid)):
                    continue
                if not self._due(rec, now, desired[(tid, pid)], "reconcile", False):
                    continue
                if rec.state in (PENDING, RETRYING) and rec.job_id and self._requeue(rec, now):
                    counts["retries_queued"] += 1
                    continue
                work[(tid, pid, rec.vm_id.lower())] = (p, parse_vm_id(rec.vm_id))
        for scope in self.config.all_scopes:
            try:
                vms = self.vms.list_vms(scope)
            except PushError as exc:
                counts["scope_errors"] += 1
                log.warning("reconcile: %s", exc.message)
                continue
            counts["vms_seen"] += len(vms)
            for vm in vms:
                for p in self.covering(vm, policies):
                    if not in_scope(vm.id, self.config.scopes_for(p.tenant_id)):
                        continue
                    key = (p.tenant_id, p.id, vm.id.lower())
                    if key not in work and (p.tenant_id, p.id, vm_key(vm.id)) not in known:
                        work[key] = (p, vm.ref)
        per_policy: dict[tuple[str, str], list[VmRef]] = {}
        for (tid, pid, _), (_, ref) in work.items():
            per_policy.setdefault((tid, pid), []).append(ref)
        for policy_key, refs in per_policy.items():
            self.submit(by_key[policy_key], refs, source="reconcile")
            counts["jobs"] += 1
            counts["queued"] += len(refs)
        return counts

    def _requeue(self, rec: Enrolment, now: int) -> bool:
        """Send a due retry to the job it belongs to; the record is marked (ETag-guarded) so the next
        tick does not send it again while the message waits."""
        job = self.job_store.get_head(rec.tenant_id, rec.job_id or "")
        item = self.job_store.get_item(rec.tenant_id, job.job_id, rec.vm_id) if job is not None else None
        if job is None or item is None or item.state in TERMINAL:
            return False
        try:
            self.store.update(replace(rec, next_attempt_at=now + self.config.lease_seconds), rec.etag or "")
        except (Conflict, NotFound):
            return True  # someone else is on it
        self.job_queue.send(self._message(job, item.vm_id, retry=True))
        return True
