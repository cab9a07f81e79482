"""Host certificates for Azure VMs: the service proves who the VM is through ARM itself.

Its names come from ARM (VM name, computer name, private and public IPs, the public IP's DNS name);
its public host keys are read with Run Command (`sshd -T` names the host keys sshd uses). The
service signs them with the policy's host CA, and the enrolment push renders the certificates into
the setup script, which installs them next to the policy's CA keys. The reconcile timer pushes
again when a VM's certificates are due for renewal.

Names: ARM says which names the VM has, not which names the policy's CA may vouch for. Like any
other names, only those inside the tenant's host namespaces and the policy's name globs and CIDRs go
into the certificate, at the first issuance and at every renewal; the rest are dropped and the drop
audited (none inside: the VM gets no host certificate, and the refusal is audited).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Protocol

from ..core.errors import EzsshError
from ..core.policy import Identity, Policy
from .azure_vms import PushError, RunResult, VmRef, wrap_script


# What this module needs, named here so that it imports nothing above it: the VMs (AzureVms, or the
# service's VmPusher port) and the host-certificate use cases (functions.service.hostcerts.HostCerts).
class VmReader(Protocol):
    def vm_names(self, ref: VmRef) -> list[str]: ...
    def run_shell_script(self, ref: VmRef, lines: list[str]) -> RunResult: ...


class Issued(Protocol):
    def to_text(self) -> str: ...


class HostCertIssuer(Protocol):
    def vm_renewal_due(self, policy: Policy, vm_id: str, *, first: bool = True) -> bool: ...
    def vms_due_for_renewal(self, policy: Policy) -> frozenset[str]: ...
    def issue_for_vm(
        self,
        policy: Policy,
        vm_id: str,
        names: Sequence[str],
        read_keys: Callable[[], Sequence[str]],
        *,
        who: Identity | None = None,
    ) -> Issued: ...


log = logging.getLogger("ezssh.enrolment")

KEY_MARK = "ezssh-host-key"
# Prints one "ezssh-host-key <type> <base64>" line per host key sshd uses. Read-only.
READ_KEYS_SCRIPT = f"""#!/bin/sh
SSHD=$(command -v sshd 2>/dev/null || echo /usr/sbin/sshd)
"$SSHD" -T -f "${{EZSSH_ROOT:-}}/etc/ssh/sshd_config" 2>/dev/null |
    awk 'tolower($1) == "hostkey" {{ print $2 }}' | while IFS= read -r k; do
        [ -f "$k.pub" ] && printf '{KEY_MARK} %s\\n' "$(cut -d' ' -f1,2 "$k.pub")"
    done
exit 0
"""


def parse_keys(output: str) -> list[str]:
    return [line[len(KEY_MARK) + 1 :].strip() for line in output.splitlines() if line.startswith(KEY_MARK + " ")]


class VmHostCerts:
    """What the enrolment service asks about host certificates (functions.service.hostcerts.HostCerts
    does the signing, recording and auditing)."""

    def __init__(self, hostcerts: HostCertIssuer) -> None:
        self.hostcerts = hostcerts

    def due(self, policy: Policy, vm_id: str) -> bool:
        """For the reconcile timer: the VM holds host certificates that are due for renewal. (A VM
        without any gets them at its next push; a VM whose names were refused is not pushed again
        and again for that.)"""
        return self.hostcerts.vm_renewal_due(policy, vm_id, first=False)

    def due_vms(self, policy: Policy) -> frozenset[str]:
        """`due` for every VM of the policy at once (lower-cased VM ids), in one range read."""
        return self.hostcerts.vms_due_for_renewal(policy)

    def certs_for(self, policy: Policy, vms: VmReader, ref: VmRef) -> str:
        """The certificates to render into this VM's setup script ("" to keep what it has)."""
        if not self.hostcerts.vm_renewal_due(policy, ref.id):
            return ""
        names = vms.vm_names(ref)

        def read_keys() -> list[str]:
            result = vms.run_shell_script(ref, wrap_script(READ_KEYS_SCRIPT))
            if not result.ok:
                raise PushError(
                    "host_keys_unread",
                    f"Reading {ref.name}'s host keys failed (exit status {result.exit_status}).",
                    transient=True,
                )
            return parse_keys(result.output)

        try:
            # names that do not fit are refused (and audited) before the VM's host keys are read
            issued = self.hostcerts.issue_for_vm(policy, ref.id, names, read_keys)
        except EzsshError as exc:
            if exc.status >= 500:
                raise
            # refused and audited by the service: the CA push goes on without host certificates
            log.warning("no host certificate for %s in %s: %s", ref.id, policy.id, exc.message)
            return ""
        return issued.to_text()
