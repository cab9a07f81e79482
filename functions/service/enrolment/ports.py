"""What enrolment needs from outside: its settings, and the ports its adapters fill.

VmPusher: Azure's VMs (functions/hosts/azure_vms.py: AzureVms). JobQueue: one message per VM of a job
(functions/storage/queue.py). VmHostCerts: host certificates for a VM's own host keys
(functions/hosts/vm_hostcerts.py), or None to leave host keys alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from ...core.policy import Policy
from ...hosts.azure_vms import RunResult, Vm, VmRef


class VmPusher(Protocol):
    def within(self, seconds: float) -> VmPusher: ...
    def get_vm(self, ref: VmRef) -> Vm: ...
    def list_vms(self, scope: str) -> list[Vm]: ...
    def run_shell_script(self, ref: VmRef, lines: list[str]) -> RunResult: ...
    def vm_names(self, ref: VmRef) -> list[str]: ...


class JobQueue(Protocol):
    def send(self, message: dict[str, Any], *, delay: int = 0) -> None: ...
    def health(self) -> None: ...


class VmHostCerts(Protocol):
    def due(self, policy: Policy, vm_id: str) -> bool: ...
    def due_vms(self, policy: Policy) -> frozenset[str]: ...
    def certs_for(self, policy: Policy, vms: VmPusher, ref: VmRef) -> str: ...


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
