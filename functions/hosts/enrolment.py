"""Enrolment: push a policy's host setup script to Azure VMs, by hand, on VM events, and by reconcile.

Use cases (EnrolmentService):
  enrol(who, policy, vm_id=... | resource_group=..., tag="k=v")   POST /api/policies/{id}/enrolments
  list(who, policy)                                                 GET  /api/policies/{id}/enrolments
  handle_event(event)        Event Grid: Microsoft.Resources.ResourceWriteSuccess for a VM write
  reconcile()                timer: due retries, VMs in scope not yet enrolled, re-push after a CA
                             rotation or a revocation (pushed CA fingerprints / KRL version differ)

A VM is covered by a policy (for events and reconcile) when its tag `ezssh-policy` names the policy
(`<policy id>` or `<tenant id>/<policy id>`; several separated by commas), or when one of the
policy's host patterns is a resource id (the VM or its resource group) or a `tag:name=value` that the
VM carries. Name globs and CIDRs never enrol anything on their own.

Each push is one attempt on an enrolment record (storage/enrolments.py): the record is claimed with
an ETag-guarded update (state pending, a lease), the script runs through Run Command, and the
outcome is written back: succeeded (with the CA fingerprints and KRL version pushed), retrying (a
transient failure: agent not ready, throttling, ARM unavailable; next attempt after an exponential
backoff), or failed (VM gone, permission missing, the script exited non-zero, or too many attempts).
Only VMs inside the configured scopes (EZSSH_ENROL_SCOPES) are ever touched.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable

from ..core.audit import AuditEntry
from ..core.errors import BackendUnavailable, Conflict, EzsshError, Forbidden, InvalidRequest, NotFound
from ..core.policy import Identity, Policy
from ..storage.enrolments import FAILED, PENDING, RETRYING, SUCCEEDED, Enrolment, EnrolmentStore, tail
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
    lease_seconds: int = 1200  # a push not finished by then is considered dead
    concurrency: int = 8
    sync_limit: int = 20  # the API pushes at most this many VMs itself; the rest wait for the timer

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
    krl_version: int
    render: Callable[[], str]


class EnrolmentService:
    def __init__(self, hosts: Any, store: EnrolmentStore, vms: AzureVms | Callable[[], AzureVms],
                 config: EnrolConfig, clock: Callable[[], float] = time.time) -> None:
        self.hosts = hosts  # functions.service.hosts.Hosts: policies, KRL, host tokens, audit
        self.store = store
        self._vms = vms
        self.config = config
        self.clock = clock

    @property
    def vms(self) -> AzureVms:
        if not isinstance(self._vms, AzureVms):
            self._vms = self._vms()  # built on first use (the compute client is lazy)
        return self._vms

    # ---- what a policy wants on its hosts --------------------------------------------------
    def _desired(self, policy: Policy, api_url: str | None = None) -> _Desired:
        from ..core.krl import krl_version_of

        keys = list(policy.trusted_ca)
        krl = self.hosts.build_krl(policy)

        def render() -> str:
            url = self.config.public_url or api_url
            if not url:
                raise PushError("not_configured", "EZSSH_PUBLIC_URL is not set, so the setup script cannot tell the "
                                                  "host where to fetch the KRL.", transient=False)
            if not keys:
                raise PushError("no_ca", f"Policy {policy.id!r} has no CA key to trust.", transient=False)
            return self.hosts.render_setup(policy, url, krl)

        return _Desired(tuple(c.fingerprint for c in keys), krl_version_of(krl), render)

    # ---- audit -------------------------------------------------------------------------------
    def _audit(self, tenant_id: str, who: Identity | None, action: str, outcome: str, rec: Enrolment,
               **details: object) -> None:
        entry = AuditEntry(tenant_id=tenant_id, at=self.clock(), action=action, outcome=outcome,
                           actor_oid=who.oid if who else None, actor_upn=who.upn if who else None,
                           policy_id=rec.policy_id, host=rec.vm_id, error_code=rec.error_code,
                           message=rec.last_error, chain=f"enr:{rec.policy_id}",
                           details={"state": rec.state, "attempts": rec.attempts, "source": rec.source,
                                    **details}).sealed()
        try:
            self.hosts.record(entry)
        except Exception:  # noqa: BLE001 - the record holds the outcome; the log says the audit failed
            log.exception("could not audit %s for %s", action, rec.vm_id)

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
            return rec.ca_fingerprints != desired.fingerprints or rec.krl_version != desired.krl_version
        return source == "event"  # failed: a new VM write is a reason to try again

    def queue(self, policy: Policy, ref: VmRef, source: str, who: Identity | None = None) -> Enrolment:
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
        desired = desired or self._desired(policy, api_url)
        rec = self.queue(policy, ref, source, who)
        now = int(self.clock())
        if not self._due(rec, now, desired, source, force):
            return rec
        claimed = replace(rec, state=PENDING, lease_until=now + self.config.lease_seconds, updated_at=now,
                          source=source, requested_by=who.upn if who else rec.requested_by)
        try:
            claimed = self.store.update(claimed, rec.etag or "")
        except (Conflict, NotFound):
            log.info("enrolment of %s in %s taken by another worker", ref.id, policy.id)
            return self.store.get(policy.tenant_id, policy.id, ref.id) or rec
        attempts = rec.attempts + 1 if rec.state in (PENDING, RETRYING) else 1
        details: dict[str, object] = {}
        try:
            lines = wrap_script(desired.render())
            result = self.vms.run_shell_script(ref, lines)
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
        try:
            final = self.store.update(final, claimed.etag or "")
        except (Conflict, NotFound):  # pragma: no cover - someone broke our lease
            log.warning("enrolment of %s in %s changed during the push; outcome %s not saved",
                        ref.id, policy.id, final.state)
        action = {SUCCEEDED: "enrolment.pushed", RETRYING: "enrolment.retrying"}.get(final.state, "enrolment.failed")
        self._audit(policy.tenant_id, who, action, "ok" if final.state == SUCCEEDED else "error", final,
                    ca_fingerprints=list(desired.fingerprints), krl_version=desired.krl_version, **details)
        log.info("enrolment %s -> %s: %s (attempt %d)%s", policy.id, ref.id, final.state, final.attempts,
                 f" {final.error_code}: {final.last_error}" if final.error_code else "")
        return final

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
              tag: object = None, api_url: str | None = None) -> list[Enrolment]:
        """Push now to the VMs named (at most `sync_limit`; others stay pending for the timer)."""
        policy, refs = self.resolve_targets(who, policy_id, vm_id=vm_id, resource_group=resource_group, tag=tag)
        if not refs:
            return []
        desired = self._desired(policy, api_url)
        now_refs, later = refs[: self.config.sync_limit], refs[self.config.sync_limit:]
        queued = [self.queue(policy, r, "api", who) for r in later]

        def one(r: VmRef) -> Enrolment:
            return self.attempt(policy, r, source="api", who=who, force=True, desired=desired, api_url=api_url)

        with ThreadPoolExecutor(max_workers=max(1, min(self.config.concurrency, len(now_refs)))) as pool:
            done = list(pool.map(one, now_refs))
        return done + queued

    def list(self, who: Identity, policy_id: str) -> list[Enrolment]:
        try:
            policy = self._admin_policy(who, policy_id)
        except EzsshError as exc:
            self.hosts.refuse(who, exc, "enrolment.list.refused", policy_id=policy_id)
            raise
        return sorted(self.store.list(policy.tenant_id, policy.id), key=lambda e: (e.vm_id.lower()))

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

    def handle_event(self, event_type: str, subject: str | None, data: dict | None) -> list[Enrolment]:
        """One Event Grid event. Anything that is not a successful VM write in scope is ignored."""
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
        return [self.attempt(p, vm.ref, source="event") for p in policies
                if in_scope(ref.id, self.config.scopes_for(p.tenant_id))]

    def reconcile(self) -> dict[str, int]:
        """Due retries, re-pushes after CA/KRL changes, and VMs in scope not enrolled yet."""
        counts = {"vms_seen": 0, "attempted": 0, "succeeded": 0, "retrying": 0, "failed": 0, "scope_errors": 0}
        policies = self._policies(self.config.tenants)
        by_key = {(p.tenant_id, p.id): p for p in policies}
        desired = {k: self._desired(p) for k, p in by_key.items()}
        now = int(self.clock())
        work: dict[tuple[str, str, str], tuple[Policy, VmRef]] = {}
        for (tid, pid), p in by_key.items():
            for rec in self.store.list(tid, pid):
                if not in_scope(rec.vm_id, self.config.scopes_for(tid)):
                    continue
                if self._due(rec, now, desired[(tid, pid)], "reconcile", False):
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
                    if key not in work and self.store.get(p.tenant_id, p.id, vm.id) is None:
                        work[key] = (p, vm.ref)

        def one(item: tuple[Policy, VmRef]) -> Enrolment:
            p, ref = item
            return self.attempt(p, ref, source="reconcile", desired=desired[(p.tenant_id, p.id)])

        if work:
            with ThreadPoolExecutor(max_workers=max(1, min(self.config.concurrency, len(work)))) as pool:
                for rec in pool.map(one, list(work.values())):
                    counts["attempted"] += 1
                    counts[rec.state] = counts.get(rec.state, 0) + 1
        return counts


def _tag(tags: dict[str, str], name: str) -> str | None:
    """Tag names are case-insensitive in Azure."""
    for k, v in tags.items():
        if k.lower() == name.lower():
            return v
    return None
