"""Enrolment: push a policy's host setup script to Azure VMs, by hand, on VM events, and by reconcile.

Nothing runs Run Command on a request's path. A request becomes a job (one item per VM, Table
Storage) and one queue message per VM (Azure Storage Queue); the queue-triggered function runs the
push (`run_message`). The HTTP call and the Event Grid delivery return as soon as the messages are
queued; the job's state is read back with `job()`.

The messages go through an outbox (storage/enrolments.py): the job row, its audit entry and every
item with its unsent message land in one transaction first; the messages are sent after, within the
request's deadline, and each one sent is struck off. What the queue did not take (down, slow, an
answer lost) the timer sends (`send_unsent`). A message sent twice changes nothing: its handler
claims the item with the queue's message id, and another message for a claimed or finished item is
dropped; a redelivery of the same message (its worker died) carries on.

Use cases (EnrolmentService):
  enrol(who, policy, vm_id=... | resource_group=..., tag="k=v")   POST /api/policies/{id}/enrolments (202)
  job(who, policy, job_id)                                          GET  /api/policies/{id}/enrolment-jobs/{job}
  list(who, policy, limit, continuation)                            GET  /api/policies/{id}/enrolments (a page)
  handle_event(event)        Event Grid: Microsoft.Resources.ResourceWriteSuccess for a VM write
  reconcile()                timer: due retries, VMs in scope not yet enrolled, re-push after a CA
                             rotation or a revocation (pushed CA fingerprints / KRL version differ)
  run_message(body, id)      queue trigger: one VM of one job
  send_unsent()              timer: the messages of jobs the queue has not taken yet
  give_up(body)              poison queue trigger: the message failed every delivery

A VM is covered by a policy (for events and reconcile) when its tag `ezssh-policy` names the policy
(`<policy id>` or `<tenant id>/<policy id>`; several separated by commas), or when one of the
policy's host patterns is a resource id (the VM or its resource group) or a `tag:name=value` that the
VM carries. Name globs and CIDRs never enrol anything on their own.

Each push is one attempt on an enrolment record (storage/enrolments.py): the record is claimed with
an ETag-guarded update (state pending, a lease longer than the function timeout), the script runs
through Run Command, and the outcome is written back: succeeded (with the CA fingerprints and KRL
version pushed), retrying (a transient failure: agent not ready, throttling, ARM unavailable; next
attempt after an exponential backoff), or failed (VM gone, permission missing, the script exited non-zero, or too many attempts).
Only VMs inside the configured scopes (EZSSH_ENROL_SCOPES) are ever touched.

A worker that dies mid-push (killed, or past the function timeout) leaves its lease on the record; the
message comes back after its visibility timeout, finds the lease, and is queued again to run when
the lease ends, so a VM's script never runs twice at the same time. Each push is audited when it
starts (`enrolment.push_started`, with the claim) and when it ends (pushed / retrying / failed, with
the outcome), and an abandoned message as `enrolment.gave_up`, so a push that ran on a VM is on record
even when its worker died. Retries are bounded: transient
Run Command failures by `max_attempts` (the timer re-queues them after the backoff), crashes by the
host's maxDequeueCount (then the poison queue, and `give_up` marks the item failed).
"""

from __future__ import annotations

import contextvars
import functools
import json
import logging
import re
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable

from ..core.audit import AuditEntry
from ..core.paging import decode_token, encode_token
from ..core.errors import BackendUnavailable, Conflict, EzsshError, Forbidden, InvalidRequest, NotFound
from ..core.paging import decode_token, encode_token
from ..core.policy import Identity, Policy
from ..storage.enrolments import (
    FAILED,
    PENDING,
    QUEUED,
    RETRYING,
    RUNNING,
    SUCCEEDED,
    TERMINAL,
    Enrolment,
    EnrolmentStore,
    Job,
    JobItem,
    JobStore,
    job_dict,
    tail,
    vm_key,
)
from .azure_vms import (
    AzureVms,
    PushError,
    Vm,
    VmRef,
    in_scope,
    parse_resource_group,
    parse_vm_id,
    wrap_script,
)

log = logging.getLogger("ezssh.enrolment")

