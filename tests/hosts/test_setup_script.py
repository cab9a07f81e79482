"""The host setup script, run for real against sandbox roots whose sshd reads what it writes."""

from __future__ import annotations

import subprocess
import time

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import ssh

from functions.hosts.setup import HostSetup, RenderError, render_setup_script

from .sandbox import user_key

TIMINGS: dict[str, float] = {}


def issue(client, headers, pub: str, policy: str | None = None) -> dict:
    body = {"host": "127.0.0.1", "principal": "alice", "public_key": pub}
    if policy:
        body["policy"] = policy
    r = client.post("/api/requests", headers=headers, json=body)
    assert r.status_code == 201, r.text
    return r.json()


def script_for(client, headers, policy_id: str) -> str:
    r = client.get(f"/api/policies/{policy_id}/host-setup", headers=headers)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/x-shellscript")
    return r.text


@pytest.fixture(scope="module")
def demo_script(client, auth):
    return script_for(client, auth("carol"), "demo")


def test_the_script_is_served_to_policy_admins_and_names_the_policy(client, auth, demo_script, demo_policy, oidc,
                                                                    api_server):
    assert demo_script.startswith("#!/bin/sh\n")
    assert demo_policy.current_ca.public_key in demo_script
    assert f"EZSSH_TENANT='{oidc.tenant_id('contoso')}'" in demo_script
    assert "EZSSH_POLICY='demo'" in demo_script
    # the host token is made once per policy: every render embeds the same one
    token = demo_script.split("EZSSH_HOST_TOKEN='")[1].split("'")[0]
    assert len(token) >= 40
    assert script_for(client, auth("carol"), "demo").count(token) == 1
    # the API address is the deployment's EZSSH_PUBLIC_URL, whatever Host header the request had
    assert f"EZSSH_API='{api_server}'" in demo_script
    forged = client.get("/api/policies/demo/host-setup", headers={**auth("carol"), "Host": "evil.example"})
    assert forged.status_code == 200 and "evil.example" not in forged.text
    quoted = client.get("/api/policies/demo/host-setup", headers={**auth("carol"), "Host": "a'b"})
    assert quoted.status_code in (200, 400) and "a'b" not in quoted.text
    # members ask for access; the script carries the host token, so it is for the policy's admins only
    member = client.get("/api/policies/demo/host-setup", headers=auth("alice"))
    assert member.status_code == 403 and member.json()["error"] == "forbidden" and token not in member.text
    assert subprocess.run(["sh", "-n"], input=demo_script, text=True).returncode == 0


def test_after_a_run_a_login_works_and_a_second_run_changes_nothing(make_host, client, auth, demo_script, tmp_path):
    host = make_host()
    key, pub = user_key(tmp_path)
    cert = issue(client, auth("alice"), pub)["certificate"]
    assert host.login("alice", key, cert).returncode == 255  # not trusted yet

    started = time.perf_counter()
    r = host.run_setup(demo_script)
    TIMINGS["first run"] = time.perf_counter() - started
    assert r.returncode == 0, r.stderr
    assert "now trusts policy demo" in r.stdout
    assert host.reloads() == 1
    host.wait_reloaded()
    ok = host.login("alice", key, cert)
    assert ok.returncode == 0 and ok.stdout.strip() == "alice", ok.stderr + host.log_text()[-1500:]

    etc = host.etc
    dropin = (etc / "sshd_config.d" / "50-ezssh.conf").read_text()
    assert f'TrustedUserCAKeys "{etc}/ezssh/trusted_user_ca_keys"' in dropin
    assert f'RevokedKeys "{etc}/ezssh/revoked_keys"' in dropin
    # an empty KRL (no revocations for this CA yet) blocks nothing, and it always exists
    assert (etc / "ezssh" / "revoked_keys").read_bytes().startswith(b"SSHKRL\n\0")
    cron = (host.root / "etc" / "cron.d" / "ezssh-krl-update").read_text()
    assert f"{etc}/ezssh/bin/ezssh-krl-update --root {host.root}" in cron
    token_file = next((etc / "ezssh" / "policies").glob("*_demo.token"))
    assert token_file.stat().st_mode & 0o777 == 0o600

    before = host.snapshot()
    started = time.perf_counter()
    again = host.run_setup(demo_script)
    TIMINGS["second run"] = time.perf_counter() - started
    assert again.returncode == 0, again.stderr
    assert "nothing changed" in again.stdout
    assert host.snapshot() == before  # no file rewritten: same hashes, mtimes and modes
    assert host.reloads() == 1  # and no reload
    print(f"\nsetup script: first run {TIMINGS['first run']:.3f}s, second run {TIMINGS['second run']:.3f}s")


