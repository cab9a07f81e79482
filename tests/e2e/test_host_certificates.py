"""End to end (issue 12): hosts are checked by their host certificates, never trusted on first use.

- an sshd set up by the setup script with a one-time token presents a host certificate, and
  `ezssh ssh` logs in with no known_hosts entry for it and StrictHostKeyChecking yes, with no prompt;
- the same sshd with an uncertified host key is refused, with a clear message;
- a host whose certificate was revoked is refused once the client has the new KRL.
The sshds are real; the CLI is the installed `ezssh`; the service runs under uvicorn."""

from __future__ import annotations

import json
import os
import pwd
import subprocess
from pathlib import Path

import pytest

from tests.e2e.signin import signed_in_home
from devstack.demo import run_cli
from devstack.proc import free_port
from devstack.sshd import host_key_file, start_sshd
from devstack.stack import DEMO_USERS, host_certificate_for, identity_of
from tests.hosts.conftest import make_host  # noqa: F401 - sandbox hosts for the setup script


@pytest.fixture(scope="module")
def alice(tmp_path_factory, api_server, sshd, oidc):
    return signed_in_home(tmp_path_factory, api_server, oidc, "alice", "hostcert-alice")


@pytest.fixture(scope="module")
def carol(tmp_path_factory, api_server, oidc):
    return signed_in_home(tmp_path_factory, api_server, oidc, "carol", "hostcert-carol")


def own_known_hosts() -> Path:
    """The ~/.ssh/known_hosts ssh reads (OpenSSH expands ~ from the password database, not $HOME)."""
    return Path(pwd.getpwuid(os.getuid()).pw_dir) / ".ssh" / "known_hosts"


def entries_for(port: int) -> list[str]:
    try:
        text = own_known_hosts().read_text()
    except FileNotFoundError:
        return []
    return [line for line in text.splitlines() if f"]:{port} " in line or f"]:{port}," in line]


def ssh_args(port: int) -> list[str]:
    return ["alice@127.0.0.1", "-p", str(port), "-o", "BatchMode=yes", "whoami"]


def test_a_host_set_up_with_a_token_is_trusted_by_its_certificate(make_host, alice, carol, client, auth):
    host = make_host()
    script = run_cli(["policy", "host-setup", "demo"], carol).stdout
    minted = run_cli(["hosts", "token", "--policy", "demo", "--ttl", "10m", "127.0.0.1"], carol)
    assert minted.returncode == 0, minted.stderr
    token = minted.stdout.strip()
    assert token.startswith("ezh_") and "EZSSH_ENROL_TOKEN=" in minted.stderr
    refused = run_cli(["hosts", "token", "--policy", "demo", "db1.example.com"], carol)
    assert refused.returncode != 0 and "outside" in refused.stderr
    done = host.run_setup(script, EZSSH_ENROL_TOKEN=token)
    assert done.returncode == 0, done.stderr
    host.wait_reloaded()
    assert entries_for(host.port) == []
    r = run_cli(["ssh", "-e", *ssh_args(host.port)], alice)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "alice"
    assert "StrictHostKeyChecking=yes" in r.stderr  # -e shows the command ezssh ran
    assert "authenticity of host" not in r.stderr and "Permanently added" not in r.stderr
    assert entries_for(host.port) == []  # nothing learnt on first use
    known = Path(alice["EZSSH_HOME"]) / "known_hosts"
    demo_ca = client.get("/api/policies/demo/ca?kind=host", headers=auth("alice")).text.split()[1]
    assert any(line.startswith("@cert-authority ") and demo_ca in line for line in known.read_text().splitlines())


def test_the_session_sshd_is_trusted_by_its_certificate_too(alice, sshd):
    r = run_cli(["ssh", *ssh_args(sshd.port)], alice)
    assert r.returncode == 0 and r.stdout.strip() == "alice", r.stderr


def test_an_uncertified_host_key_is_refused_clearly(alice, state_dir, demo_policy):
    bare = start_sshd(state_dir, free_port(), name="sshd-uncertified", users=DEMO_USERS)
    try:
        bare.trust(*(c.public_key for c in demo_policy.trusted_ca))
        r = run_cli(["ssh", *ssh_args(bare.port)], alice)
        assert r.returncode == 255, r.stderr
        assert "Host key verification failed" in r.stderr
        assert "did not present a host certificate from the host CA of policy demo" in r.stderr
        assert "Permission denied" not in r.stderr  # refused before any login was tried
        assert entries_for(bare.port) == []
    finally:
        bare.stop()