POLICY_TAG = "ezssh-policy"
VM_WRITE = "microsoft.compute/virtualmachines/write"
WRITE_SUCCESS = "Microsoft.Resources.ResourceWriteSuccess"
MAX_LIST_LIMIT = 1000
VM_KEY_RE = re.compile(r"^[0-9a-f]{32}$")


class EnrolmentForbidden(Forbidden):
    code = "outside_enrolment_scopes"


class ArmForbidden(Forbidden):
    code = "arm_forbidden"


@dataclass(frozen=True)
class EnrolConfig:
    scopes: tuple[str, ...]
    tenants: tuple[str, ...]
    public_url: str | None = None
    backoff_base: int = 60  # seconds before the 2nd attempt; doubles after each transient failure
    backoff_cap: int = 1800
    max_attempts: int = 8
    # Every Run Command of one push together (the host keys, then the setup script) waits at most this
    # long, leaving the rest of host.json's functionTimeout (600 s) for reads, signing and the record.
    push_budget: int = 480
    # A push not finished by then ran in a worker that is gone: longer than host.json's functionTimeout
    # (600 s), which is longer than the push's Run Command budget (push_budget).
    lease_seconds: int = 660
    # A message that finds another push's lease comes back every deferral_step seconds (or when the
    # lease ends, if sooner), at most max_deferrals times: 48 x 30 s outlasts two leases.
    deferral_step: int = 30
    max_deferrals: int = 48
    max_job_vms: int = 500  # VMs one request may name (a resource group's tagged VMs)
    send_concurrency: int = 8  # queue messages sent at once when a job is queued
    # The timer sends outbox messages older than this (younger ones are still being sent by the call
    # that made the job), at most unsent_page per tenant per tick.
    unsent_grace: int = 60
    unsent_page: int = 500

    # A scope may name the one tenant whose policies may push into it: "<tenant id>=/subscriptions/...".
    # Settings insist on that when the deployment serves several tenants, so one tenant's admins can
    # never push their CA onto another tenant's VMs.
    def scopes_for(self, tenant_id: str) -> tuple[str, ...]:
        return tuple(scope for tid, scope in map(split_scope, self.scopes) if tid is None or tid == tenant_id.lower())

    @property
    def all_scopes(self) -> tuple[str, ...]:
        return tuple(scope for _, scope in map(split_scope, self.scopes))


def split_scope(entry: str) -> tuple[str | None, str]:
    tid, sep, scope = entry.partition("=")
    return (tid.strip().lower(), scope.strip()) if sep else (None, entry)


@dataclass
class _Desired:
    fingerprints: tuple[str, ...]
    krl: Callable[[], Any]  # -> the policy's KRL (service.hosts.Derived), read on first need only
    render: Callable[..., str]  # render(host_certs="") -> the setup script
    host_certs_due: Callable[[str], bool] = lambda vm_id: False

    @property
    def krl_version(self) -> int:
        return self.krl().version


