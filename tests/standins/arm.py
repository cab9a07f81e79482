"""An HTTPS stand-in of ARM compute (VMs and Run Command) for the real azure-mgmt-compute client.

    arm = ArmStandIn().start()                   # https://127.0.0.1:<free port>, TLS leaf from trustme
    vm_id = arm.add_vm("rg1", "web1", tags={"ezssh-policy": "demo"}, root=sandbox_root,
                       env={"EZSSH_SSHD_RELOAD": "kill -HUP <pid>"})
    client = ComputeManagementClient(StaticTokenCredential(arm.token), arm.subscription,
                                     base_url=arm.url, connection_verify=arm.ca_path, polling_interval=0)
    client.virtual_machines.begin_run_command("rg1", "web1", {"command_id": "RunShellScript",
                                                              "script": [...]}).result()
    arm.stop()

What it speaks (/work/shared/reference/AZURE-REST.md section 2):
- `GET .../resourceGroups/{rg}/providers/Microsoft.Compute/virtualMachines/{vm}` (VM JSON with tags),
  `GET .../resourceGroups/{rg}/providers/Microsoft.Compute/virtualMachines` and
  `GET /subscriptions/{sub}/providers/Microsoft.Compute/virtualMachines` (lists, paged by `page_size`
  with an absolute `nextLink`). Names and resource groups match case-insensitively, as in Azure.
- `POST .../virtualMachines/{vm}/runCommand` -> 202, empty body, `Azure-AsyncOperation` and
  `Location` (`&monitor=true`) on `/subscriptions/{sub}/providers/Microsoft.Compute/locations/
  {region}/operations/{id}`; no `Retry-After`, so `polling_interval=0` polls at once.
- `GET` on the operation: `{"status": "InProgress"}` while the script runs (and for at least
  `in_progress_polls` polls), then `{"status": "Succeeded", "startTime", "endTime"}`; on the
  `monitor=true` URL: 202 while running, then 200 with the RunCommandResult
  `{"value": [{"code": "ProvisioningState/succeeded", "level": "Info", "displayStatus": ...,
  "message": "Enable succeeded: \\n[stdout]\\n<out>\\n[stderr]\\n<err>"}]}`, each section cut to its last
  4,096 bytes as Run Command does.
- The script REALLY RUNS: the `script` lines, joined with newlines, are written to a file and run
  with `sh` in a worker thread, with the VM's `env` plus `EZSSH_ROOT=<the VM's root>`, so a setup
  script writes into that VM's sandbox root and reloads its sandbox sshd.
- Errors in ARM's body shape `{"error": {"code", "message"}}`: 401 without the bearer token, 404
  ResourceNotFound for an unknown VM, 403 AuthorizationFailed for a VM `forbid()`den, 409 Conflict
  while the VM agent is "not ready" (`agent_not_ready(vm_id, times=N)`: the first N runCommand
  POSTs).

- Names of a VM (host certificates): a VM added with `private_ip=` (and `public_ip=`, `dns_label=`,
  `computer_name=`) has `properties.osProfile.computerName` and `properties.networkProfile.
  networkInterfaces[].id`; `GET .../providers/Microsoft.Network/networkInterfaces/{vm}-nic` answers
  `properties.ipConfigurations[].properties.{privateIPAddress, publicIPAddress.id}` and `GET
  .../providers/Microsoft.Network/publicIPAddresses/{vm}-ip` answers `properties.{ipAddress,
  dnsSettings.{domainNameLabel, fqdn}}`, the shapes of the public REST reference (learn.microsoft.com
  /rest/api/virtualnetwork/network-interfaces/get and /public-ip-addresses/get), read by the service
  with the compute client's `send_request`.

Not verified against the real service (AZURE-REST.md section 7), so tests must not lean on it: the
409 code and wording for an agent that is not ready; whether a non-zero exit reads "Enable failed"
(modelled here as `Enable failed: ... exit status=N` with code ProvisioningState/failed, the LRO
itself Succeeded); whether real 202s carry both headers.

Role-based access: with `.granted` set to a role's actions (wildcards as in Azure RBAC), every request
whose action (`arm_action`: the provider namespace, the resource types of the path, and read for a GET,
write for PUT/PATCH, delete, or `<name>/action` for a POST) the role lacks gets ARM's 403
AuthorizationFailed naming that action. `.granted = None` (the default) grants everything.

Test knobs and figures: `.granted`, `.requests` (method, path, query), `.runs` (one RunRecord per script run),
`agent_not_ready()`, `forbid()`, `remove_vm()`, `set_tags()`, `in_progress_polls`, `page_size`,
`run_delay` (seconds a run takes at least), `latency` (seconds added to every answer, as a real
region's round trip would: ARM answers in tens of milliseconds).
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import parse_qs, unquote, urlsplit

from .keyvault import StaticTokenCredential  # noqa: F401 - re-exported for ARM tests
from .tls import TlsStandIn

SUBSCRIPTION = "0b1f6471-1bf0-4dda-aec3-cb9272f09590"
REGION = "westeurope"
OUTPUT_LIMIT = 4096


def arm_action(method: str, path: str) -> str:
    """The Azure RBAC action a management request needs, from its path: the provider namespace, then
    each resource type of the path (every other segment after the namespace), then read (GET), write
    (PUT, PATCH), delete (DELETE), or, for a POST, the trailing segment and `action`:
    GET .../providers/Microsoft.Compute/virtualMachines/vm1 -> Microsoft.Compute/virtualMachines/read,
    POST .../virtualMachines/vm1/runCommand -> Microsoft.Compute/virtualMachines/runCommand/action,
    GET /subscriptions/s/resourceGroups/rg -> Microsoft.Resources/subscriptions/resourceGroups/read."""
    segs = [unquote(x) for x in path.split("?")[0].strip("/").split("/")]
    low = [x.lower() for x in segs]
    if "providers" in low:
        i = len(low) - 1 - low[::-1].index("providers")
        namespace, rest = segs[i + 1], segs[i + 2:]
    else:  # subscriptions/{s}[/resourceGroups/{rg}]
        namespace, rest = "Microsoft.Resources", segs
    verb = {"GET": "read", "PUT": "write", "PATCH": "write", "DELETE": "delete"}.get(method.upper())
    if verb is None:  # POST: the last segment names the action, on the resource before it
        types = rest[:-1][0::2]
        return "/".join([namespace, *types, rest[-1], "action"])
    return "/".join([namespace, *rest[0::2], verb])


def grants(actions: list[str], action: str) -> bool:
    """Whether a role with these actions (`*` wildcards, case-insensitive as in Azure RBAC) allows `action`."""
    import fnmatch

    return any(fnmatch.fnmatchcase(action.lower(), a.lower()) for a in actions)


class Request(NamedTuple):
    method: str
    path: str
    query: str


@dataclass
class StandInVm:
    subscription: str
    resource_group: str
    name: str
    tags: dict[str, str]
    root: Path | None
    env: dict[str, str]
    vm_uuid: str = field(default_factory=lambda: secrets.token_hex(16))
    not_ready: int = 0
    forbidden: str = ""  # "" | "all" (read and Run Command) | "run" (Run Command only)
    private_ip: str | None = None
    public_ip: str | None = None
    dns_label: str | None = None
    computer_name: str | None = None

    @property
    def rg_id(self) -> str:
        return f"/subscriptions/{self.subscription}/resourceGroups/{self.resource_group}"

    @property
    def nic_id(self) -> str:
        return f"{self.rg_id}/providers/Microsoft.Network/networkInterfaces/{self.name}-nic"

    @property
    def pip_id(self) -> str:
        return f"{self.rg_id}/providers/Microsoft.Network/publicIPAddresses/{self.name}-ip"

    @property
    def fqdn(self) -> str | None:
        return f"{self.dns_label}.{REGION}.cloudapp.azure.com" if self.dns_label else None

    def nic_json(self) -> dict:
        props: dict = {"privateIPAddress": self.private_ip, "privateIPAllocationMethod": "Dynamic",
                       "privateIPAddressVersion": "IPv4", "primary": True,
                       "subnet": {"id": f"{self.rg_id}/providers/Microsoft.Network/virtualNetworks/vnet/subnets/default"}}
        if self.public_ip:
            props["publicIPAddress"] = {"id": self.pip_id}
        return {"name": f"{self.name}-nic", "id": self.nic_id, "type": "Microsoft.Network/networkInterfaces",
                "location": REGION,
                "properties": {"provisioningState": "Succeeded", "primary": True, "virtualMachine": {"id": self.id},
                               "ipConfigurations": [{"name": "ipconfig1", "id": f"{self.nic_id}/ipConfigurations/ipconfig1",
                                                     "properties": props}]}}

    def pip_json(self) -> dict:
        props: dict = {"provisioningState": "Succeeded", "ipAddress": self.public_ip, "publicIPAddressVersion": "IPv4",
                       "publicIPAllocationMethod": "Static",
                       "ipConfiguration": {"id": f"{self.nic_id}/ipConfigurations/ipconfig1"}}
        if self.dns_label:
            props["dnsSettings"] = {"domainNameLabel": self.dns_label, "fqdn": self.fqdn}
        return {"name": f"{self.name}-ip", "id": self.pip_id, "type": "Microsoft.Network/publicIPAddresses",
                "location": REGION, "sku": {"name": "Standard", "tier": "Regional"}, "properties": props}

    @property
    def id(self) -> str:
        return (f"/subscriptions/{self.subscription}/resourceGroups/{self.resource_group}"
                f"/providers/Microsoft.Compute/virtualMachines/{self.name}")

    def to_json(self) -> dict:
        u = self.vm_uuid
        return {
            "name": self.name, "id": self.id, "type": "Microsoft.Compute/virtualMachines", "location": REGION,
            "tags": dict(self.tags),
            "properties": {
                "vmId": f"{u[:8]}-{u[8:12]}-{u[12:16]}-{u[16:20]}-{u[20:32]}", "provisioningState": "Succeeded",
                "hardwareProfile": {"vmSize": "Standard_B2s"},
                "storageProfile": {"osDisk": {"osType": "Linux", "name": f"{self.name}-osdisk",
                                              "createOption": "FromImage"}},
                **({"osProfile": {"computerName": self.computer_name or self.name, "adminUsername": "azureuser",
                                  "linuxConfiguration": {"disablePasswordAuthentication": True}},
                    "networkProfile": {"networkInterfaces": [{"id": self.nic_id, "properties": {"primary": True}}]}}
                   if self.private_ip else {}),
            },
        }


@dataclass
class RunRecord:
    vm_id: str
    script: str
    started: float
    ended: float | None = None
    exit_status: int | None = None
    stdout: str = ""
    stderr: str = ""
    polls: int = 0  # operation-status GETs answered for this run

    @property
    def done(self) -> bool:
        return self.ended is not None


class ArmStandIn(TlsStandIn):
    """A threaded HTTPS server on 127.0.0.1 that answers like ARM's compute VM and Run Command APIs."""

    def __init__(self, token: str = "standin-arm-token", subscription: str = SUBSCRIPTION) -> None:
        self.token = token
        self.subscription = subscription
        self.requests: list[Request] = []
        self.granted: list[str] | None = None  # RBAC actions of the caller's role; None: everything
        self.runs: list[RunRecord] = []
        self.in_progress_polls = 1
        self.page_size = 100
        self.run_delay = 0.0
        self.latency = 0.0
        self._vms: dict[tuple[str, str, str], StandInVm] = {}
        self._ops: dict[str, RunRecord] = {}
        self._lock = threading.RLock()
        super().__init__()

    # ---- lifecycle --------------------------------------------------------------------------
    name = "arm-standin"

    def start(self) -> "ArmStandIn":
        self.handler = _Handler
        return super().start()

    def stop(self) -> None:
        self._stop_server()
        with self._lock:
            pending = [r for r in self._ops.values() if not r.done]
        deadline = time.time() + 30
        while pending and time.time() < deadline and not all(r.done for r in pending):
            time.sleep(0.05)
        self._remove_files()

    def __enter__(self) -> "ArmStandIn":
        return self.start() if self._server is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- VMs and knobs ----------------------------------------------------------------------
    @staticmethod
    def _key(sub: str, rg: str, name: str) -> tuple[str, str, str]:
        return sub.lower(), rg.lower(), name.lower()

    def add_vm(self, resource_group: str, name: str, *, tags: dict[str, str] | None = None,
               root: Path | None = None, env: dict[str, str] | None = None,
               subscription: str | None = None, private_ip: str | None = None, public_ip: str | None = None,
               dns_label: str | None = None, computer_name: str | None = None) -> str:
        vm = StandInVm(subscription or self.subscription, resource_group, name, dict(tags or {}),
                       Path(root) if root else None, dict(env or {}), private_ip=private_ip, public_ip=public_ip,
                       dns_label=dns_label, computer_name=computer_name)
        with self._lock:
            self._vms[self._key(vm.subscription, resource_group, name)] = vm
        return vm.id

    def vm(self, vm_id: str) -> StandInVm:
        p = vm_id.strip("/").split("/")
        with self._lock:
            return self._vms[self._key(p[1], p[3], p[7])]

    def set_tags(self, vm_id: str, tags: dict[str, str]) -> None:
        self.vm(vm_id).tags = dict(tags)

    def agent_not_ready(self, vm_id: str, times: int) -> None:
        """The next `times` runCommand POSTs for this VM get 409 (the VM agent is not ready)."""
        self.vm(vm_id).not_ready = times

    def forbid(self, vm_id: str, forbidden: bool = True, *, run_only: bool = False) -> None:
        """GET and runCommand on this VM (only runCommand with run_only) get 403 AuthorizationFailed."""
        self.vm(vm_id).forbidden = ("run" if run_only else "all") if forbidden else ""

    def remove_vm(self, vm_id: str) -> None:
        p = vm_id.strip("/").split("/")
        with self._lock:
            self._vms.pop(self._key(p[1], p[3], p[7]), None)

    def runs_on(self, vm_id: str) -> list[RunRecord]:
        return [r for r in self.runs if r.vm_id.lower() == vm_id.lower()]

    def wait_idle(self, timeout: float = 60) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            with self._lock:
                if all(r.done for r in self.runs):
                    return
            time.sleep(0.05)
        raise AssertionError("a Run Command script is still running")

    # ---- execution ----------------------------------------------------------------------------
    def _execute(self, vm: StandInVm, rec: RunRecord) -> None:
        started = time.time()
        workdir = Path(tempfile.mkdtemp(prefix="runcommand-", dir=self._dir))
        script = workdir / "script.sh"
        script.write_text(rec.script)
        env = {k: v for k, v in os.environ.items() if not k.startswith("EZSSH_")}
        env.update({"TMPDIR": str(workdir)})
        if vm.root is not None:
            env["EZSSH_ROOT"] = str(vm.root)
        env.update(vm.env)
        try:
            p = subprocess.run(["sh", str(script)], capture_output=True, text=True, env=env, timeout=600,
                               cwd=str(workdir))
            rec.exit_status, rec.stdout, rec.stderr = p.returncode, p.stdout, p.stderr
        except subprocess.TimeoutExpired as exc:
            rec.exit_status, rec.stdout, rec.stderr = 124, str(exc.stdout or ""), "timed out"
        left = self.run_delay - (time.time() - started)
        if left > 0:
            time.sleep(left)
        rec.ended = time.time()

    # ---- HTTP ---------------------------------------------------------------------------------
    def _error(self, status: int, code: str, message: str) -> tuple[int, dict[str, str], bytes]:
        return status, {"Content-Type": "application/json; charset=utf-8"}, \
            json.dumps({"error": {"code": code, "message": message}}).encode()

    def _json(self, status: int, body: Any, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        return status, {"Content-Type": "application/json; charset=utf-8", **(headers or {})}, json.dumps(body).encode()

    def handle(self, method: str, path: str, query: str, auth: str | None, body: bytes) -> tuple[int, dict, bytes]:
        with self._lock:
            self.requests.append(Request(method, path, query))
        if auth != f"Bearer {self.token}":
            return self._error(401, "AuthenticationFailed", "Authentication failed. The 'Authorization' header is "
                                                            "missing or not a valid bearer token.")
        q = parse_qs(query)
        p = [unquote(x) for x in path.strip("/").split("/")]
        low = [x.lower() for x in p]
        if self.granted is not None and not grants(self.granted, arm_action(method, path)):
            return self._error(403, "AuthorizationFailed",
                               f"The client 'ezssh-standin' with object id '00000000-0000-0000-0000-000000000001' "
                               f"does not have authorization to perform action '{arm_action(method, path)}' over "
                               f"scope '{path}' or the scope is invalid. If access was recently granted, please "
                               "refresh your credentials.")
        # /subscriptions/{sub}/providers/Microsoft.Compute/locations/{region}/operations/{id}
        if method == "GET" and len(p) == 8 and low[0] == "subscriptions" and low[4] == "locations" and low[6] == "operations":
            return self._operation(p[7], monitor=q.get("monitor", ["false"])[0] == "true")
        # /subscriptions/{sub}/providers/Microsoft.Compute/virtualMachines
        if method == "GET" and len(p) == 5 and low[0] == "subscriptions" and low[2:] == ["providers", "microsoft.compute", "virtualmachines"]:
            return self._list(p[1], None, q)
        # .../resourceGroups/{rg}/providers/Microsoft.Network/(networkInterfaces|publicIPAddresses)/{name}
        if method == "GET" and len(p) == 8 and low[0] == "subscriptions" and low[2] == "resourcegroups" \
                and low[4:6] == ["providers", "microsoft.network"] and low[6] in ("networkinterfaces", "publicipaddresses"):
            return self._network(p[1], p[3], low[6], p[7])
        if len(p) >= 7 and low[0] == "subscriptions" and low[2] == "resourcegroups" \
                and low[4:7] == ["providers", "microsoft.compute", "virtualmachines"]:
            sub, rg = p[1], p[3]
            if len(p) == 7 and method == "GET":
                return self._list(sub, rg, q)
            with self._lock:
                vm = self._vms.get(self._key(sub, rg, p[7])) if len(p) >= 8 else None
            if len(p) >= 8 and vm is None:
                return self._error(404, "ResourceNotFound", f"The Resource 'Microsoft.Compute/virtualMachines/{p[7]}' "
                                                            f"under resource group '{rg}' was not found. For more details "
                                                            "please go to https://aka.ms/ARMResourceNotFoundFix")
            if vm is not None and (vm.forbidden == "all" or (vm.forbidden == "run" and len(p) == 9)):
                action = "Microsoft.Compute/virtualMachines/" + ("runCommand/action" if len(p) == 9 else "read")
                return self._error(403, "AuthorizationFailed",
                                   f"The client 'ezssh-standin' with object id '00000000-0000-0000-0000-000000000001' "
                                   f"does not have authorization to perform action '{action}' over scope '{vm.id}' "
                                   "or the scope is invalid. If access was recently granted, please refresh your "
                                   "credentials.")
            if len(p) == 8 and method == "GET" and vm is not None:
                return self._json(200, vm.to_json())
            if len(p) == 9 and low[8] == "runcommand" and method == "POST" and vm is not None:
                return self._run_command(vm, body)
        return self._error(400, "InvalidRequestUri", f"The stand-in does not serve {method} {path}.")

    def _network(self, sub: str, rg: str, kind: str, name: str) -> tuple[int, dict, bytes]:
        with self._lock:
            vms = [v for v in self._vms.values() if v.subscription.lower() == sub.lower()
                   and v.resource_group.lower() == rg.lower() and v.private_ip]
        for v in vms:
            if kind == "networkinterfaces" and name.lower() == f"{v.name}-nic".lower():
                return self._json(200, v.nic_json())
            if kind == "publicipaddresses" and v.public_ip and name.lower() == f"{v.name}-ip".lower():
                return self._json(200, v.pip_json())
        rtype = "networkInterfaces" if kind == "networkinterfaces" else "publicIPAddresses"
        return self._error(404, "ResourceNotFound", f"The Resource 'Microsoft.Network/{rtype}/{name}' under resource "
                                                    f"group '{rg}' was not found. For more details please go to "
                                                    "https://aka.ms/ARMResourceNotFoundFix")

    def _list(self, sub: str, rg: str | None, q: dict) -> tuple[int, dict, bytes]:
        with self._lock:
            vms = [v for v in self._vms.values()
                   if v.subscription.lower() == sub.lower() and (rg is None or v.resource_group.lower() == rg.lower())]
        vms.sort(key=lambda v: v.id.lower())
        skip = int(q.get("$skiptoken", ["0"])[0] or 0)
        page = vms[skip: skip + self.page_size]
        body: dict[str, Any] = {"value": [v.to_json() for v in page]}
        if skip + self.page_size < len(vms):
            base = f"/subscriptions/{sub}" + (f"/resourceGroups/{rg}" if rg else "")
            body["nextLink"] = (f"{self.url}{base}/providers/Microsoft.Compute/virtualMachines"
                                f"?api-version=2026-04-01&$skiptoken={skip + self.page_size}")
        return self._json(200, body)

    def _run_command(self, vm: StandInVm, raw: bytes) -> tuple[int, dict, bytes]:
        try:
            doc = json.loads(raw or b"{}")
        except ValueError:
            return self._error(400, "InvalidRequestContent", "The request content was invalid and could not be "
                                                             "deserialized.")
        if doc.get("commandId") != "RunShellScript" or not isinstance(doc.get("script"), list):
            return self._error(400, "InvalidParameter", "commandId must be RunShellScript with a script array.")
        if vm.not_ready > 0:
            vm.not_ready -= 1
            return self._error(409, "Conflict", "Run command cannot be executed because the VM guest agent is not "
                                                "ready. Retry after the VM agent reports Ready.")
        op_id = secrets.token_hex(16)
        rec = RunRecord(vm_id=vm.id, script="\n".join(str(x) for x in doc["script"]) + "\n", started=time.time())
        with self._lock:
            self._ops[op_id] = rec
            self.runs.append(rec)
        threading.Thread(target=self._execute, args=(vm, rec), daemon=True, name=f"runcommand-{op_id[:6]}").start()
        op = f"{self.url}/subscriptions/{vm.subscription}/providers/Microsoft.Compute/locations/{REGION}/operations/{op_id}"
        return 202, {"Azure-AsyncOperation": f"{op}?p={op_id[:8]}&api-version=2026-04-01",
                     "Location": f"{op}?p={op_id[:8]}&monitor=true&api-version=2026-04-01",
                     "Content-Length": "0"}, b""

    def _operation(self, op_id: str, monitor: bool) -> tuple[int, dict, bytes]:
        with self._lock:
            rec = self._ops.get(op_id)
        if rec is None:
            return self._error(404, "NotFound", f"Operation {op_id} was not found.")
        if not monitor:
            rec.polls += 1
        running = not rec.done or (not monitor and rec.polls <= self.in_progress_polls)
        start = time.strftime("%Y-%m-%dT%H:%M:%S.0000000+00:00", time.gmtime(rec.started))
        if monitor:
            if not rec.done:
                return 202, {"Content-Length": "0"}, b""
            return self._json(200, {"value": [self._status_value(rec)]})
        if running:
            return self._json(200, {"startTime": start, "status": "InProgress", "name": op_id})
        end = time.strftime("%Y-%m-%dT%H:%M:%S.0000000+00:00", time.gmtime(rec.ended or time.time()))
        return self._json(200, {"startTime": start, "endTime": end, "status": "Succeeded", "name": op_id})

    @staticmethod
    def _status_value(rec: RunRecord) -> dict:
        out = rec.stdout.encode()[-OUTPUT_LIMIT:].decode(errors="replace")
        err = rec.stderr.encode()[-OUTPUT_LIMIT:].decode(errors="replace")
        if rec.exit_status == 0:
            return {"code": "ProvisioningState/succeeded", "level": "Info", "displayStatus": "Provisioning succeeded",
                    "message": f"Enable succeeded: \n[stdout]\n{out}\n[stderr]\n{err}"}
        return {"code": "ProvisioningState/failed", "level": "Error", "displayStatus": "Provisioning failed",
                "message": f"Enable failed: failed to execute command: command terminated with exit status="
                           f"{rec.exit_status}\n[stdout]\n{out}\n[stderr]\n{err}"}


class _Handler(BaseHTTPRequestHandler):
    owner: ArmStandIn
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:  # quiet
        pass

    def _serve(self) -> None:
        try:
            u = urlsplit(self.path)
            n = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(n) if n else b""
            if self.owner.latency > 0:
                time.sleep(self.owner.latency)  # this connection's thread only: answers overlap
            status, headers, data = self.owner.handle(self.command, u.path, u.query,
                                                      self.headers.get("Authorization"), body)
            self.send_response(status)
            headers = {"x-ms-request-id": secrets.token_hex(8), **headers}
            if "Content-Length" not in headers:
                headers["Content-Length"] = str(len(data))
            for k, v in headers.items():
                self.send_header(k, v)
            self.end_headers()
            if data:
                self.wfile.write(data)
        except (ssl.SSLError, ConnectionError, socket.timeout):
            self.close_connection = True

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _serve