def test_a_broken_config_is_rolled_back_and_sshd_keeps_serving(make_host, client, auth, demo_script, second_policy,
                                                                tmp_path):
    host = make_host()
    assert host.run_setup(demo_script).returncode == 0
    host.wait_reloaded()
    (host.etc / "sshd_config.d" / "40-other-tool.conf").write_text("PermitRootLogin no\nThisIsNotAnOption yes\n")
    before = host.snapshot()
    reloads = host.reloads()

    r = host.run_setup(script_for(client, auth("carol"), "hosts-b"))
    assert r.returncode == 1
    assert "ThisIsNotAnOption" in r.stderr and "rolled back" in r.stderr
    assert "fails without ezssh's changes too" in r.stderr
    assert host.snapshot() == before
    assert not list((host.etc / "ezssh" / "ca.d").glob("*_hosts-b.pub"))
    assert host.reloads() == reloads
    assert host.proc.alive()
    key, pub = user_key(tmp_path)
    ok = host.login("alice", key, issue(client, auth("alice"), pub)["certificate"])
    assert ok.returncode == 0, ok.stderr


def test_a_host_broken_from_the_start_gets_nothing(make_host, demo_script):
    host = make_host(start=False)
    (host.etc / "sshd_config.d" / "10-bad.conf").write_text("NoSuchKeyword 1\n")
    before = host.snapshot()
    r = host.run_setup(demo_script)
    assert r.returncode == 1 and "NoSuchKeyword" in r.stderr
    assert host.snapshot() == before
    assert not (host.etc / "ezssh").exists() and not (host.root / "etc" / "cron.d").exists()
    assert host.reloads() == 0


def test_other_cas_and_other_tools_configuration_are_left_alone(make_host, client, auth, demo_script, tmp_path):
    host = make_host()
    # another CA, trusted through a file named by an earlier drop-in: that file stays in effect
    corp_ca = ec.generate_private_key(ec.SECP256R1())
    corp_line = corp_ca.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                  serialization.PublicFormat.OpenSSH).decode() + " corp-ca"
    corp_file = host.root / "corp" / "ca.pub"
    corp_file.parent.mkdir()
    corp_file.write_text("# the corporate CA\n" + corp_line + "\n")
    corp_file.chmod(0o640)
    (host.etc / "sshd_config.d" / "20-corp.conf").write_text(f"TrustedUserCAKeys {corp_file}\n")
    # what AADSSHLoginForLinux adds: Entra login through an AuthorizedKeysCommand
    aad = host.etc / "sshd_config.d" / "30-aadsshlogin.conf"
    aad.write_text("# AADSSHLoginForLinux\nAuthorizedKeysCommand /usr/sbin/aad_certhandler %u %k\n"
                   "AuthorizedKeysCommandUser root\n")
    host.proc.stop()
    host.start()
    untouched = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in (aad, host.etc / "sshd_config.d" / "20-corp.conf")}

    r = host.run_setup(demo_script)
    assert r.returncode == 0, r.stderr
    assert f"TrustedUserCAKeys is already {corp_file}" in r.stderr
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in untouched} == untouched
    text = corp_file.read_text()
    assert text.startswith("# the corporate CA\n" + corp_line + "\n")  # its own lines first and unchanged
    assert ">>> ezssh CA keys" in text and "ezssh-ca:demo" in text
    assert corp_file.stat().st_mode & 0o777 == 0o640  # its mode kept
    assert "TrustedUserCAKeys" not in (host.etc / "sshd_config.d" / "50-ezssh.conf").read_text().replace(
        "# TrustedUserCAKeys", "")
    effective = subprocess.run(["sshd", "-T", "-f", str(host.config)], capture_output=True, text=True).stdout
    assert f"trustedusercakeys {corp_file}" in effective
    assert "authorizedkeyscommand /usr/sbin/aad_certhandler %u %k" in effective

    host.wait_reloaded()
    key, pub = user_key(tmp_path)
    assert host.login("alice", key, issue(client, auth("alice"), pub)["certificate"]).returncode == 0
    now = int(time.time())
    corp_cert = (ssh.SSHCertificateBuilder().public_key(ssh.load_ssh_public_key(pub.encode())).serial(77)
                 .type(ssh.SSHCertificateType.USER).key_id(b"corp").valid_principals([b"alice"])
                 .valid_after(now - 60).valid_before(now + 600).sign(corp_ca)).public_bytes().decode()
    assert host.login("alice", key, corp_cert).returncode == 0  # the other CA still works

    before = host.snapshot()
    assert host.run_setup(demo_script).returncode == 0
    assert host.snapshot() == before


