"""A real OpenSSH sshd on loopback with its own config directory: the local "Azure VM".

It trusts the CA keys in `<dir>/trusted_user_ca_keys` and checks `<dir>/revoked_keys` (always a
valid KRL, even empty: a missing RevokedKeys file makes sshd refuse every key). Both files are
re-read at each login, so tests change trust without restarting sshd.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .proc import Proc, StandInError, require_free, spawn, wait_for_port

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


@dataclass
class Sshd:
    proc: Proc
    port: int
    dir: Path
    created_users: list[dict] = field(default_factory=list)  # removed again by stop()

    @property
    def trusted_ca_file(self) -> Path:
        return self.dir / "trusted_user_ca_keys"

    @property
    def revoked_keys_file(self) -> Path:
        return self.dir / "revoked_keys"

    @property
    def known_hosts_file(self) -> Path:
        """`@cert-authority` line(s) of the CA that signed its host certificate (clients' side)."""
        return self.dir / "known_hosts"

    def client_options(self) -> list[str]:
        """ssh options that check this sshd by its host certificate, with no trust on first use."""
        return ["-o", f"UserKnownHostsFile={self.known_hosts_file}", "-o", "StrictHostKeyChecking=yes",
                "-o", "GlobalKnownHostsFile=/dev/null"]

    @property
    def log_path(self) -> Path:
        return self.proc.log_path

    def trust(self, *ca_lines: str) -> None:
        self.trusted_ca_file.write_text("".join(line.strip() + "\n" for line in ca_lines))

    def log_text(self) -> str:
        return self.proc.log_path.read_text(errors="replace")

    def stop(self) -> None:
        self.proc.stop()
        remove_unix_users(self.created_users)
        self.created_users = []


def loopback_options(port: int, host_key: Path, pid_file: Path) -> str:
    """The sshd_config lines every loopback test sshd shares: certificates only, no passwords, no
    authorized_keys, and `StrictModes no` because its files live under /tmp."""
    return f"""Port {port}
ListenAddress 127.0.0.1
HostKey {host_key}
PidFile {pid_file}
AuthorizedKeysFile none
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin no
UsePAM no
StrictModes no
LogLevel VERBOSE
MaxAuthTries 3
"""


def ensure_unix_users(names: list[str]) -> list[dict]:
    """Login users for the demo/tests: each one that is missing is created (root only), with the
    password field '*' (no password login, yet not locked for sshd's key logins). An account that
    exists is left exactly as it is. Returns what was created ({name, uid}), for remove_unix_users."""
    created: list[dict] = []
    missing = []
    for name in names:
        try:
            pwd.getpwnam(name)
        except KeyError:
            missing.append(name)
    if missing and os.geteuid() != 0:
        raise StandInError(f"unix user(s) {', '.join(missing)} are missing and only root can create them "
                           f"(or create them yourself: sudo useradd --create-home -p '*' NAME)")
    try:
        for name in missing:
            r = subprocess.run(["useradd", "--create-home", "--shell", "/bin/sh", "-p", "*", name],
                               capture_output=True, text=True)
            if r.returncode == 9:  # made meanwhile by someone else: theirs, not ours
                continue
            if r.returncode != 0:
                raise StandInError(f"useradd {name} failed: {r.stderr.strip()}")
            created.append({"name": name, "uid": pwd.getpwnam(name).pw_uid})
    except BaseException:
        remove_unix_users(created)
        raise
    return created


def remove_unix_users(created: list[dict]) -> list[str]:
    """Remove the users ensure_unix_users created (and their home directories), each only while the
    account of that name still has the uid it was created with. Returns the names removed."""
    removed = []
    for u in created:
        try:
            if pwd.getpwnam(u["name"]).pw_uid != u["uid"]:
                continue  # not the account we made
        except KeyError:
            continue
        r = subprocess.run(["userdel", "--remove", u["name"]], capture_output=True, text=True)
        if r.returncode in (0, 12):  # 12: the home directory was already gone
            removed.append(u["name"])
        else:  # e.g. 8: a process of that user still runs
            sys.stderr.write(f"devstack: could not remove unix user {u['name']} (which it created): "
                             f"{r.stderr.strip()}; remove it with: userdel --remove {u['name']}\n")
    return removed


def host_key_file(state_dir: Path, name: str = "sshd") -> Path:
    """The private host key of the sshd `name` (made now if missing); its public key is beside it."""
    d = state_dir / name
    d.mkdir(parents=True, exist_ok=True)
    host_key = d / "ssh_host_ed25519_key"
    if not host_key.exists():
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(host_key)], check=True)
    return host_key


def host_key_line(state_dir: Path, name: str = "sshd") -> str:
    """The public host key of the sshd `name` (made now if missing): what a host certificate certifies."""
    return " ".join(host_key_file(state_dir, name).with_suffix(".pub").read_text().split()[:2])


def start_sshd(state_dir: Path, port: int, *, name: str = "sshd", users: list[str] | None = None,
               timeout: float | None = None, host_certificate: str | None = None, host_ca: str | None = None) -> Sshd:
    """An sshd on 127.0.0.1:`port`. With `host_certificate` (an OpenSSH host certificate of its host
    key, see host_key_line) it presents that certificate, as an enrolled host does; `host_ca` (the
    signing CA's public key) goes into `known_hosts_file` as an @cert-authority line for clients."""
    if not os.path.exists(SSHD):
        raise StandInError("sshd is not installed: apt-get install openssh-server")
    if os.geteuid() != 0:
        raise StandInError("the test sshd must run as root to log in as other users")
    require_free(port, name)
    created = ensure_unix_users(users or [])
    try:
        return _start(state_dir, port, name, timeout, host_certificate, host_ca, created)
    except BaseException:
        remove_unix_users(created)
        raise


def _start(state_dir: Path, port: int, name: str, timeout: float | None, host_certificate: str | None,
           host_ca: str | None, created: list[dict]) -> Sshd:
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    d = state_dir / name
    d.mkdir(parents=True, exist_ok=True)
    host_key_line(state_dir, name)
    host_key = d / "ssh_host_ed25519_key"
    host_cert_line = ""
    if host_certificate:
        cert = d / "ssh_host_ed25519_key-cert.pub"
        cert.write_text(host_certificate.strip() + "\n")
        host_cert_line = f"HostCertificate {cert}\n"
    (d / "known_hosts").write_text(f"@cert-authority 127.0.0.1,[127.0.0.1]:* {host_ca.strip()}\n" if host_ca else "")
    trusted = d / "trusted_user_ca_keys"
    if not trusted.exists():
        trusted.write_text("")
    krl = d / "revoked_keys"
    if not krl.exists():
        subprocess.run(["ssh-keygen", "-q", "-k", "-f", str(krl)], check=True, capture_output=True)
    config = d / "sshd_config"
    config.write_text(
        f"""# ezssh local test sshd
TrustedUserCAKeys {trusted}
RevokedKeys {krl}
AuthorizedPrincipalsFile none
Subsystem sftp internal-sftp
{host_cert_line}"""
        + loopback_options(port, host_key, d / "sshd.pid")
    )
    check = subprocess.run([SSHD, "-t", "-f", str(config)], capture_output=True, text=True)
    if check.returncode != 0:
        raise StandInError(f"sshd rejects its config: {check.stderr.strip()}")
    proc = spawn(name, [SSHD, "-D", "-e", "-f", str(config)], state_dir / "logs" / f"{name}.log")
    wait_for_port(proc, port, timeout)
    return Sshd(proc, port, d, created)
