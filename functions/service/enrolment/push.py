"""One push attempt on a VM's record: what a policy wants on its hosts, whether the VM's record
is due, the ETag-guarded claim, the Run Command push and its outcome, each audited."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace

from ...core.audit import AuditEntry
from ...core.errors import Conflict, EzsshError, NotFound
from ...core.policy import Identity, Policy
from ...hosts.azure_vms import PushError, VmRef, wrap_script
from ...storage.enrolments import FAILED, PENDING, RETRYING, SUCCEEDED, Enrolment, tail
from ..hosts import Derived
from .base import EnrolmentBase
from .ports import VmPusher

log = logging.getLogger("ezssh.enrolment")


@dataclass
class _Desired:
    fingerprints: tuple[str, ...]
    krl: Callable[[], Derived]  # the policy's KRL, read on first need only
    render: Callable[..., str]  # render(host_certs="") -> the setup script
    host_certs_due: Callable[[str], bool] = lambda vm_id: False

    @property
    def krl_version(self) -> int:
        return self.krl().version


class Push(EnrolmentBase):
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
                raise PushError(
                    "not_configured",
                    "EZSSH_PUBLIC_URL is not set, so the setup script cannot tell the host where to fetch the KRL.",
                    transient=False,
                )
            if not keys:
                raise PushError("no_ca", f"Policy {policy.id!r} has no CA key to trust.", transient=False)
            return self.hosts.render_setup(policy, url, krl().data, host_certs=host_certs)

        return _Desired(
            tuple(c.fingerprint for c in keys),
            krl,
            render,
            self._all_due(policy) if every_vm else lambda vm_id: self._host_certs_due(policy, vm_id),
        )

    def _host_certs_due(self, policy: Policy, vm_id: str) -> bool:
        return self.host_certs is not None and self.host_certs.due(policy, vm_id)

    def _all_due(self, policy: Policy) -> Callable[[str], bool]:
        due = functools.cache(lambda: self.host_certs.due_vms(policy) if self.host_certs is not None else frozenset())
        return lambda vm_id: vm_id.lower() in due()

    def _host_certs_for(self, policy: Policy, ref: VmRef, vms: VmPusher) -> str:
        return self.host_certs.certs_for(policy, vms, ref) if self.host_certs is not None else ""

    def _audit(
        self, tenant_id: str, who: Identity | None, action: str, outcome: str, rec: Enrolment, **details: object
    ) -> AuditEntry:
        return AuditEntry(
            tenant_id=tenant_id,
            at=self.clock(),
            action=action,
            outcome=outcome,
            actor_oid=who.oid if who else None,
            actor_upn=who.upn if who else None,
            policy_id=rec.policy_id,
            host=rec.vm_id,
            error_code=rec.error_code,
            message=rec.last_error,
            chain=f"enr:{rec.policy_id}",
            details={"state": rec.state, "attempts": rec.attempts, "source": rec.source, **details},
        ).sealed()

    def _backoff(self, attempts: int) -> int:
        return min(self.config.backoff_cap, self.config.backoff_base << max(0, attempts - 1))

    def _due(self, rec: Enrolment, now: int, desired: _Desired, source: str, force: bool) -> bool:
        if rec.lease_until > now:
            return False  # a push is running elsewhere
        if force:
            return True
        if rec.state in (PENDING, RETRYING):
            return rec.next_attempt_at <= now
        if rec.state == SUCCEEDED:
            return (
                rec.ca_fingerprints != desired.fingerprints
                or rec.krl_version != desired.krl_version
                or desired.host_certs_due(rec.vm_id)
            )
        return source == "event"  # failed: a new VM write is a reason to try again

    def record_for(self, policy: Policy, ref: VmRef, source: str, who: Identity | None = None) -> Enrolment:
        """The VM's record for this policy, created as pending if there is none."""
        now = int(self.clock())
        rec = self.store.get(policy.tenant_id, policy.id, ref.id)
        if rec is not None:
            return rec
        new = Enrolment(
            tenant_id=policy.tenant_id,
            policy_id=policy.id,
            vm_id=ref.id,
            state=PENDING,
            created_at=now,
            updated_at=now,
            next_attempt_at=now,
            source=source,
            requested_by=who.upn if who else None,
        )
        try:
            return self.store.create(new)
        except Conflict:
            got = self.store.get(policy.tenant_id, policy.id, ref.id)
            if got is None:  # pragma: no cover - deleted between the two calls
                raise
            return got

    def attempt(
        self,
        policy: Policy,
        ref: VmRef,
        *,
        source: str,
        who: Identity | None = None,
        force: bool = False,
        desired: _Desired | None = None,
        api_url: str | None = None,
    ) -> Enrolment:
        """Push the policy's setup script to one VM if its record says it is due. Returns the record."""
        return self._attempt(policy, ref, source=source, who=who, force=force, desired=desired, api_url=api_url)[0]

    def _attempt(
        self,
        policy: Policy,
        ref: VmRef,
        *,
        source: str,
        who: Identity | None = None,
        force: bool = False,
        desired: _Desired | None = None,
        api_url: str | None = None,
        job_id: str | None = None,
    ) -> tuple[Enrolment, str]:
        """(the record, what happened: ran | busy (another push holds the lease) | not_due)."""
        desired = desired or self._desired(policy, api_url)
        rec = self.record_for(policy, ref, source, who)
        now = int(self.clock())
        if rec.lease_until > now:
            return rec, "busy"
        if not self._due(rec, now, desired, source, force):
            return rec, "not_due"
        claimed = replace(
            rec,
            state=PENDING,
            lease_until=now + self.config.lease_seconds,
            updated_at=now,
            source=source,
            requested_by=who.upn if who else rec.requested_by,
            job_id=job_id or rec.job_id,
        )
        attempts = rec.attempts + 1 if rec.state in (PENDING, RETRYING) else 1
        started = self._audit(
            policy.tenant_id,
            who,
            "enrolment.push_started",
            "ok",
            claimed,
            attempt=attempts,
            job_id=job_id,
            ca_fingerprints=list(desired.fingerprints),
            krl_version=desired.krl_version,
        )
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
            details = {"exit_status": result.exit_status, "duration_ms": result.duration_ms, "lro_polls": result.polls}
            out = result.output + (f"\n[stderr]\n{result.stderr}" if result.stderr else "")
            base = replace(
                claimed,
                attempts=attempts,
                output_tail=tail(out),
                lease_until=0,
                updated_at=int(self.clock()),
                duration_ms=result.duration_ms,
                lro_polls=result.polls,
                next_attempt_at=0,
            )
            if result.ok:
                final = replace(
                    base,
                    state=SUCCEEDED,
                    last_error=None,
                    error_code=None,
                    ca_fingerprints=desired.fingerprints,
                    krl_version=desired.krl_version,
                )
            else:
                why = (
                    f"The setup script exited with status {result.exit_status}"
                    if result.exit_status is not None
                    else "The setup script's exit status is missing from Run Command's output"
                )
                final = replace(
                    base,
                    state=FAILED,
                    error_code="script_failed",
                    last_error=f"{why} on {ref.name}; nothing was changed there unless the output says "
                    "otherwise. See output_tail.",
                )
        except PushError as exc:
            final = self._after_error(claimed, attempts, exc)
        except EzsshError as exc:  # rendering refused a value, storage, ...
            final = self._after_error(claimed, attempts, PushError(exc.code, exc.message, transient=exc.status >= 500))
        except ValueError as exc:  # RenderError
            final = self._after_error(claimed, attempts, PushError("render_failed", str(exc), transient=False))
        action = {SUCCEEDED: "enrolment.pushed", RETRYING: "enrolment.retrying"}.get(final.state, "enrolment.failed")
        entry = self._audit(
            policy.tenant_id,
            who,
            action,
            "ok" if final.state == SUCCEEDED else "error",
            final,
            ca_fingerprints=list(desired.fingerprints),
            krl_version=desired.krl_version,
            **details,
        )
        try:
            final = self.store.update(final, claimed.etag or "", entry)  # the outcome and its audit, together
        except (Conflict, NotFound):  # pragma: no cover - someone broke our lease
            log.warning(
                "enrolment of %s in %s changed during the push; outcome %s not saved", ref.id, policy.id, final.state
            )
        log.info(
            "enrolment %s -> %s: %s (attempt %d)%s",
            policy.id,
            ref.id,
            final.state,
            final.attempts,
            f" {final.error_code}: {final.last_error}" if final.error_code else "",
        )
        return final, "ran"

    def _after_error(self, rec: Enrolment, attempts: int, exc: PushError) -> Enrolment:
        now = int(self.clock())
        base = replace(rec, attempts=attempts, lease_until=0, updated_at=now, error_code=exc.code)
        if exc.transient and attempts < self.config.max_attempts:
            wait = self._backoff(attempts)
            return replace(
                base,
                state=RETRYING,
                next_attempt_at=now + wait,
                last_error=f"{exc.message} (attempt {attempts} of {self.config.max_attempts}; next in {wait} s)",
            )
        if exc.transient:
            return replace(
                base, state=FAILED, next_attempt_at=0, last_error=f"Gave up after {attempts} attempts: {exc.message}"
            )
        return replace(base, state=FAILED, next_attempt_at=0, last_error=exc.message)