def test_a_revoked_host_certificate_is_refused(alice, state_dir, demo_policy, context, oidc, client, auth):
    name = "sshd-revoked"
    cert = host_certificate_for(context.service, identity_of(oidc, "carol"), "demo", host_key_file(state_dir, name))
    box = start_sshd(state_dir, free_port(), name=name, users=DEMO_USERS, host_certificate=cert)
    try:
        box.trust(*(c.public_key for c in demo_policy.trusted_ca))
        ok = run_cli(["ssh", *ssh_args(box.port)], alice)
        assert ok.returncode == 0, ok.stderr
        serial = subprocess.run(["ssh-keygen", "-L", "-f", "-"], input=cert + "\n", capture_output=True, text=True,
                                check=True).stdout.split("Serial: ")[1].split()[0]
        r = client.post(f"/api/certificates/demo/{serial}/revoke", headers=auth("carol"), json={"reason": "stolen"})
        assert r.status_code == 200, r.text
        assert run_cli(["hosts", "trust"], alice).returncode == 0
        refused = run_cli(["ssh", *ssh_args(box.port)], alice)
        assert refused.returncode == 255, refused.stderr
        assert "revoked" in refused.stderr and "host certificate was revoked" in refused.stderr
    finally:
        box.stop()


def test_policy_ca_and_rotation_of_the_host_ca_from_the_cli(carol, client, auth, oidc):
    doc = {"id": "hc-rotate", "rules": [{"groups": [oidc.group_id("contoso", "ezssh-users")], "action": "auto"}],
           "hosts": ["rot-*"], "principals": ["{username}"]}
    assert client.post("/api/policies", headers=auth("carol"), json=doc).status_code == 201
    user_ca = run_cli(["policy", "ca", "hc-rotate"], carol).stdout
    host_ca = run_cli(["policy", "ca", "--host", "hc-rotate"], carol).stdout
    assert host_ca == client.get("/api/policies/hc-rotate/ca?kind=host", headers=auth("carol")).text
    assert host_ca.split()[1] != user_ca.split()[1]
    r = run_cli(["policy", "rotate-ca", "--host", "hc-rotate"], carol)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 2 and lines[1].split()[1] == host_ca.split()[1]  # the old one still trusted, second
    assert run_cli(["policy", "ca", "hc-rotate"], carol).stdout == user_ca  # the user CA did not move


def test_hosts_trust_asks_with_the_etag_and_keeps_an_unchanged_answer(alice):
    """The CLI keeps the answer's ETag and sends it: a 304 keeps the files it has (a marker added
    by hand stays), a refresh without the ETag is a full answer (the marker is gone)."""
    home = Path(alice["EZSSH_HOME"])
    known, etag = home / "known_hosts", home / "known_hosts.etag"
    assert run_cli(["hosts", "trust"], alice).returncode == 0
    tag = etag.read_text()
    assert tag.startswith('"') and tag.endswith('"')
    marked = known.read_text() + "# kept by a 304\n"
    known.write_text(marked)
    assert run_cli(["hosts", "trust"], alice).returncode == 0
    assert known.read_text() == marked and etag.read_text() == tag
    etag.write_text("")
    assert run_cli(["hosts", "trust"], alice).returncode == 0
    assert "# kept by a 304" not in known.read_text() and etag.read_text() == tag


