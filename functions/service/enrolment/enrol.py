"""Enrolment by hand (the API and the CLI): check the request, find the VMs it names, queue a job;
read a job, list a policy's records."""

from __future__ import annotations

import re
from typing import Any

from ...core.errors import BackendUnavailable, EzsshError, Forbidden, InvalidRequest, NotFound
from ...core.paging import decode_token, encode_token
from ...core.policy import Identity, Policy
from ...hosts.azure_vms import PushError, Vm, VmRef, in_scope, parse_resource_group, parse_vm_id
from ...storage.enrolmentjobs import Job, JobItem, job_dict
from ...storage.enrolments import Enrolment, vm_key
from .base import _tag
from .outbox import Outbox

MAX_LIST_LIMIT = 1000
VM_KEY_RE = re.compile(r"^[0-9a-f]{32}$")


ENROL_REFUSED = "enrolment.refused"


class EnrolmentForbidden(Forbidden):
    code = "outside_enrolment_scopes"


class ArmForbidden(Forbidden):
    code = "arm_forbidden"


class Enrol(Outbox):
    def _check_scopes(self, resource_id: str, tenant_id: str) -> None:
        scopes = self.config.scopes_for(tenant_id)
        if not scopes:
            raise EnrolmentForbidden(
                "Enrolment is not configured for this tenant: EZSSH_ENROL_SCOPES names no "
                "subscription or resource group its policies may push to."
            )
        if not in_scope(resource_id, scopes):
            raise EnrolmentForbidden(
                f"{resource_id} is outside the scopes ezssh may enrol ({', '.join(scopes)}); nothing was pushed."
            )

    def _default_subscription(self, tenant_id: str) -> str | None:
        subs = {s.split("/")[2].lower() for s in self.config.scopes_for(tenant_id)}
        return subs.pop() if len(subs) == 1 else None

    def _targets(
        self, who: Identity, policy_id: str, vm_id: str | None, resource_group: str | None, tag: str | None
    ) -> tuple[Policy, list[VmRef]]:
        """Check the request and find the VMs it names, before anything is pushed."""
        if (vm_id is None) == (resource_group is None):
            raise InvalidRequest("Give either 'vm_id', or 'resource_group' with 'tag'.")
        if vm_id is not None and tag is not None:
            raise InvalidRequest("'tag' goes with 'resource_group', not with 'vm_id'.")
        if resource_group is not None and (
            tag is None
            or tag.count("=") < 1
            or not tag.split("=", 1)[0].strip()
            or not tag.split("=", 1)[1].strip()
            or len(tag) > 600
        ):
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

    def enrol(
        self,
        who: Identity,
        policy_id: str,
        *,
        vm_id: str | None = None,
        resource_group: str | None = None,
        tag: str | None = None,
        api_url: str | None = None,
    ) -> tuple[Job, list[JobItem]]:
        """Queue a push to the VMs named; returns the job at once (the queue worker does the pushing)."""
        with self.base.refusing(
            who,
            ENROL_REFUSED,
            policy_id=policy_id,
            details={
                "vm_id": vm_id[:300] if vm_id is not None else None,
                "resource_group": resource_group[:300] if resource_group else None,
            },
        ):
            policy, refs = self._targets(who, policy_id, vm_id, resource_group, tag)
            if len(refs) > self.config.max_job_vms:
                raise InvalidRequest(
                    f"That names {len(refs)} VMs; one request may enrol at most "
                    f"{self.config.max_job_vms}. Use a narrower tag."
                )
        return self.submit(policy, refs, source="api", who=who, api_url=api_url)

    def job(self, who: Identity, policy_id: str, job_id: str) -> tuple[Job, list[JobItem]]:
        """A job of this policy, for its admins (other tenants' jobs are never found)."""
        with self.base.refusing(who, "enrolment.job.refused", policy_id=policy_id):
            policy = self._admin_policy(who, policy_id)
            found = None
            if self.jobs is not None and len(job_id) == 32 and all(c in "0123456789abcdef" for c in job_id):
                found = self.jobs.get(policy.tenant_id, job_id)
            if found is None or found[0].policy_id != policy.id:
                raise NotFound(f"No enrolment job {job_id[:64]!r} in policy {policy_id!r}.")
        return found

    @staticmethod
    def describe(job: Job, items: list[JobItem]) -> dict[str, Any]:
        """The job as the API shows it."""
        return {"job": job_dict(job, items), "items": [i.to_dict() for i in items]}

    def list(
        self, who: Identity, policy_id: str, *, limit: int = 100, continuation: str | None = None
    ) -> tuple[list[Enrolment], str | None]:
        """One page of the policy's records (in a stable order: the hash of the VM id) and the
        continuation token of the next page (None at the end)."""
        with self.base.refusing(who, "enrolment.list.refused", policy_id=policy_id):
            if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIST_LIMIT:
                raise InvalidRequest(f"limit must be between 1 and {MAX_LIST_LIMIT}.")
            after = decode_token(continuation, VM_KEY_RE)
            policy = self._admin_policy(who, policy_id)
        recs, more = self.store.list_page(policy.tenant_id, policy.id, after=after, limit=limit)
        return recs, encode_token(vm_key(recs[-1].vm_id)) if more and recs else None
