"""Azure VMs through azure-mgmt-compute: read and list VMs, and run a shell script with Run Command.

    vms = AzureVms(lambda sub: ComputeManagementClient(cred, sub, base_url=..., ...))
    vm = vms.get_vm(parse_vm_id("/subscriptions/.../virtualMachines/web1"))
    result = vms.run_shell_script(vm.ref, script_lines)      # RunShellScript, polls the LRO

ARM failures become PushError with a stable code and one clear sentence:
  404                    vm_not_found       (permanent)
  403                    forbidden          (permanent: the identity lacks a role on the VM)
  409 / agent not ready  agent_not_ready    (transient: retry later)
  429, 5xx, transport    arm_unavailable    (transient)
  LRO Failed/Canceled    operation_failed   (transient: Run Command's own failure)
  LRO too slow           timeout            (transient)
A script that ran and exited non-zero is not an ARM error: RunResult.ok is False and the output says
why. Run Command reports no exit code, so the script is wrapped (`wrap_script`) to print one as its
last stdout line, with stderr folded into stdout so that Run Command's 4,096-byte tail keeps it.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from ..core.errors import InvalidRequest
from ..core.ids import GUID

SUB = GUID
RG = r"[-\w.()]{1,90}"
VM = r"[A-Za-z0-9][-\w.]{0,63}"
VM_ID_RE = re.compile(
    rf"^/subscriptions/({SUB})/resourceGroups/({RG})/providers/Microsoft\.Compute/virtualMachines/({VM})$",
    re.IGNORECASE,
)
RG_ID_RE = re.compile(rf"^/subscriptions/({SUB})/resourceGroups/({RG})$", re.IGNORECASE)
RG_NAME_RE = re.compile(rf"^{RG}$")
EXIT_MARK = "ezssh-exit-status:"
RUN_COMMAND_OUTPUT = 4096


@dataclass(frozen=True)
class VmRef:
    subscription: str
    resource_group: str
    name: str

    @property
    def id(self) -> str:
        return (
            f"/subscriptions/{self.subscription}/resourceGroups/{self.resource_group}"
            f"/providers/Microsoft.Compute/virtualMachines/{self.name}"
        )


def parse_vm_id(raw: object) -> VmRef:
    """A VM resource id, or InvalidRequest naming what is wrong with it."""
    if not isinstance(raw, str) or not raw.strip():
        raise InvalidRequest(
            "'vm_id' must be a VM resource id: /subscriptions/<id>/resourceGroups/<rg>/providers/"
            "Microsoft.Compute/virtualMachines/<name>."
        )
    s = raw.strip().rstrip("/")
    m = VM_ID_RE.match(s)
    if not m or s.endswith("."):
        raise InvalidRequest(
            f"{raw[:300]!r} is not a VM resource id (expected /subscriptions/<guid>/resourceGroups/"
            "<rg>/providers/Microsoft.Compute/virtualMachines/<name>)."
        )
    return VmRef(m.group(1).lower(), m.group(2), m.group(3))


def parse_resource_group(raw: object, default_subscription: str | None) -> tuple[str, str]:
    """(subscription, resource group) from a resource group id, or a bare name plus a default subscription."""
    if not isinstance(raw, str) or not raw.strip():
        raise InvalidRequest("'resource_group' must be a resource group name or id.")
    s = raw.strip().rstrip("/")
    m = RG_ID_RE.match(s)
    if m and not s.endswith("."):
        return m.group(1).lower(), m.group(2)
    if s.startswith("/") or not RG_NAME_RE.match(s) or s.endswith("."):
        raise InvalidRequest(
            f"{raw[:300]!r} is not a resource group name or id (/subscriptions/<guid>/resourceGroups/<name>)."
        )
    if default_subscription is None:
        raise InvalidRequest(
            f"Resource group {s!r} is ambiguous: the enrolment scopes span several subscriptions; "
            "give its id, /subscriptions/<guid>/resourceGroups/<name>."
        )
    return default_subscription, s


def in_scope(resource_id: str, scopes: Iterable[str]) -> bool:
    """Is the resource at or under one of the scopes (case-insensitive, whole path segments)?"""
    rid = resource_id.lower().rstrip("/")
    return any(rid == s.lower() or rid.startswith(s.lower().rstrip("/") + "/") for s in scopes)


@dataclass(frozen=True)
class Vm:
    ref: VmRef
    tags: dict[str, str] = field(default_factory=dict)
    os_type: str | None = None
    location: str | None = None

    @property
    def id(self) -> str:
        return self.ref.id


@dataclass(frozen=True)
class RunResult:
    ok: bool
    exit_status: int | None
    output: str  # stdout (the wrapped script folds stderr into it)
    stderr: str
    message: str  # Run Command's whole message, as it came
    duration_ms: int
    polls: int


class PushError(Exception):
    def __init__(self, code: str, message: str, *, transient: bool, status: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.transient = transient
        self.status = status


_DENIED_ACTION = re.compile(r"authorization to perform action '([^']+)'")  # ARM's AuthorizationFailed wording


def _arm_message(exc: Any) -> str:
    err = getattr(exc, "error", None)
    msg = getattr(err, "message", None) or getattr(exc, "message", None) or str(exc)
    return " ".join(str(msg).split())[:500]


def map_arm_error(exc: Exception, what: str) -> PushError:
    from azure.core.exceptions import HttpResponseError, ServiceRequestError, ServiceResponseError

    if isinstance(exc, PushError):
        return exc
    if isinstance(exc, (ServiceRequestError, ServiceResponseError)):
        return PushError(
            "arm_unavailable",
            f"Azure Resource Manager could not be reached for {what}: {type(exc).__name__}. Retrying later.",
            transient=True,
        )
    if isinstance(exc, HttpResponseError):
        status = exc.status_code
        code = getattr(getattr(exc, "error", None), "code", None) or ""
        detail = _arm_message(exc)
        if status == 404:
            return PushError(
                "vm_not_found",
                f"{what}: the VM was not found (ARM 404 {code}): it was deleted, or the id is wrong.",
                transient=False,
                status=status,
            )
        if status == 403:
            m = _DENIED_ACTION.search(detail)
            needs = (
                f"'{m.group(1)}'"
                if m
                else "the actions of infra/main.bicep's RunCommandOnly role (VM read, Run Command, network reads)"
            )
            return PushError(
                "forbidden",
                f"{what}: ezssh's identity lacks permission (ARM 403 {code}). Grant it "
                f"{needs} on the VM's scope (the RunCommandOnly role of infra/main.bicep "
                f"has every action ezssh uses). ARM said: {detail}",
                transient=False,
                status=status,
            )
        if status == 409:
            return PushError(
                "agent_not_ready",
                f"{what}: the VM is busy or its agent is not ready (ARM 409 {code}): {detail} Retrying later.",
                transient=True,
                status=status,
            )
        if status == 429 or (status is not None and status >= 500):
            return PushError(
                "arm_unavailable",
                f"{what}: Azure Resource Manager answered {status} {code}. Retrying later.",
                transient=True,
                status=status,
            )
        if status is None:  # LRO ended Failed/Canceled
            return PushError("operation_failed", f"{what}: Run Command failed: {detail}", transient=True)
        return PushError("arm_error", f"{what}: ARM answered {status} {code}: {detail}", transient=False, status=status)
    return PushError("arm_error", f"{what}: {type(exc).__name__}: {exc}", transient=True)


def wrap_script(script: str) -> list[str]:
    """RunShellScript lines that run `script` with sh and print its exit status as the last line.

    The script goes to a temporary file through a quoted here-document (nothing in it is expanded),
    and runs with stderr folded into stdout, so the tail Run Command returns ends with the status.
    """
    delim = "EZSSH_RUN_COMMAND_SCRIPT"
    while delim in script:
        delim += "_X"
    body = script if script.endswith("\n") else script + "\n"
    return [
        "#!/bin/sh",
        'f=$(mktemp "${TMPDIR:-/tmp}/ezssh-push.XXXXXX") || exit 1',
        f"cat >\"$f\" <<'{delim}'",
        body + delim,
        'sh "$f" 2>&1; st=$?',
        'rm -f "$f"',
        f'echo "{EXIT_MARK} $st"',
        'exit "$st"',
    ]


def parse_run_output(message: str) -> tuple[str, str]:
    """(stdout, stderr) from a Linux RunShellScript message: 'Enable succeeded: \\n[stdout]\\n…\\n[stderr]\\n…'."""
    out, err = "", ""
    i = message.find("[stdout]\n")
    j = message.find("\n[stderr]\n")
    if i >= 0:
        out = message[i + len("[stdout]\n") : j if j > i else len(message)]
    if j >= 0:
        err = message[j + len("\n[stderr]\n") :]
    elif i < 0:
        out = message
    return out.rstrip("\n"), err.rstrip("\n")


def exit_status_of(stdout: str) -> int | None:
    for line in reversed(stdout.splitlines()):
        if line.startswith(EXIT_MARK):
            try:
                return int(line[len(EXIT_MARK) :].strip())
            except ValueError:
                return None
    return None


class AzureVms:
    """VM reads and Run Command over `client_for(subscription) -> ComputeManagementClient`."""

    # Run Command poll timeout: below host.json functionTimeout (600 s), so a slow Run Command ends
    # the push as a transient "timeout" inside the invocation instead of the host killing it. A push
    # runs up to two Run Commands (host keys, then the setup script): `within` gives them one budget.
    def __init__(
        self, client_for: Callable[[str], Any], *, timeout: float = 480.0, polling_interval: float | None = None
    ) -> None:
        self._client_for = client_for
        self.timeout = timeout
        self.polling_interval = polling_interval
        self.deadline: float | None = None  # time.monotonic() by which every Run Command must be done

    def within(self, seconds: float) -> AzureVms:
        """This client (same compute clients) with one time budget for all Run Commands made through
        it: each waits at most what is left of `seconds`, and none starts once it is spent."""
        import copy

        bounded = copy.copy(self)
        bounded.deadline = time.monotonic() + seconds
        return bounded

    def _vm(self, raw: Any, fallback: VmRef | None = None) -> Vm:
        ref = fallback
        rid = getattr(raw, "id", None)
        if rid:
            try:
                ref = parse_vm_id(rid)
            except InvalidRequest:
                pass
        assert ref is not None, f"VM without a parseable id: {rid!r}"
        props = getattr(raw, "storage_profile", None)
        os_disk = getattr(props, "os_disk", None)
        os_type = getattr(os_disk, "os_type", None)
        return Vm(
            ref=ref,
            tags=dict(getattr(raw, "tags", None) or {}),
            os_type=str(getattr(os_type, "value", os_type)) if os_type else None,
            location=getattr(raw, "location", None),
        )

    def get_vm(self, ref: VmRef) -> Vm:
        try:
            raw = self._client_for(ref.subscription).virtual_machines.get(ref.resource_group, ref.name)
        except Exception as exc:  # mapped to one clear error
            raise map_arm_error(exc, f"VM {ref.id}") from None
        return self._vm(raw, ref)

    def list_vms(self, scope: str) -> list[Vm]:
        """Every VM in a scope: /subscriptions/<id> or /subscriptions/<id>/resourceGroups/<rg>."""
        parts = scope.strip("/").split("/")
        sub = parts[1].lower()
        try:
            ops = self._client_for(sub).virtual_machines
            raws = list(ops.list(parts[3]) if len(parts) >= 4 else ops.list_all())
        except Exception as exc:
            raise map_arm_error(exc, f"listing VMs in {scope}") from None
        out = []
        for raw in raws:
            try:
                out.append(self._vm(raw))
            except AssertionError:
                continue
        return out

    def run_shell_script(self, ref: VmRef, lines: list[str]) -> RunResult:
        """Run `lines` (RunShellScript) on the VM and wait for the operation's result."""
        polls = [0]

        def count(response: Any) -> None:
            if response.http_request.method == "GET":
                polls[0] += 1

        kw: dict[str, Any] = {"raw_response_hook": count}
        if self.polling_interval is not None:
            kw["polling_interval"] = self.polling_interval
        from azure.mgmt.compute.models import RunCommandInput

        started = time.monotonic()
        what = f"Run Command on {ref.id}"
        wait = self.timeout if self.deadline is None else min(self.timeout, self.deadline - started)
        if wait <= 0:
            raise PushError(
                "timeout",
                f"{what} not started: this push's time for Run Commands is spent. Retrying later.",
                transient=True,
            )
        try:
            poller = self._client_for(ref.subscription).virtual_machines.begin_run_command(
                ref.resource_group, ref.name, RunCommandInput(command_id="RunShellScript", script=lines), **kw
            )
            result = poller.result(timeout=wait)
            if not poller.done():
                raise PushError(
                    "timeout",
                    f"{what} did not finish within {wait:.0f} s; it may still "
                    "run. Retrying later (the setup script is idempotent).",
                    transient=True,
                )
        except Exception as exc:
            raise map_arm_error(exc, what) from None
        took = int((time.monotonic() - started) * 1000)
        values = list(getattr(result, "value", None) or [])
        message = "\n".join(str(getattr(v, "message", "") or "") for v in values)
        codes = [str(getattr(v, "code", "") or "") for v in values]
        out, err = parse_run_output(message)
        status = exit_status_of(out)
        failed_code = any("failed" in c.lower() for c in codes) or message.startswith("Enable failed")
        ok = status == 0 and not failed_code
        return RunResult(
            ok=ok, exit_status=status, output=out, stderr=err, message=message, duration_ms=took, polls=polls[0]
        )

    # ---- names (host certificates) -----------------------------------------------------------
    NETWORK_API = "2024-05-01"

    def _arm_get(self, subscription: str, resource_id: str, what: str) -> dict:
        """GET one ARM resource through the compute client's pipeline (same credential and TLS)."""
        from azure.core.exceptions import HttpResponseError
        from azure.core.rest import HttpRequest

        try:
            resp = self._client_for(subscription).send_request(
                HttpRequest("GET", f"{resource_id}?api-version={self.NETWORK_API}")
            )
            if resp.status_code != 200:
                raise HttpResponseError(response=resp)
            return resp.json()
        except Exception as exc:  # mapped to one clear error
            raise map_arm_error(exc, what) from None

    def vm_names(self, ref: VmRef) -> list[str]:
        """The names ARM knows a VM by: its name and computer name, the private and public IP
        addresses of its network interfaces, and the DNS name of each public IP (lower-cased, in
        that order, without repeats)."""
        try:
            raw = self._client_for(ref.subscription).virtual_machines.get(ref.resource_group, ref.name)
        except Exception as exc:
            raise map_arm_error(exc, f"VM {ref.id}") from None
        names = [ref.name, getattr(getattr(raw, "os_profile", None), "computer_name", None)]
        nics = getattr(getattr(raw, "network_profile", None), "network_interfaces", None) or []
        for nic_ref in nics:
            nic_id = getattr(nic_ref, "id", None)
            if not nic_id:
                continue
            nic = self._arm_get(ref.subscription, nic_id, f"network interface of {ref.id}")
            for ipc in (nic.get("properties") or {}).get("ipConfigurations") or []:
                props = ipc.get("properties") or {}
                names.append(props.get("privateIPAddress"))
                pip_id = (props.get("publicIPAddress") or {}).get("id")
                if pip_id:
                    pip = self._arm_get(ref.subscription, pip_id, f"public IP of {ref.id}").get("properties") or {}
                    names.append(pip.get("ipAddress"))
                    names.append((pip.get("dnsSettings") or {}).get("fqdn"))
        return list(dict.fromkeys(n.strip().lower().rstrip(".") for n in names if isinstance(n, str) and n.strip()))
