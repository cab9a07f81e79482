"""Host certificates through the setup script, for real: a sandbox sshd enrolled with a one-time token
presents a host certificate that ssh accepts with only an `@cert-authority` line and
StrictHostKeyChecking yes; a second run changes nothing; the timer's helper renews by proof of
possession; a bad token changes nothing."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from .sandbox import user_key
from .test_setup_script import issue, script_for


def host_ca(client, auth) -> str:  # type: ignore[no-untyped-def]
    return client.get("/api/policies/demo/ca?kind=host", headers=auth("alice")).text.splitlines()[0]


def strict_login(host, key: Path, cert_line: str, known_hosts: Path) -> subprocess.CompletedProcess:  # type: ignore[no-untyped-def]
    cert = key.with_name(key.name + "-cert.pub")
    cert.write_text(cert_line.strip() + "\n")
    return subprocess.run(
        ["ssh", "-i", str(key), "-o", f"CertificateFile={cert}", "-o", "IdentitiesOnly=yes", "-o", "IdentityAgent=none",
         "-p", str(host.port), "-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={known_hosts}",
         "-o", "GlobalKnownHostsFile=/dev/null", "-o", "BatchMode=yes", "alice@127.0.0.1", "whoami"],
        capture_output=True, text=True, timeout=30)


def cert_serial(path: Path) -> str:
    out = subprocess.run(["ssh-keygen", "-L", "-f", str(path)], capture_output=True, text=True, check=True).stdout
    return out.split("Serial: ")[1].split()[0]


def test_token_enrolment_gives_sshd_a_host_certificate_and_renews_it(make_host, client, auth, tmp_path, context,
                                                                      oidc):
    host = make_host()
    script = script_for(client, auth("carol"), "demo")
    known = tmp_path / "known_hosts"
    known.write_text(f"@cert-authority 127.*,[127.*]:* {host_ca(client, auth)}\n")
    key, pub = user_key(tmp_path)
    cert = issue(client, auth("alice"), pub)["certificate"]

    r = client.post("/api/policies/demo/host-tokens", headers=auth("carol"), json={"hosts": ["127.0.0.1"]})
    assert r.status_code == 201, r.text
    token = r.json()["token"]
    started = time.perf_counter()
    done = host.run_setup(script, EZSSH_ENROL_TOKEN=token)
    first_run = time.perf_counter() - started
    assert done.returncode == 0, done.stderr
    assert "presents host certificates of policy demo" in done.stdout
    certs = host.etc / "ezssh" / "host_certs"
    files = sorted(p.name for p in certs.glob("*-cert.pub"))
    assert files == ["ssh_host_ed25519_key-cert.pub"]
    dropin = (host.etc / "sshd_config.d" / "50-ezssh.conf").read_text()
    assert f'HostCertificate "{certs}/ssh_host_ed25519_key-cert.pub"' in dropin
    effective = subprocess.run(["sshd", "-T", "-f", str(host.config)], capture_output=True, text=True).stdout
    assert f"hostcertificate {certs}/ssh_host_ed25519_key-cert.pub" in effective
    host.wait_reloaded()
    ok = strict_login(host, key, cert, known)
    assert ok.returncode == 0 and ok.stdout.strip() == "alice", ok.stderr
    assert "Permanently added" not in ok.stderr  # nothing learnt on first use
    assert known.read_text().count("\n") == 1

    # a second run (even with the used token) changes nothing
    before = host.snapshot()
    again = host.run_setup(script, EZSSH_ENROL_TOKEN=token)
    assert again.returncode == 0, again.stderr
    assert host.snapshot() == before

    # the timer's helper renews by signing a challenge with the host key
    serial = cert_serial(certs / "ssh_host_ed25519_key-cert.pub")
    reloads = host.reloads()
    started = time.perf_counter()
    renew = subprocess.run(["sh", str(host.etc / "ezssh" / "bin" / "ezssh-host-cert"), "--root", str(host.root),
                            "renew", "--force"], capture_output=True, text=True, timeout=60,
                           env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
                                "EZSSH_SSHD_RELOAD": f"echo reload >> {host.reload_log}; kill -HUP {host.proc.pid}"})
    assert renew.returncode == 0, renew.stderr
    renewal = time.perf_counter() - started
    print(f"\nhost certificates: setup run with a token {first_run:.3f}s, renewal by proof of possession "
          f"{renewal:.3f}s (challenge, ssh-keygen -Y sign, issue, sshd -t, reload)")
    new_serial = cert_serial(certs / "ssh_host_ed25519_key-cert.pub")
    assert new_serial != serial and host.reloads() == reloads + 1
    tid = oidc.tenant_id("contoso")
    entries = [e for e in context.service.store.list_audit(tid, since=time.time() - 60, limit=100000)
               if e.action == "host_certificate.issued" and e.serial == new_serial]
    assert entries and entries[0].details["proof"] == f"renewal:{serial}"
    host.wait_reloaded()
    assert strict_login(host, key, cert, known).returncode == 0
    # not due yet: a plain run of the helper asks nothing
    quiet = subprocess.run(["sh", str(host.etc / "ezssh" / "bin" / "ezssh-host-cert"), "--root", str(host.root),
                            "renew"], capture_output=True, text=True, timeout=60)
    assert quiet.returncode == 0 and cert_serial(certs / "ssh_host_ed25519_key-cert.pub") == new_serial


def test_a_refused_token_changes_nothing(make_host, client, auth):
    host = make_host(start=False)
    script = script_for(client, auth("carol"), "demo")
    before = host.snapshot()
    # a token for a name the host is not is still refused by nobody but the service: a wrong token
    r = host.run_setup(script, EZSSH_ENROL_TOKEN="ezh_" + "x" * 43)
    assert r.returncode == 1
    assert "refused (HTTP 403)" in r.stderr and "not valid" in r.stderr, r.stderr
    assert "rolled back" in r.stderr
    assert host.snapshot() == before and not (host.etc / "ezssh").exists()
