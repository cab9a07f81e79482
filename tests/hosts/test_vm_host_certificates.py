"""Azure VMs get host certificates through ARM (issue 12): the real azure-mgmt-compute client against
the HTTPS ARM stand-in reads the VM's names (VM name, computer name, private and public IP, DNS
name) and, with Run Command, the host keys its sshd uses; the pushed setup script installs the
certificates; ssh then trusts the VM by its certificate alone. The reconcile timer renews them once
they are due (a movable clock, the queue-triggered push as in the other enrolment tests)."""

from __future__ import annotations

import subprocess
import time
from dataclasses import replace

import pytest

from tests.standins.arm import StaticTokenCredential

from .sandbox import user_key
from .test_enrolment import Clock, host_vm, queue_worker
from .test_host_certificates import strict_login

SUB = "9d2c71aa-3f0e-4c55-8b1a-6e0f5a4b3c21"  # this module's own subscription (the `arm` fixture serves it)
RG, RG_NAMES = "rg-hostcerts", "rg-names"
CONTOSO = "1ff8d19a-512a-4382-b7c7-72836fd919c4"  # infra/local/oidc/users.json
SCOPES = ",".join(f"{CONTOSO}=/subscriptions/{SUB}/resourceGroups/{rg}" for rg in (RG, RG_NAMES))


@pytest.fixture(scope="module")
def clock():
    return Clock()


@pytest.fixture(scope="module")
def wired(api_env, azurite, context, oidc, arm, clock):
    """A service on this module's clock (so time can pass), enrolment wired to the ARM stand-in, and
    the queue-triggered push serving in a thread."""
    from devstack.stack import ensure_policy, identity_of
    from functions.service import Service
    from functions.settings import load_settings
    from functions.wiring import Context, build_enrolments

    svc = Service(context.service.store, context.service.keys, context.service.base.config, clock=clock)
    ensure_policy(svc, identity_of(oidc, "carol"), {
        "id": "vm-hc", "name": "VM host certificates",
        "rules": [{"groups": [oidc.group_id("contoso", "ezssh-users")], "action": "auto"}],
        "hosts": ["127.0.0.0/8", f"/subscriptions/{SUB}/resourceGroups/{RG}"],
        "principals": ["{username}"], "max_ttl": 3600, "host_cert_ttl": 7 * 86400,
    })
    settings = load_settings({**api_env, "EZSSH_ENROL_SCOPES": SCOPES, "EZSSH_ARM_ENDPOINT": arm.url,
                              "EZSSH_PUBLIC_URL": "https://ezssh.contoso.test"})
    assert settings.vm_host_certs  # on by default
    enrolments = build_enrolments(settings, svc, svc.store, credential=StaticTokenCredential(arm.token),
                                  connection_verify=arm.ca_path, polling_interval=0)
    enrolments.clock = clock
    ctx = Context(settings=settings, service=svc, validator=context.validator, enrolments=enrolments)
    with queue_worker(ctx, azurite) as host:
        yield ctx, host


def certificate_of(host) -> tuple[str, str]:  # type: ignore[no-untyped-def]
    """(principals, serial) of the host certificate installed in a sandbox root, read by ssh-keygen."""
    cert = host.etc / "ezssh" / "host_certs" / "ssh_host_ed25519_key-cert.pub"
    out = subprocess.run(["ssh-keygen", "-L", "-f", str(cert)], capture_output=True, text=True, check=True).stdout
    assert "host certificate" in out
    return " ".join(out.split("Principals:")[1].split("Critical Options:")[0].split()), out.split("Serial: ")[1].split()[0]


def setup_runs(arm, vid: str) -> list:
    return [r for r in arm.runs_on(vid) if "EZSSH_POLICY=" in r.script]


def test_an_enrolled_vm_gets_a_host_certificate_naming_its_arm_names_and_the_timer_renews_it(
        wired, arm, make_host, clock, tmp_path, oidc):
    ctx, worker = wired
    svc = ctx.service
    vid, host = host_vm(arm, make_host, RG, "web7", private_ip="127.0.0.1", public_ip="20.50.1.7",
                        dns_label="web7-contoso", computer_name="web7-host")
    from devstack.stack import identity_of

    carol = identity_of(oidc, "carol")
    policy = svc.policies.get(carol, "vm-hc")
    from functions.hosts.azure_vms import parse_vm_id

    ctx.enrolments.submit(policy, [parse_vm_id(vid)], source="api", who=carol)
    worker.drain()
    rec = ctx.enrolments.store.get(policy.tenant_id, "vm-hc", vid)
    assert rec.state == "succeeded", rec
    # ARM said who the VM is; Run Command read its host key; the setup script installed the certificate.
    # ARM's names are checked like any others: only 127.0.0.1 is inside both the tenant's namespaces and
    # the policy's name patterns (its resource-group pattern covers the VM, and vouches for no name);
    # the VM name, computer name, public IP and public DNS name are dropped, and the drop audited.
    principals, serial = certificate_of(host)
    assert principals == "127.0.0.1"
    reads = [r for r in arm.runs_on(vid) if "ezssh-host-key" in r.script and "EZSSH_POLICY=" not in r.script]
    assert len(reads) == 1 and len(setup_runs(arm, vid)) == 1
    assert any(r.path.endswith("/networkInterfaces/web7-nic") for r in arm.requests)
    assert any(r.path.endswith("/publicIPAddresses/web7-ip") for r in arm.requests)
    entries = [e for e in svc.store.list_audit(policy.tenant_id, since=time.time() - 60, limit=100000)
               if e.action == "host_certificate.issued" and e.serial == serial]
    assert entries and entries[0].details["proof"] == f"arm:{vid}" and entries[0].details["vm_id"] == vid
    dropped = " ".join(entries[0].details["dropped_names"])
    assert all(n in dropped for n in ("web7 ", "web7-host", "20.50.1.7", "web7-contoso.westeurope.cloudapp.azure.com"))

    # ssh trusts the VM by the certificate alone
    host.wait_reloaded()
    host_ca = policy.current_host_ca.public_key
    known = tmp_path / "known_hosts"
    known.write_text(f"@cert-authority 127.*,[127.*]:* {host_ca}\n")
    key, pub = user_key(tmp_path)
    from functions.core.evaluation import AccessRequest

    out = svc.issuance.request_access(identity_of(oidc, "alice"),
                                      AccessRequest(host="127.0.0.1", principal="alice", policy_id="vm-hc"), pub)
    ok = strict_login(host, key, out.certificate.openssh, known)
    assert ok.returncode == 0 and ok.stdout.strip() == "alice", ok.stderr

    # not due: the timer leaves the VM alone
    counts = ctx.enrolments.reconcile()
    worker.drain()
    assert len(setup_runs(arm, vid)) == 1 and certificate_of(host)[1] == serial, counts
    # 7-day certificates renew two thirds in: five days later the timer pushes new ones
    clock.advance(5 * 86400)
    ctx.enrolments.reconcile()
    worker.drain()
    assert len(setup_runs(arm, vid)) == 2
    principals2, serial2 = certificate_of(host)
    assert serial2 != serial and principals2 == principals
    renewed = [e for e in svc.store.list_audit(policy.tenant_id, since=time.time() - 60, limit=100000)
               if e.action == "host_certificate.issued" and e.serial == serial2]
    assert renewed and renewed[0].details["proof"] == f"arm:{vid}"
    # (no login with it here: its validity starts five simulated days from now)