class EnrolmentService:
    def __init__(self, hosts: Any, store: EnrolmentStore, vms: AzureVms | Callable[[], AzureVms],
                 config: EnrolConfig, clock: Callable[[], float] = time.time, *,
                 jobs: JobStore | None = None, queue: Any = None, host_certs: Any = None) -> None:
        self.hosts = hosts  # functions.service.hosts.Hosts: policies, KRL, host tokens, audit
        self.store = store
        self.jobs = jobs  # job rows (storage/enrolments.py)
        self.queue = queue  # storage.queue.JobQueue: one message per VM of a job
        self._vms = vms
        self.config = config
        self.clock = clock
        self.host_certs = host_certs  # hosts.vm_hostcerts.VmHostCerts, or None: host keys left alone

    @property
    def vms(self) -> AzureVms:
        if not isinstance(self._vms, AzureVms):
            self._vms = self._vms()  # built on first use (the compute client is lazy)
        return self._vms

    # ---- what a policy wants on its hosts --------------------------------------------------
    def _desired(self, policy: Policy, api_url: str | None = None, *, every_vm: bool = False) -> _Desired:
        """What the policy wants on its hosts. `every_vm` (the timer, which looks at every record of
        the policy): which VMs' host certificates are due is read once for the policy (one range
        read), not once per VM."""
        keys = list(policy.trusted_ca)
        # Read when first needed (a record to compare, a script to render), then kept: one version
        # read per policy and pass; built again only when the policy's revocations changed.
        krl = functools.cache(lambda: self.hosts.krl(policy))

        def render(host_certs: str = "") -> str:
            url = self.config.public_url or api_url
            if not url:
                raise PushError("not_configured", "EZSSH_PUBLIC_URL is not set, so the setup script cannot tell the "
                                                  "host where to fetch the KRL.", transient=False)
            if not keys:
                raise PushError("no_ca", f"Policy {policy.id!r} has no CA key to trust.", transient=False)
            return self.hosts.render_setup(policy, url, krl().data, host_certs=host_certs)

        return _Desired(tuple(c.fingerprint for c in keys), krl, render,
                        self._all_due(policy) if every_vm else lambda vm_id: self._host_certs_due(policy, vm_id))

    # ---- host certificates (hosts/vm_hostcerts.py) -------------------------------------------
    def _host_certs_due(self, policy: Policy, vm_id: str) -> bool:
        return self.host_certs is not None and self.host_certs.due(policy, vm_id)

    def _all_due(self, policy: Policy) -> Callable[[str], bool]:
        due = functools.cache(lambda: self.host_certs.due_vms(policy) if self.host_certs is not None else frozenset())
        return lambda vm_id: vm_id.lower() in due()

    def _host_certs_for(self, policy: Policy, ref: VmRef, vms: AzureVms) -> str:
        return self.host_certs.certs_for(policy, vms, ref) if self.host_certs is not None else ""

    # ---- audit -------------------------------------------------------------------------------
    def _audit(self, tenant_id: str, who: Identity | None, action: str, outcome: str, rec: Enrolment,
               **details: object) -> AuditEntry:
        return AuditEntry(tenant_id=tenant_id, at=self.clock(), action=action, outcome=outcome,
                          actor_oid=who.oid if who else None, actor_upn=who.upn if who else None,
                          policy_id=rec.policy_id, host=rec.vm_id, error_code=rec.error_code,
                          message=rec.last_error, chain=f"enr:{rec.policy_id}",
                          details={"state": rec.state, "attempts": rec.attempts, "source": rec.source,
                                   **details}).sealed()

    # ---- one attempt ------------------------------------------------------------------------
    def _backoff(self, attempts: int) -> int:
        return min(self.config.backoff_cap, self.config.backoff_base * 2 ** max(0, attempts - 1))

    def _due(self, rec: Enrolment, now: int, desired: _Desired, source: str, force: bool) -> bool:
        if rec.lease_until > now:
            return False  # a push is running elsewhere
        if force:
            return True
        if rec.state in (PENDING, RETRYING):
            return rec.next_attempt_at <= now
        if rec.state == SUCCEEDED:
            return (rec.ca_fingerprints != desired.fingerprints or rec.krl_version != desired.krl_version
                    or desired.host_certs_due(rec.vm_id))
        return source == "event"  # failed: a new VM write is a reason to try again

    def record_for(self, policy: Policy, ref: VmRef, source: str, who: Identity | None = None) -> Enrolment:
        """The VM's record for this policy, created as pending if there is none."""
        now = int(self.clock())
        rec = self.store.get(policy.tenant_id, policy.id, ref.id)
        if rec is not None:
            return rec
        new = Enrolment(tenant_id=policy.tenant_id, policy_id=policy.id, vm_id=ref.id, state=PENDING,
                        created_at=now, updated_at=now, next_attempt_at=now, source=source,
                        requested_by=who.upn if who else None)
        try:
            return self.store.create(new)
        except Conflict:
            got = self.store.get(policy.tenant_id, policy.id, ref.id)
            if got is None:  # pragma: no cover - deleted between the two calls
                raise
            return got

    def attempt(self, policy: Policy, ref: VmRef, *, source: str, who: Identity | None = None,
                force: bool = False, desired: _Desired | None = None, api_url: str | None = None) -> Enrolment:
        """Push the policy's setup script to one VM if its record says it is due. Returns the record."""
        return self._attempt(policy, ref, source=source, who=who, force=force, desired=desired, api_url=api_url)[0]

    def _attempt(self, policy: Policy, ref: VmRef, *, source: str, who: Identity | None = None,
                 force: bool = False, desired: _Desired | None = None, api_url: str | None = None,
                 job_id: str | None = None) -> tuple[Enrolment, str]:
        """(the record, what happened: ran | busy (another push holds the lease) | not_due)."""
        desired = desired or self._desired(policy, api_url)
        rec = self.record_for(policy, ref, source, who)
        now = int(self.clock())
        if rec.lease_until > now:
            return rec, "busy"
        if not self._due(rec, now, desired, source, force):
            return rec, "not_due"
        claimed = replace(rec, state=PENDING, lease_until=now + self.config.lease_seconds, updated_at=now,
                          source=source, requested_by=who.upn if who else rec.requested_by,
                          job_id=job_id or rec.job_id)
        attempts = rec.attempts + 1 if rec.state in (PENDING, RETRYING) else 1
        started = self._audit(policy.tenant_id, who, "enrolment.push_started", "ok", claimed, attempt=attempts,
                              job_id=job_id, ca_fingerprints=list(desired.fingerprints),
                              krl_version=desired.krl_version)
        try:
            claimed = self.store.update(claimed, rec.etag or "", started)  # the claim and its audit, together
        except (Conflict, NotFound):
            log.info("enrolment of %s in %s taken by another worker", ref.id, policy.id)
            return self.store.get(policy.tenant_id, policy.id, ref.id) or rec, "busy"
        details: dict[str, object] = {}
        try:
            vms = self.vms.within(self.config.push_budget)  # one budget for this push's Run Commands
            lines = wrap_script(desired.render(self._host_certs_for(policy, ref, vms)))
            result = vms.run_shell_script(ref, lines)
            details = {"exit_status": result.exit_status, "duration_ms": result.duration_ms,
                       "lro_polls": result.polls}
            out = result.output + (f"\n[stderr]\n{result.stderr}" if result.stderr else "")
            base = replace(claimed, attempts=attempts, output_tail=tail(out), lease_until=0, updated_at=int(self.clock()),
                           duration_ms=result.duration_ms, lro_polls=result.polls, next_attempt_at=0)
            if result.ok:
                final = replace(base, state=SUCCEEDED, last_error=None, error_code=None,
                                ca_fingerprints=desired.fingerprints, krl_version=desired.krl_version)
            else:
                why = (f"The setup script exited with status {result.exit_status}" if result.exit_status is not None
                       else "The setup script's exit status is missing from Run Command's output")
                final = replace(base, state=FAILED, error_code="script_failed",
                                last_error=f"{why} on {ref.name}; nothing was changed there unless the output says "
                                           "otherwise. See output_tail.")
        except PushError as exc:
            final = self._after_error(claimed, attempts, exc)
        except EzsshError as exc:  # rendering refused a value, storage, ...
            final = self._after_error(claimed, attempts, PushError(exc.code, exc.message, transient=exc.status >= 500))
        except ValueError as exc:  # RenderError
            final = self._after_error(claimed, attempts, PushError("render_failed", str(exc), transient=False))
        action = {SUCCEEDED: "enrolment.pushed", RETRYING: "enrolment.retrying"}.get(final.state, "enrolment.failed")
        entry = self._audit(policy.tenant_id, who, action, "ok" if final.state == SUCCEEDED else "error", final,
                            ca_fingerprints=list(desired.fingerprints), krl_version=desired.krl_version, **details)
        try:
            final = self.store.update(final, claimed.etag or "", entry)  # the outcome and its audit, together
        except (Conflict, NotFound):  # pragma: no cover - someone broke our lease
            log.warning("enrolment of %s in %s changed during the push; outcome %s not saved",
                        ref.id, policy.id, final.state)
        log.info("enrolment %s -> %s: %s (attempt %d)%s", policy.id, ref.id, final.state, final.attempts,
                 f" {final.error_code}: {final.last_error}" if final.error_code else "")
        return final, "ran"

    def _after_error(self, rec: Enrolment, attempts: int, exc: PushError) -> Enrolment:
        now = int(self.clock())
        base = replace(rec, attempts=attempts, lease_until=0, updated_at=now, error_code=exc.code)
        if exc.transient and attempts < self.config.max_attempts:
            wait = self._backoff(attempts)
            return replace(base, state=RETRYING, next_attempt_at=now + wait,
                           last_error=f"{exc.message} (attempt {attempts} of {self.config.max_attempts}; next in {wait} s)")
        if exc.transient:
            return replace(base, state=FAILED, next_attempt_at=0,
                           last_error=f"Gave up after {attempts} attempts: {exc.message}")
        return replace(base, state=FAILED, next_attempt_at=0, last_error=exc.message)

    # ---- by hand: the API and the CLI ----------------------------------------------------------
    def _check_scopes(self, resource_id: str, tenant_id: str) -> None:
        scopes = self.config.scopes_for(tenant_id)
        if not scopes:
            raise EnrolmentForbidden("Enrolment is not configured for this tenant: EZSSH_ENROL_SCOPES names no "
                                     "subscription or resource group its policies may push to.")
        if not in_scope(resource_id, scopes):
            raise EnrolmentForbidden(f"{resource_id} is outside the scopes ezssh may enrol "
                                     f"({', '.join(scopes)}); nothing was pushed.")

    def _default_subscription(self, tenant_id: str) -> str | None:
        subs = {s.split("/")[2].lower() for s in self.config.scopes_for(tenant_id)}
        return subs.pop() if len(subs) == 1 else None

    def _admin_policy(self, who: Identity, policy_id: str) -> Policy:
        policy = self.hosts.policy(who, policy_id)  # NotFound for other tenants and invisible ones
        if not policy.is_admin(who):
            raise Forbidden(f"Only tenant admins and admins of policy {policy_id!r} may enrol hosts in it.")
        return policy

    def resolve_targets(self, who: Identity, policy_id: str, *, vm_id: object = None, resource_group: object = None,
                        tag: object = None) -> tuple[Policy, list[VmRef]]:
        """Check the request and find the VMs it names. Raises (and audits) before anything is pushed."""
        try:
            if (vm_id is None) == (resource_group is None):
                raise InvalidRequest("Give either 'vm_id', or 'resource_group' with 'tag'.")
            if vm_id is not None and tag is not None:
                raise InvalidRequest("'tag' goes with 'resource_group', not with 'vm_id'.")
            if resource_group is not None:
                if not isinstance(tag, str) or tag.count("=") < 1 or not tag.split("=", 1)[0].strip() \
                        or not tag.split("=", 1)[1].strip() or len(tag) > 600:
                    raise InvalidRequest("'tag' must look like 'name=value'.")
            policy = self._admin_policy(who, policy_id)
            if vm_id is not None:
                ref = parse_vm_id(vm_id)
                self._check_scopes(ref.id, who.tid)
                vm = self._get_vm(ref)
                return policy, [vm.ref]
            sub, rg = parse_resource_group(resource_group, self._default_subscription(who.tid))
            rg_id = f"/subscriptions/{sub}/resourceGroups/{rg}"
            self._check_scopes(rg_id, who.tid)
            k, v = (x.strip() for x in str(tag).split("=", 1))
            try:
                vms = self.vms.list_vms(rg_id)
            except PushError as exc:
                raise self._as_api_error(exc) from None
            return policy, [vm.ref for vm in vms if _tag(vm.tags, k) == v]
        except EzsshError as exc:
            self.hosts.refuse(who, exc, "enrolment.refused", policy_id=policy_id,
                                details={"vm_id": str(vm_id)[:300] if vm_id is not None else None,
                                         "resource_group": str(resource_group)[:300] if resource_group else None})
            raise

    def _get_vm(self, ref: VmRef) -> Vm:
        try:
            return self.vms.get_vm(ref)
        except PushError as exc:
            raise self._as_api_error(exc) from None

    @staticmethod
    def _as_api_error(exc: PushError) -> EzsshError:
        if exc.code == "vm_not_found":
            return NotFound(exc.message)
        if exc.code == "forbidden":
            return ArmForbidden(exc.message)
        return BackendUnavailable(exc.message)

    def enrol(self, who: Identity, policy_id: str, *, vm_id: object = None, resource_group: object = None,
              tag: object = None, api_url: str | None = None) -> tuple[Job, list[JobItem]]:
        """Queue a push to the VMs named; returns the job at once (the queue worker does the pushing)."""
        policy, refs = self.resolve_targets(who, policy_id, vm_id=vm_id, resource_group=resource_group, tag=tag)
        if len(refs) > self.config.max_job_vms:
            exc = InvalidRequest(f"That names {len(refs)} VMs; one request may enrol at most "
                                 f"{self.config.max_job_vms}. Use a narrower tag.")
            self.hosts.refuse(who, exc, "enrolment.refused", policy_id=policy_id)
            raise exc
        return self.submit(policy, refs, source="api", who=who, api_url=api_url)

    # ---- jobs: queue, run, read ------------------------------------------------------------------
    def _need_queue(self) -> None:
        if self.queue is None or self.jobs is None:
            raise BackendUnavailable("Enrolment jobs need a queue: set EZSSH_QUEUE_ACCOUNT_URL (Azure) or a "
                                     "storage connection string with a QueueEndpoint.")

    @staticmethod
    def _message(job: Job, vm_id: str, deferrals: int = 0, retry: bool = False) -> dict:
        return {"v": 1, "tenant": job.tenant_id, "job": job.job_id, "policy": job.policy_id, "vm": vm_id,
                "deferrals": deferrals, "retry": retry}

    def submit(self, policy: Policy, refs: list[VmRef], *, source: str, who: Identity | None = None,
               api_url: str | None = None) -> tuple[Job, list[JobItem]]:
        """A job for these VMs, its items, and one queue message per VM."""
        self._need_queue()
        now = int(self.clock())
        job = Job(tenant_id=policy.tenant_id, job_id=uuid.uuid4().hex, policy_id=policy.id, source=source,
                  created_at=now, total=len(refs), requested_by=who.upn if who else None,
                  requested_oid=who.oid if who else None, api_url=api_url)
        items = [JobItem(tenant_id=job.tenant_id, job_id=job.job_id, policy_id=policy.id, vm_id=r.id,
                         updated_at=now) for r in refs]
        entry = AuditEntry(tenant_id=policy.tenant_id, at=self.clock(), action="enrolment.queued", outcome="ok",
                           actor_oid=who.oid if who else None, actor_upn=who.upn if who else None,
                           policy_id=policy.id, chain=f"enr:{policy.id}",
                           details={"job_id": job.job_id, "source": source, "total": len(refs),
                                    "vms": [r.id for r in refs][:50]}).sealed()
        self.jobs.create(job, items, entry)  # the job, its audit entry, its items and their unsent messages
        sent = self._send([(job.tenant_id, job.job_id, job.policy_id, i.vm_id) for i in items])
        if len(sent) < len(items):
            log.warning("enrolment job %s: %d of %d messages not queued yet; the timer sends them",
                        job.job_id, len(items) - len(sent), len(items))
        log.info("enrolment job %s (%s) for policy %s: %d VMs, %d messages queued", job.job_id, source, policy.id,
                 len(refs), len(sent))
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
                self.queue.send({"v": 1, "tenant": tid, "job": job_id, "policy": pid, "vm": vm_id,
                                 "deferrals": 0, "retry": False})
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
        for (tid, *_), d in zip(messages, done):
            if d is not None:
                by_tenant.setdefault(tid, []).append(d)
        for tid, pairs in by_tenant.items():
            try:
                self.jobs.mark_sent(tid, pairs)
            except EzsshError as exc:  # sent, not struck off: the timer sends them again, the handler drops them
                log.warning("enrolment messages sent but still in the outbox (%s); they will be sent again", exc.message)
        return sent

    def send_unsent(self) -> dict[str, int]:
        """The timer's outbox sweep: send the messages of jobs the queue has not taken yet (older
        than `unsent_grace`, at most `unsent_page` per tenant)."""
        self._need_queue()
        now = int(self.clock())
        counts = {"unsent": 0, "sent": 0}
        for tid in self.config.tenants:
            rows = self.jobs.unsent(tid, created_before=now - self.config.unsent_grace, limit=self.config.unsent_page)
            counts["unsent"] += len(rows)
            sent = self._send([(r.tenant_id, r.job_id, r.policy_id, r.vm_id) for r in rows])
            counts["sent"] += len(sent)
            if len(sent) < len(rows):
                break  # the queue is refusing: the next tick tries again
        return counts

    def job(self, who: Identity, policy_id: str, job_id: str) -> tuple[Job, list[JobItem]]:
        """A job of this policy, for its admins (other tenants' jobs are never found)."""
        try:
            policy = self._admin_policy(who, policy_id)
            found = None
            if self.jobs is not None and len(job_id) == 32 and all(c in "0123456789abcdef" for c in job_id):
                found = self.jobs.get(policy.tenant_id, job_id)
            if found is None or found[0].policy_id != policy.id:
                raise NotFound(f"No enrolment job {job_id[:64]!r} in policy {policy_id!r}.")
        except EzsshError as exc:
            self.hosts.refuse(who, exc, "enrolment.job.refused", policy_id=policy_id)
            raise
        return found

    @staticmethod
    def describe(job: Job, items: list[JobItem]) -> dict:
        """The job as the API shows it."""
        return {"job": job_dict(job, items), "items": [i.to_dict() for i in items]}

    def _update_item(self, item: JobItem, change: Callable[[JobItem], JobItem | None],
                     audit: AuditEntry | None = None) -> JobItem | None:
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
                return self.jobs.update_item(replace(new, updated_at=int(self.clock())), item.etag, audit)
            except Conflict:
                fresh = self.jobs.get_item(item.tenant_id, item.job_id, item.vm_id)
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
            if i.state in TERMINAL or (i.state == RUNNING and message_id and i.message_id
                                       and i.message_id != message_id):
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
        job = self.jobs.get_head(tid, job_id)
        item = self.jobs.get_item(tid, job_id, vm_id) if job is not None else None
        if job is None or item is None:
            log.warning("enrolment queue: job %s has no item for %s; dropped", job_id, vm_id)
            return "dropped"
        if item.state in TERMINAL:
            return "already_done"  # a repeated delivery
        policy = next((p for p in self._policies([tid]) if p.id == job.policy_id), None)
        if policy is None or not in_scope(vm_id, self.config.scopes_for(tid)):
            why = (f"Policy {job.policy_id!r} is gone or has no CA key." if policy is None
                   else f"{vm_id} is no longer inside the enrolment scopes.")
            self._set_item(item, state=FAILED, error_code="not_enrollable", last_error=why)
            return "failed"
        claimed = self._claim(item, message_id)
        if claimed is None:
            return "duplicate"  # another message for this item runs it, or ran it
        item = claimed
        who = (Identity(oid=job.requested_oid or "", tid=tid, upn=job.requested_by or "")
               if job.requested_by else None)
        # a push asked for by hand runs even if the VM looks up to date; so does a retry the timer found due
        force = (job.source == "api" and item.attempts == 0) or bool(msg.get("retry"))
        rec, outcome = self._attempt(policy, parse_vm_id(vm_id), source=job.source, who=who, force=force,
                                     api_url=job.api_url, job_id=job_id)
        if outcome == "busy":
            deferrals = int(msg.get("deferrals") or 0)
            if deferrals >= self.config.max_deferrals:
                self._set_item(item, state=FAILED, error_code="busy",
                               last_error="Another push to this VM kept running; gave up waiting for it.")
                return "failed"
            wait = max(1, min(self.config.deferral_step, rec.lease_until - int(self.clock()) + 1))
            self.queue.send(self._message(job, vm_id, deferrals + 1, bool(msg.get("retry"))), delay=wait)
            self._set_item(item, state=QUEUED, last_error=f"Waiting {wait} s for another push to this VM to end.")
            return "deferred"
        state = {SUCCEEDED: SUCCEEDED, FAILED: FAILED, RETRYING: RETRYING}.get(rec.state, QUEUED)
        if outcome == "not_due" and rec.state == PENDING:
            state = RETRYING  # the timer sends it again when it is due
        self._set_item(item, state=state, attempts=item.attempts + (1 if outcome == "ran" else 0),
                       error_code=rec.error_code, last_error=rec.last_error, output_tail=rec.output_tail)
        return state if outcome == "ran" else f"{state} (nothing to push)"

    def give_up(self, body: str | bytes) -> str:
        """A message from the poison queue: every delivery failed. The item says so; the record's
        lease (if any) runs out by itself."""
        msg = _parse_message(body)
        if msg is None or self.jobs is None:
            return "dropped"
        item = self.jobs.get_item(msg["tenant"], msg["job"], msg["vm"])
        if item is None or item.state in TERMINAL:
            return "already_done"
        why = (f"The push was abandoned after {item.deliveries} deliveries that failed "
               "(see the service's logs); the reconcile timer or a new request tries again.")
        entry = AuditEntry(tenant_id=item.tenant_id, at=self.clock(), action="enrolment.gave_up", outcome="error",
                           policy_id=item.policy_id, host=item.vm_id, error_code="gave_up", message=why,
                           chain=f"enr:{item.policy_id}",
                           details={"job_id": item.job_id, "deliveries": item.deliveries,
                                    "attempts": item.attempts}).sealed()
        self._set_item(item, entry, state=FAILED, error_code="gave_up", last_error=why)
        log.error("enrolment job %s: gave up on %s", msg["job"], msg["vm"])
        return "failed"

    def list(self, who: Identity, policy_id: str, *, limit: int = 100,
             continuation: str | None = None) -> tuple[list[Enrolment], str | None]:
        """One page of the policy's records (in a stable order: the hash of the VM id) and the
        continuation token of the next page (None at the end)."""
        try:
            if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIST_LIMIT:
                raise InvalidRequest(f"limit must be between 1 and {MAX_LIST_LIMIT}.")
            after = decode_token(continuation, VM_KEY_RE)
            policy = self._admin_policy(who, policy_id)
        except EzsshError as exc:
            self.hosts.refuse(who, exc, "enrolment.list.refused", policy_id=policy_id)
            raise
        recs, more = self.store.list_page(policy.tenant_id, policy.id, after=after, limit=limit)
        return recs, encode_token(vm_key(recs[-1].vm_id)) if more and recs else None

    # ---- automatic: Event Grid and the timer ---------------------------------------------------
    def _policies(self, tenant_ids: Iterable[str]) -> list[Policy]:
        out = []
        for tid in tenant_ids:
            out += self.hosts.policies_with_ca(tid)
        return out

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
                    log.warning("VM %s: tag %s=%s is ambiguous across tenants; write <tenant id>/%s",
                                vm.id, POLICY_TAG, name, pid)
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

    def handle_event(self, event_type: str, subject: str | None, data: dict | None) -> list[Job]:
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
        policies = self.covering(vm, self._policies(self.config.tenants), tenant_hint)
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
        for key, refs in per_policy.items():
            self.submit(by_key[key], refs, source="reconcile")
            counts["jobs"] += 1
            counts["queued"] += len(refs)
        return counts

    def _requeue(self, rec: Enrolment, now: int) -> bool:
        """Send a due retry to the job it belongs to; the record is marked (ETag-guarded) so the next
        tick does not send it again while the message waits."""
        job = self.jobs.get_head(rec.tenant_id, rec.job_id or "")
        item = self.jobs.get_item(rec.tenant_id, job.job_id, rec.vm_id) if job is not None else None
        if job is None or item is None or item.state in TERMINAL:
            return False
        try:
            self.store.update(replace(rec, next_attempt_at=now + self.config.lease_seconds), rec.etag or "")
        except (Conflict, NotFound):
            return True  # someone else is on it
        self.queue.send(self._message(job, item.vm_id, retry=True))
        return True


def _parse_message(body: str | bytes) -> dict | None:
    try:
        msg = json.loads(body.decode() if isinstance(body, bytes) else body)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(msg, dict) or msg.get("v") != 1:
        return None
    if not all(isinstance(msg.get(k), str) and msg.get(k) for k in ("tenant", "job", "policy", "vm")):
        return None
    return msg


def _tag(tags: dict[str, str], name: str) -> str | None:
    """Tag names are case-insensitive in Azure."""
    for k, v in tags.items():
        if k.lower() == name.lower():
            return v
    return None
