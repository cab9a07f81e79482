"""A sandbox "host" for the setup script: a root prefix with a Debian-like /etc/ssh, and a real sshd
started from that root's sshd_config, so that what the script writes is what sshd reads."""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from devstack.proc import Proc, free_port, spawn, wait_for_port
from devstack.sshd import SSHD, loopback_options


@dataclass
class SandboxHost:
    root: Path
    port: int = field(default_factory=free_port)
    proc: Proc | None = None
    with_dropin_dir: bool = True

    @property
    def etc(self) -> Path:
        return self.root / "etc" / "ssh"

    @property
    def config(self) -> Path:
        return self.etc / "sshd_config"

    @property
    def reload_log(self) -> Path:
        return self.root / "reloads.log"

    def create(self) -> "SandboxHost":
        self.etc.mkdir(parents=True, exist_ok=True)
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        hk = self.root / "var" / "ssh_host_ed25519_key"
        hk.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(hk)], check=True)
        include = ""
        if self.with_dropin_dir:
            (self.etc / "sshd_config.d").mkdir(exist_ok=True)
            include = f"Include {self.etc}/sshd_config.d/*.conf\n"
        self.config.write_text(
            f"# Debian-like sshd_config for a sandbox host\n{include}"
            + loopback_options(self.port, hk, self.root / "var" / "sshd.pid")
        )
        return self

    def start(self) -> "SandboxHost":
        log = self.root / "var" / "sshd.log"
        self.proc = spawn(f"sandbox-sshd-{self.port}", [SSHD, "-D", "-e", "-f", str(self.config)], log)
        wait_for_port(self.proc, self.port, timeout=15)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()

    def log_text(self) -> str:
        return (self.root / "var" / "sshd.log").read_text(errors="replace")

    def run_setup(self, script: str, **env: str) -> subprocess.CompletedProcess:
        path = self.root.parent / f"setup-{hashlib.sha256(script.encode()).hexdigest()[:8]}.sh"
        path.write_text(script)
        pid = self.proc.pid if self.proc else 0
        full = {k: v for k, v in os.environ.items() if not k.startswith("EZSSH_")}
        full.update({"EZSSH_ROOT": str(self.root),
                     "EZSSH_SSHD_RELOAD": f"echo reload >> {self.reload_log}" + (f"; kill -HUP {pid}" if pid else ""),
                     **env})
        return subprocess.run(["sh", str(path)], capture_output=True, text=True, env=full, timeout=60)

    def reloads(self) -> int:
        return len(self.reload_log.read_text().splitlines()) if self.reload_log.exists() else 0

    def snapshot(self) -> dict[str, tuple[str, int, int]]:
        """Every file under etc/: content hash, mtime (ns) and mode."""
        out = {}
        for p in sorted((self.root / "etc").rglob("*")):
            if p.is_file():
                st = p.stat()
                out[str(p.relative_to(self.root))] = (hashlib.sha256(p.read_bytes()).hexdigest(), st.st_mtime_ns,
                                                      st.st_mode)
        return out

    def wait_reloaded(self, timeout: float = 10.0) -> None:
        """After SIGHUP sshd re-executes itself; wait until it listens again."""
        deadline = time.time() + timeout
        time.sleep(0.2)
        while time.time() < deadline:
            try:
                import socket

                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    if s.recv(64).startswith(b"SSH-"):
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise AssertionError("sandbox sshd did not come back after reload:\n" + self.log_text()[-2000:])

    def login(self, user: str, key: Path, cert_line: str) -> subprocess.CompletedProcess:
        cert = key.with_name(key.name + "-cert.pub")
        cert.write_text(cert_line.strip() + "\n")
        return subprocess.run(
            ["ssh", "-i", str(key), "-o", f"CertificateFile={cert}", "-o", "IdentitiesOnly=yes",
             "-o", "IdentityAgent=none", "-p", str(self.port), "-o", "StrictHostKeyChecking=no",
             "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes", "-o", "LogLevel=ERROR",
             f"{user}@127.0.0.1", "whoami"],
            capture_output=True, text=True, timeout=30)


def user_key(directory: Path, name: str = "id_ed25519") -> tuple[Path, str]:
    k = ed25519.Ed25519PrivateKey.generate()
    path = directory / name
    path.write_bytes(k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                     serialization.NoEncryption()))
    path.chmod(0o600)
    return path, k.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                             serialization.PublicFormat.OpenSSH).decode()