def test_names_outside_the_patterns_get_no_certificate_and_the_push_goes_on(wired, arm, make_host, oidc):
    """A VM the policy covers by no resource pattern, whose ARM names are all outside the name
    patterns: no host certificate (refused, audited), the CA trust is pushed all the same."""
    ctx, worker = wired
    from devstack.stack import identity_of
    from functions.hosts.azure_vms import parse_vm_id

    vid, host = host_vm(arm, make_host, RG_NAMES, "db9", private_ip="10.9.9.9")
    policy = ctx.service.policies.get(identity_of(oidc, "carol"), "vm-hc")
    since = time.time() - 1
    ctx.enrolments.submit(policy, [parse_vm_id(vid)], source="api")
    worker.drain()
    rec = ctx.enrolments.store.get(policy.tenant_id, "vm-hc", vid)
    assert rec.state == "succeeded", rec
    assert not (host.etc / "ezssh" / "host_certs").exists()
    assert [r for r in arm.runs_on(vid) if "EZSSH_POLICY=" not in r.script] == []  # host keys not even read
    refused = [e for e in ctx.service.store.list_audit(policy.tenant_id, since=since, limit=100000)
               if e.action == "host_certificate.refused" and e.details.get("vm_id") == vid]
    assert refused and refused[0].error_code == "host_name_refused" and refused[0].policy_id == "vm-hc"


def test_a_tagged_vm_gets_no_name_outside_the_namespaces_and_renewal_checks_names_again(
        wired, arm, make_host, clock, oidc):
    """The policy's tag covers the VM, and ARM says its computer name is github.com: the certificate
    names only what the namespaces and the policy's name patterns hold (its address), the rest is
    dropped and audited. When the policy no longer names that address, the renewal the timer pushes
    re-checks ARM's names and issues nothing (refused, audited); the VM keeps its old certificate."""
    ctx, worker = wired
    svc = ctx.service
    from devstack.stack import ensure_policy, identity_of
    from functions.hosts.azure_vms import parse_vm_id

    carol = identity_of(oidc, "carol")
    policy = ensure_policy(svc, carol, {
        "id": "vm-tag", "rules": [{"groups": [oidc.group_id("contoso", "ezssh-users")], "action": "auto"}],
        "hosts": ["tag:ezssh-policy=vm-tag", "127.0.0.0/8"], "principals": ["{username}"],
        "host_cert_ttl": 7 * 86400})
    vid, host = host_vm(arm, make_host, RG_NAMES, "evil", private_ip="127.0.0.6", computer_name="github.com",
                        tags={"ezssh-policy": "vm-tag"})
    since = time.time() - 1
    ctx.enrolments.submit(policy, [parse_vm_id(vid)], source="api", who=carol)
    worker.drain()
    assert ctx.enrolments.store.get(policy.tenant_id, "vm-tag", vid).state == "succeeded"
    principals, serial = certificate_of(host)
    assert principals == "127.0.0.6"
    [issued] = [e for e in svc.store.list_audit(policy.tenant_id, since=since, limit=100000)
                if e.action == "host_certificate.issued" and e.serial == serial]
    assert any("github.com" in d for d in issued.details["dropped_names"])
    # the policy stops naming the address: at renewal no name of the VM fits any more
    current = svc.store.get_policy(policy.tenant_id, "vm-tag")
    svc.policies.update(carol, "vm-tag", {"hosts": ["tag:ezssh-policy=vm-tag"]}, current.etag)
    clock.advance(5 * 86400)
    since = time.time() - 1
    ctx.enrolments.reconcile()
    worker.drain()
    assert certificate_of(host)[1] == serial  # nothing new was issued
    refused = [e for e in svc.store.list_audit(policy.tenant_id, since=since, limit=100000)
               if e.action == "host_certificate.refused" and e.details.get("vm_id") == vid]
    assert refused and refused[0].error_code == "host_name_refused"
    assert "github.com" in refused[0].message and "127.0.0.6" in refused[0].message
