"""The default VM role (RunCommandOnly in infra/main.bicep) against the enrolment code's own ARM calls:
every public method of AzureVms (the one module that calls ARM) runs against the ARM stand-in granting
exactly the role's actions; each request's action is derived from its path as Azure RBAC names it.
A role without network reads fails a host-certificate push, and the refusal names the action."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest

from functions.hosts.azure_vms import AzureVms, PushError, parse_vm_id, wrap_script
from functions.wiring import build_compute_client_factory
from tests.deploy import MAIN_BICEP
from tests.standins.arm import StaticTokenCredential, arm_action, grants

SUB = "5d1f0a3e-8c4b-4e57-9a51-0c7f3b2d9e10"
RG = "rg-role"


def role_actions() -> list[str]:
    block = re.search(r"^var runCommandActions = \[(.*?)^\]", MAIN_BICEP.read_text(), re.M | re.S).group(1)
    return re.findall(r"^\s*'([^']+)'", block, re.M)


DRIVERS = {  # every public method of AzureVms, called as the enrolment code calls it
    "get_vm": lambda vms, ref: vms.get_vm(ref),
    "list_vms": lambda vms, ref: (vms.list_vms(f"/subscriptions/{SUB}"),
                                  vms.list_vms(f"/subscriptions/{SUB}/resourceGroups/{RG}")),
    "run_shell_script": lambda vms, ref: vms.run_shell_script(ref, wrap_script("echo pushed")),
    "vm_names": lambda vms, ref: vms.vm_names(ref),
}


@pytest.fixture()
def vms(arm):
    factory = build_compute_client_factory(SimpleNamespace(arm_endpoint=arm.url), StaticTokenCredential(arm.token),
                                           arm.ca_path)
    return AzureVms(factory, polling_interval=0)


@pytest.fixture()
def vm(arm, tmp_path):
    (tmp_path / "root").mkdir()
    vid = arm.add_vm(RG, f"web{len(arm.requests)}", root=tmp_path / "root", private_ip="10.1.0.4",
                     public_ip="20.1.2.3", dns_label="web-role", computer_name="web-role")
    yield parse_vm_id(vid)
    arm.granted = None


def test_the_drivers_are_every_arm_call_of_the_enrolment_code():
    public = {n for n, v in vars(AzureVms).items() if callable(v) and not n.startswith("_")}
    assert public - {"within"} == set(DRIVERS), "a new AzureVms method: add how the enrolment code calls it to DRIVERS"


def test_the_default_vm_role_allows_every_arm_call_the_enrolment_code_makes(arm, vms, vm):
    arm.granted = role_actions()
    first = len(arm.requests)
    for name, drive in DRIVERS.items():
        drive(vms, vm)  # a 403 from the stand-in raises PushError("forbidden") here
    made = {arm_action(r.method, r.path) for r in arm.requests[first:]}
    assert {"Microsoft.Network/networkInterfaces/read", "Microsoft.Network/publicIPAddresses/read",
            "Microsoft.Compute/virtualMachines/runCommand/action"} <= made, made
    assert all(grants(arm.granted, a) for a in made)
    assert "20.1.2.3" in vms.vm_names(vm) and "web-role.westeurope.cloudapp.azure.com" in vms.vm_names(vm)


def test_a_role_without_network_reads_fails_and_the_refusal_names_the_missing_action(arm, vms, vm):
    arm.granted = [a for a in role_actions() if not a.startswith("Microsoft.Network/")]
    with pytest.raises(PushError) as info:
        vms.vm_names(vm)
    assert info.value.code == "forbidden" and not info.value.transient
    assert "Grant it 'Microsoft.Network/networkInterfaces/read' on the VM's scope" in info.value.message


@pytest.mark.parametrize("method, path, action", [
    ("GET", f"/subscriptions/{SUB}/resourceGroups/{RG}/providers/Microsoft.Compute/virtualMachines/v",
     "Microsoft.Compute/virtualMachines/read"),
    ("POST", f"/subscriptions/{SUB}/resourceGroups/{RG}/providers/Microsoft.Compute/virtualMachines/v/runCommand",
     "Microsoft.Compute/virtualMachines/runCommand/action"),
    ("GET", f"/subscriptions/{SUB}/providers/Microsoft.Compute/locations/westeurope/operations/1",
     "Microsoft.Compute/locations/operations/read"),
    ("GET", f"/subscriptions/{SUB}/resourceGroups/{RG}", "Microsoft.Resources/subscriptions/resourceGroups/read"),
    ("DELETE", f"/subscriptions/{SUB}/resourceGroups/{RG}/providers/Microsoft.Network/publicIPAddresses/p",
     "Microsoft.Network/publicIPAddresses/delete"),
])
def test_actions_are_named_as_azure_rbac_names_them(method, path, action):
    """Action names as Azure's resource provider operations list them (learn.microsoft.com, permissions)."""
    assert arm_action(method, path) == action
    assert grants(["Microsoft.Compute/virtualMachines/*"], "Microsoft.Compute/virtualMachines/runCommand/action")
    assert not grants(["Microsoft.Compute/virtualMachines/read"], "Microsoft.Network/networkInterfaces/read")


# ---- one time budget for the Run Commands of a push ---------------------------------------------


def function_timeout() -> int:
    import json

    from tests.deploy import REPO

    h, m, s = (int(x) for x in json.loads((REPO / "host.json").read_text())["functionTimeout"].split(":"))
    return h * 3600 + m * 60 + s


def test_the_run_command_budget_of_a_push_fits_the_function_timeout_and_the_lease():
    """A host-certificate push runs two Run Commands (host keys, then the setup script); both draw on
    one budget, which with the rest of the push stays below the function timeout, below the lease."""
    from functions.service.enrolment import EnrolConfig

    config = EnrolConfig(scopes=(), tenants=())
    runs_per_push = 2
    assert AzureVms(lambda sub: None).timeout <= config.push_budget  # one Run Command alone fits too
    assert config.push_budget < function_timeout() < config.lease_seconds
    assert runs_per_push * AzureVms(lambda sub: None).timeout > function_timeout(), \
        "(why one budget: two full per-command waits would not fit)"
    assert function_timeout() - config.push_budget >= 60  # room for reads, signing and the record


def test_the_second_run_command_of_a_push_gets_only_what_the_first_left(arm, vms, vm):
    arm.run_delay = 1.5
    try:
        bounded = vms.within(2.5)
        assert bounded.run_shell_script(vm, wrap_script("echo keys")).ok  # ~1.5 s of the 2.5
        with pytest.raises(PushError) as info:
            bounded.run_shell_script(vm, wrap_script("echo setup"))  # 1 s left: not enough for 1.5 s
        assert info.value.code == "timeout" and info.value.transient
        assert "within 1 s" in info.value.message
        with pytest.raises(PushError, match="time for Run Commands is spent"):
            bounded.run_shell_script(vm, wrap_script("echo more"))  # nothing left: not even started
        assert vms.deadline is None  # the client itself keeps no budget
    finally:
        arm.run_delay = 0.0
        arm.wait_idle()
