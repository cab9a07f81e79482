"""What enrolment's use cases share: their ports, the policies they act on, and the VM tag lookup.
One push attempt on a VM's record is push.py's (Push); a job's creation with its queue messages
(the outbox) is outbox.py's (Outbox)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from ...core.errors import BackendUnavailable, Forbidden
from ...core.policy import Identity, Policy
from ...storage.enrolmentjobs import JobStore
from ...storage.enrolments import EnrolmentStore
from ..base import Base
from ..hosts import Hosts
from .ports import EnrolConfig, JobQueue, VmHostCerts, VmPusher


class EnrolmentBase:
    def __init__(
        self,
        base: Base,
        hosts: Hosts,
        store: EnrolmentStore,
        vms: Callable[[], VmPusher],
        config: EnrolConfig,
        clock: Callable[[], float] = time.time,
        *,
        jobs: JobStore | None = None,
        queue: JobQueue | None = None,
        host_certs: VmHostCerts | None = None,
    ) -> None:
        self.base = base  # refusals and audit (service/base.py)
        self.hosts = hosts  # policies, KRL, the setup script (service/hosts.py)
        self.store = store
        self.jobs = jobs  # job rows (storage/enrolmentjobs.py)
        self.queue = queue  # one message per VM of a job
        self._make_vms = vms  # called on first use (the compute client is lazy)
        self._vms: VmPusher | None = None
        self.config = config
        self.clock = clock
        self.host_certs = host_certs  # None: host keys left alone

    @property
    def job_store(self) -> JobStore:
        """The job rows; only asked for where a job queue is configured (jobs exist only then)."""
        if self.jobs is None:
            raise BackendUnavailable("Enrolment jobs are not available in this deployment (no job queue).")
        return self.jobs

    @property
    def job_queue(self) -> JobQueue:
        if self.queue is None:
            raise BackendUnavailable("Enrolment jobs are not available in this deployment (no job queue).")
        return self.queue

    @property
    def vms(self) -> VmPusher:
        if self._vms is None:
            self._vms = self._make_vms()
        return self._vms

    def _admin_policy(self, who: Identity, policy_id: str) -> Policy:
        policy = self.hosts.policy(who, policy_id)  # NotFound for other tenants and invisible ones
        if not policy.is_admin(who):
            raise Forbidden(f"Only tenant admins and admins of policy {policy_id!r} may enrol hosts in it.")
        return policy

    def _policies(self, tenant_ids: Iterable[str], *, cached: bool = False) -> list[Policy]:
        out = []
        for tid in tenant_ids:
            out += self.hosts.policies_with_ca(tid, cached=cached)
        return out


def _tag(tags: dict[str, str], name: str) -> str | None:
    """Tag names are case-insensitive in Azure."""
    for k, v in tags.items():
        if k.lower() == name.lower():
            return v
    return None
