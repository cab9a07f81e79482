"""End to end: the real CLI signs alice in (device code), gets a certificate from the API, and logs in
through a real sshd. sshd refuses expired certificates, wrong principals and other CAs; its log line
joins to the audit entry by key id and serial."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.serialization import ssh

from tests.e2e.signin import signed_in_home
from devstack.demo import run_cli
from functions.signing.base import as_private_key

ACCEPTED = re.compile(r"Accepted publickey for (?P<user>\S+) from \S+ port \d+ ssh2: \S+ \S+ "
                      r"ID (?P<key_id>\S+) \(serial (?P<serial>\d+)\)")


@pytest.fixture(scope="module")
def signed_in(tmp_path_factory, api_server, sshd, oidc):
    """alice's CLI home after `ezssh configure` and `ezssh login`."""
    return signed_in_home(tmp_path_factory, api_server, oidc, "alice")


def ssh_opts(sshd) -> list[str]:
    return ["-p", str(sshd.port),
            "-o", "BatchMode=yes", "-o", "LogLevel=ERROR"]


def issued_entries(context, tid: str, key_id: str) -> list:
    return [e for e in context.service.store.list_audit(tid, limit=100000)
            if e.action == "certificate.issued" and e.key_id == key_id]


def test_whoami_shows_the_signed_in_user(signed_in):
    r = run_cli(["whoami", "--json"], signed_in)
    assert r.returncode == 0, r.stderr
    assert '"alice@contoso.test"' in r.stdout


def test_ezssh_ssh_logs_alice_in_and_sshd_log_joins_the_audit(signed_in, sshd, context, oidc):
    r = run_cli(["ssh", "alice@127.0.0.1", *ssh_opts(sshd), "whoami"], signed_in)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "alice"

    deadline = time.time() + 5
    while not (m := [x for x in ACCEPTED.finditer(sshd.log_text()) if x["user"] == "alice"]) and time.time() < deadline:
        time.sleep(0.1)
    assert m, sshd.log_text()[-2000:]
    line = m[-1]
    entries = issued_entries(context, oidc.tenant_id("contoso"), line["key_id"])
    assert len(entries) == 1, f"no audit entry for {line['key_id']}"
    assert entries[0].serial == line["serial"]
    assert entries[0].principal == "alice" and entries[0].actor_upn == "alice@contoso.test"
    assert line["key_id"].startswith("ezssh/demo/") and line["key_id"].endswith("/alice@contoso.test")


def test_a_cached_certificate_is_reused_and_ssh_exit_code_passes_through(signed_in, sshd, context, oidc):
    tid = oidc.tenant_id("contoso")
    run_cli(["ssh", "alice@127.0.0.1", *ssh_opts(sshd), "true"], signed_in)
    before = len([e for e in context.service.store.list_audit(tid, limit=100000) if e.action == "certificate.issued"])
    r = run_cli(["ssh", "alice@127.0.0.1", *ssh_opts(sshd), "exit 7"], signed_in)
    assert r.returncode == 7, r.stderr
    after = len([e for e in context.service.store.list_audit(tid, limit=100000) if e.action == "certificate.issued"])
    assert after == before, "a valid cached certificate must be reused, not re-issued"


# ---- sshd refuses what it must ----------------------------------------------------------------


def _user_key(tmp: Path) -> tuple[Path, str]:
    k = ed25519.Ed25519PrivateKey.generate()
    path = tmp / "id_ed25519"
    path.write_bytes(k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                     serialization.NoEncryption()))
    path.chmod(0o600)
    return path, k.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()


def _sign(pub: str, ca_key, principals: list[str], after: int, before: int, key_id: str) -> str:
    cert = (ssh.SSHCertificateBuilder().public_key(ssh.load_ssh_public_key(pub.encode()))
            .serial(int(time.time())).type(ssh.SSHCertificateType.USER).key_id(key_id.encode())
            .valid_principals([p.encode() for p in principals]).valid_after(after).valid_before(before)
            .add_extension(b"permit-pty", b"").sign(ca_key))
    return cert.public_bytes().decode()


def _try_login(sshd, user: str, key: Path, cert_line: str) -> subprocess.CompletedProcess:
    cert = key.with_name(key.name + "-cert.pub")
    cert.write_text(cert_line + "\n")
    return subprocess.run(["ssh", "-i", str(key), "-o", f"CertificateFile={cert}", "-o", "IdentitiesOnly=yes",
                           "-o", "IdentityAgent=none", *sshd.client_options(), *ssh_opts(sshd), f"{user}@127.0.0.1",
                           "whoami"],
                          capture_output=True, text=True, timeout=30)


def _wait_log(sshd, needle: str) -> bool:
    deadline = time.time() + 5
    while time.time() < deadline:
        if needle in sshd.log_text():
            return True
        time.sleep(0.1)
    return False


def test_sshd_accepts_a_policy_ca_certificate_but_refuses_an_expired_one(sshd, context, demo_policy, tmp_path):
    ca = as_private_key(context.service.keys.get_signer(demo_policy.current_ca.key_ref))
    key, pub = _user_key(tmp_path)
    now = int(time.time())
    good = _try_login(sshd, "alice", key, _sign(pub, ca, ["alice"], now - 60, now + 300, "e2e-control"))
    assert good.returncode == 0 and good.stdout.strip() == "alice", good.stderr  # control: same CA works
    r = _try_login(sshd, "alice", key, _sign(pub, ca, ["alice"], now - 7200, now - 3600, "e2e-expired"))
    assert r.returncode == 255 and "Permission denied" in r.stderr
    assert _wait_log(sshd, "Certificate invalid: expired")


def test_sshd_refuses_a_certificate_for_another_principal(sshd, api_server, token_for, tmp_path):
    key, pub = _user_key(tmp_path)
    r = httpx.post(f"{api_server}/api/requests", headers={"Authorization": f"Bearer {token_for('alice')}"},
                   json={"host": "127.0.0.1", "principal": "alice", "public_key": pub}, timeout=30)
    assert r.status_code == 201, r.text
    assert _try_login(sshd, "alice", key, r.json()["certificate"]).returncode == 0
    refused = _try_login(sshd, "bob", key, r.json()["certificate"])
    assert refused.returncode == 255 and "Permission denied" in refused.stderr
    assert _wait_log(sshd, "does not contain an authorized principal") or _wait_log(sshd, "not a listed principal")


def test_sshd_refuses_a_certificate_from_another_ca(sshd, tmp_path):
    rogue = ec.generate_private_key(ec.SECP256R1())
    key, pub = _user_key(tmp_path)
    now = int(time.time())
    r = _try_login(sshd, "alice", key, _sign(pub, rogue, ["alice"], now - 60, now + 300, "e2e-rogue"))
    assert r.returncode == 255 and "Permission denied" in r.stderr