def test_a_host_ca_is_not_trusted_for_a_name_outside_its_scope(alice, state_dir, context, oidc, client, auth, tmp_path):
    """A policy widened to `*` (by its admin) whose host CA signs a certificate naming a host outside
    the tenant's namespaces (as a customer-held CA key could): members' clients, with the
    known_hosts the service gives them, trust it for names inside the namespaces and not for
    github.com. Real sshd, real ssh, StrictHostKeyChecking yes."""
    import time

    from functions.core.serials import new_serial
    from functions.core.evaluation import AccessRequest
    from functions.core.hostcert import HostGrant, build_host_certificate, parse_host_key
    from functions.signing.base import as_private_key
    from tests.hosts.sandbox import user_key

    svc = context.service
    carol = identity_of(oidc, "carol")
    doc = {"id": "wide-e2e", "rules": [{"groups": [oidc.group_id("contoso", "ezssh-users")], "action": "auto"}],
           "hosts": ["*", "db[12]"], "principals": ["{username}"]}
    r = client.post("/api/policies", headers=auth("carol"), json=doc)
    assert r.status_code in (201, 409), r.text
    policy = svc.policies.ensure_host_ca(svc.store.get_policy(carol.tid, "wide-e2e"), carol)
    name = "sshd-wide"
    key = parse_host_key(" ".join(host_key_file(state_dir, name).with_suffix(".pub").read_text().split()[:2]))
    signer = svc.keys.get_signer(policy.current_host_ca.key_ref)
    grant = HostGrant(carol.tid, "wide-e2e", ("github.com", "wide1.contoso.example"), 86400, "test")
    cert = build_host_certificate(grant, key, as_private_key(signer), now=int(time.time()),
                                  serial=new_serial(time.time())).openssh
    box = start_sshd(state_dir, free_port(), name=name, users=DEMO_USERS, host_certificate=cert)
    try:
        box.trust(*(c.public_key for c in policy.trusted_ca))
        known = tmp_path / "known_hosts"
        known.write_text(client.get("/api/known-hosts", headers=auth("alice")).json()["known_hosts"])
        assert "wide-e2e" in known.read_text()
        # what can't be written as an ssh pattern is left out, and `ezssh hosts trust` says so
        trust = run_cli(["hosts", "trust"], alice)
        assert trust.returncode == 0 and "policy wide-e2e: Host pattern 'db[12]'" in trust.stderr, trust.stderr
        ukey, upub = user_key(tmp_path)
        alice_id = identity_of(oidc, "alice")
        ucert = svc.issuance.request_access(alice_id, AccessRequest(host="wide1.contoso.example", principal="alice",
                                                                    policy_id="wide-e2e"), upub).certificate.openssh
        certfile = ukey.with_name(ukey.name + "-cert.pub")
        certfile.write_text(ucert + "\n")

        def login(as_name: str) -> subprocess.CompletedProcess:
            return subprocess.run(
                ["ssh", "-i", str(ukey), "-o", f"CertificateFile={certfile}", "-o", "IdentitiesOnly=yes",
                 "-o", "IdentityAgent=none", "-p", str(box.port), "-o", "StrictHostKeyChecking=yes",
                 "-o", f"UserKnownHostsFile={known}", "-o", "GlobalKnownHostsFile=/dev/null", "-o", "BatchMode=yes",
                 "-o", f"HostKeyAlias={as_name}", "alice@127.0.0.1", "whoami"],
                capture_output=True, text=True, timeout=30)

        inside = login("wide1.contoso.example")
        assert inside.returncode == 0 and inside.stdout.strip() == "alice", inside.stderr
        outside = login("github.com")
        assert outside.returncode == 255 and "Host key verification failed" in outside.stderr, outside.stderr
        assert "alice" not in outside.stdout
    finally:
        box.stop()
        p = svc.store.get_policy(carol.tid, "wide-e2e")
        svc.policies.delete(carol, "wide-e2e", p.etag)


def test_hosts_namespaces_from_the_cli(alice, carol, client, auth):
    """Anyone signed in reads where the tenant's hosts live; only a tenant admin replaces them (here
    with what they are, so the other tests see no change); `*` is refused with the service's words."""
    current = client.get("/api/host-namespaces", headers=auth("alice")).json()["namespaces"]
    shown = run_cli(["hosts", "namespaces"], alice)
    assert shown.returncode == 0 and shown.stdout.split() == current, shown.stderr
    denied = run_cli(["hosts", "namespaces", "--replace", *current, "*.github.com"], alice)
    assert denied.returncode != 0 and "tenant admins" in denied.stderr
    wide = run_cli(["hosts", "namespaces", "--replace", "*"], carol)
    assert wide.returncode != 0 and "every host" in wide.stderr
    same = run_cli(["hosts", "namespaces", "--replace", *current, "--json"], carol)
    assert same.returncode == 0, same.stderr
    assert json.loads(same.stdout)["namespaces"] == current and json.loads(same.stdout)["source"] == "tenant"
    assert client.get("/api/host-namespaces", headers=auth("alice")).json()["namespaces"] == current
