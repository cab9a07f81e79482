"""Start and stop the local stand-ins as child processes, by PID, on loopback only."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
NODE_BIN = REPO / "node_modules" / ".bin"
# How long a stand-in may take to listen: oidc-provider has taken 5 s on a 2-core machine and over 30 s
# on the same machine under load; 120 s leaves room for that. EZSSH_DEV_STARTUP_TIMEOUT=<seconds> changes it.
STARTUP_TIMEOUT = 120.0


def startup_timeout() -> float:
    raw = os.environ.get("EZSSH_DEV_STARTUP_TIMEOUT", "").strip()
    try:
        return float(raw) if raw and float(raw) > 0 else STARTUP_TIMEOUT
    except ValueError:
        raise StandInError(f"EZSSH_DEV_STARTUP_TIMEOUT={raw!r} is not a number of seconds") from None


class StandInError(RuntimeError):
    """A stand-in could not be started. Tests under CI=true must fail on this, never skip."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


@dataclass
class Proc:
    """A child process we started. `stop()` signals only this PID."""

    name: str
    popen: subprocess.Popen
    log_path: Path
    stop_signal: int = signal.SIGTERM
    extra: dict = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self, timeout: float = 10.0) -> None:
        if not self.alive():
            return
        try:
            os.kill(self.pid, self.stop_signal)
            self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.kill(self.pid, signal.SIGKILL)
            self.popen.wait(timeout=5)
        except ProcessLookupError:
            pass


def spawn(
    name: str,
    argv: list[str],
    log_path: Path,
    *,
    env: dict | None = None,
    cwd: Path | None = None,
    stop_signal: int = signal.SIGTERM,
) -> Proc:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "ab")
    try:
        popen = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=str(cwd) if cwd else None,
            start_new_session=True,
        )
    except OSError as exc:
        raise StandInError(f"{name}: cannot run {argv[0]}: {exc}") from exc
    finally:
        log.close()
    return Proc(name=name, popen=popen, log_path=log_path, stop_signal=stop_signal)


def port_holder(port: int) -> str | None:
    """Who listens on TCP `port` (Linux: the socket's inode in /proc/net/tcp*, then the process whose
    file descriptors hold it): "pid 1234 (cmdline)", or None when that cannot be seen."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if len(f) > 9 and f[3] == "0A" and int(f[1].rsplit(":", 1)[1], 16) == port:  # 0A = LISTEN
                inodes.add(f[9])
    if not inodes:
        return None
    wanted = {f"socket:[{i}]" for i in inodes}
    for pid_dir in Path("/proc").iterdir():
        if not pid_dir.name.isdigit():
            continue
        try:
            fds = list((pid_dir / "fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(fd) in wanted:
                    cmd = (pid_dir / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
                    return f"pid {pid_dir.name} ({cmd[:120] or '?'})"
            except OSError:
                continue
    return "a process this user cannot see"


def require_free(port: int, name: str) -> None:
    if port_open(port):
        holder = port_holder(port)
        raise StandInError(
            f"{name}: 127.0.0.1:{port} is already in use" + (f" by {holder}" if holder else "") +
            ". Stop it (`make down` if it is this project's stack), or pick other ports: "
            "EZSSH_DEV_PORTS=api=17071,sshd=12222,oidc=18443,azurite=20002,azurite_queue=20001 make up")


def wait_for_port(proc: Proc, port: int, timeout: float | None = None) -> None:
    timeout = startup_timeout() if timeout is None else timeout
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise StandInError(
                f"{proc.name} exited with {proc.popen.returncode} before listening on {port}:\n"
                + proc.log_tail()
            )
        if port_open(port):
            time.sleep(0.05)
            if not proc.alive():  # someone else holds the port and ours failed to bind
                raise StandInError(f"{proc.name} exited; 127.0.0.1:{port} is held by another process:\n"
                                   + proc.log_tail())
            return
        time.sleep(0.05)
    proc.stop()
    raise StandInError(f"{proc.name} did not listen on 127.0.0.1:{port} within {timeout:.0f}s. Its output "
                       f"({proc.log_path}):\n{proc.log_tail()}\n{SLOW_HINT}")


SLOW_HINT = ("On a loaded machine start-up takes longer: try again, or allow more time with "
             "EZSSH_DEV_STARTUP_TIMEOUT=300 (seconds); `make status` shows what runs.")
