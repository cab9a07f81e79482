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
from dataclasses import dataclass
from pathlib import Path

from .proc import Proc, StandInError, require_free, spawn, wait_for_port

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


@dataclass
class Sshd:
    proc: Proc
    port: int
    dir: Path

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


def ensure_unix_users(names: list[str]) -> None:
    """Create login users for the demo/tests (root only). Their password field is '*', not '!'."""
    for name in names:
        try:
            pwd.getpwnam(name)
        except KeyError:
            if os.geteuid() != 0:
                raise StandInError(f"unix user {name!r} is missing and only root can create it") from None
            subprocess.run(["useradd", "--create-home", "--shell", "/bin/sh", name], check=True,
                           capture_output=True)
        if os.geteuid() == 0:
            subprocess.run(["usermod", "-p", "*", name], check=True, capture_output=True)


def host_key_line(state_dir: Path, name: str = "sshd") -> str:
    """The public host key of the sshd `name` (made now if missing): what a host certificate certifies."""
    d = state_dir / name
    d.mkdir(parents=True, exist_ok=True)
    host_key = d / "ssh_host_ed25519_key"
    if not host_key.exists():
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(host_key)], check=True)
    return " ".join((d / "ssh_host_ed25519_key.pub").read_text().split()[:2])


def start_sshd(state_dir: Path, port: int, *, name: str = "sshd", users: list[str] | None = None,
               timeout: float = 15.0, host_certificate: str | None = None, host_ca: str | None = None) -> Sshd:
    """An sshd on 127.0.0.1:`port`. With `host_certificate` (an OpenSSH host certificate of its host
    key, see host_key_line) it presents that certificate, as an enrolled host does; `host_ca` (the
    signing CA's public key) goes into `known_hosts_file` as an @cert-authority line for clients."""
    if not os.path.exists(SSHD):
        raise StandInError("sshd is not installed: apt-get install openssh-server")
    if os.geteuid() != 0:
        raise StandInError("the test sshd must run as root to log in as other users")
    require_free(port, name)
    ensure_unix_users(users or [])
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
    return Sshd(proc, port, d)