def test_two_policies_on_one_host_are_merged(make_host, client, auth, demo_script, second_policy, tmp_path):
    host = make_host()
    assert host.run_setup(demo_script).returncode == 0
    reloads = host.reloads()
    r = host.run_setup(script_for(client, auth("carol"), "hosts-b"))
    assert r.returncode == 0, r.stderr
    assert host.reloads() == reloads  # only CA and KRL files changed: sshd re-reads them at each login
    trusted = (host.etc / "ezssh" / "trusted_user_ca_keys").read_text()
    assert "ezssh-ca:demo" in trusted and "ezssh-ca:hosts-b" in trusted
    host.wait_reloaded()
    for policy in ("demo", "hosts-b"):
        key, pub = user_key(tmp_path, f"id_{policy}")
        body = issue(client, auth("alice"), pub, policy)
        assert body["key_id"].startswith(f"ezssh/{policy}/")
        ok = host.login("alice", key, body["certificate"])
        assert ok.returncode == 0, (policy, ok.stderr)
    before = host.snapshot()
    assert host.run_setup(demo_script).returncode == 0
    assert host.snapshot() == before


def test_without_sshd_config_d_an_include_line_is_added_at_the_top(make_host, client, auth, demo_script, tmp_path):
    host = make_host(with_dropin_dir=False)
    original = host.config.read_text()
    r = host.run_setup(demo_script)
    assert r.returncode == 0, r.stderr
    text = host.config.read_text()
    assert text.splitlines()[1] == f'Include "{host.etc}/sshd_config.d/50-ezssh.conf"'
    assert text.endswith(original)
    host.wait_reloaded()
    key, pub = user_key(tmp_path)
    assert host.login("alice", key, issue(client, auth("alice"), pub)["certificate"]).returncode == 0
    before = host.snapshot()
    assert host.run_setup(demo_script).returncode == 0
    assert host.snapshot() == before and host.reloads() == 1


def test_systemd_timer_units_are_written_when_asked(make_host, demo_script):
    host = make_host(start=False)
    r = host.run_setup(demo_script, EZSSH_SCHEDULER="systemd")
    assert r.returncode == 0, r.stderr
    units = host.root / "etc" / "systemd" / "system"
    service = (units / "ezssh-krl-update.service").read_text()
    assert f"ExecStart={host.etc}/ezssh/bin/ezssh-krl-update --root {host.root}" in service
    assert "OnUnitActiveSec=15min" in (units / "ezssh-krl-update.timer").read_text()
    assert not (host.root / "etc" / "cron.d").exists()


# ---- bad input ------------------------------------------------------------------------------------


def test_host_setup_for_another_tenants_policy_is_not_found(client, auth, fabrikam_policy):
    r = client.get("/api/policies/fab-hosts/host-setup", headers=auth("alice"))
    assert r.status_code == 404 and r.json()["error"] == "not_found"
    r = client.get("/api/policies/demo/host-setup", headers=auth("mallory"))
    assert r.status_code == 404
    assert client.get("/api/policies/fab-hosts/host-setup", headers=auth("mallory")).status_code == 200


def test_host_setup_needs_a_token(client):
    r = client.get("/api/policies/demo/host-setup")
    assert r.status_code == 401 and r.json()["error"] == "unauthenticated"


def test_values_that_would_break_the_script_are_refused(demo_policy):
    good = HostSetup("https://ezssh.example.net", demo_policy.tenant_id, "demo",
                     (demo_policy.current_ca.public_key,), "t" * 43, b"SSHKRL\n\0" + bytes(36))
    render_setup_script(good)
    from dataclasses import replace

    for bad in (replace(good, api_url="https://x.example/'; rm -rf /; '"),
                replace(good, policy_id="demo'$(id)"),
                replace(good, tenant_id="contoso"),
                replace(good, host_token="short"),
                replace(good, ca_public_keys=("ssh-ed25519 AAAA' evil",)),
                replace(good, ca_public_keys=()),
                replace(good, krl=b"not a krl")):
        with pytest.raises(RenderError):
            render_setup_script(bad)
