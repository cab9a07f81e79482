"""The demo: sign alice in with the real CLI and log in through sshd with an ezssh certificate.

Also used by the end-to-end tests: `cli_env`, `cli_login` and `run_cli` drive the installed `ezssh`
command exactly as a user would, with this module playing the browser for the device code.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

from .oidc import complete_device_code, password_for
from .proc import REPO

DEVICE_LINE = re.compile(r"open (?P<uri>https://\S+) and enter the code (?P<code>[A-Z0-9-]+)")


def ezssh_command() -> list[str]:
    exe = Path(sys.executable).with_name("ezssh")
    if exe.exists():
        return [str(exe)]
    found = shutil.which("ezssh")
    return [found] if found else [sys.executable, "-m", "ezssh"]


def cli_env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EZSSH_")}
    env.update({"EZSSH_HOME": str(home), "EZSSH_ALLOW_DEVICE_LOGIN": "1"})
    env.setdefault("PYTHONPATH", str(REPO / "client"))
    env.update(extra)
    return env


def run_cli(args: list[str], env: dict[str, str], *, username: str | None = None, ca_path: Path | None = None,
            timeout: float = 120, echo: bool = False, command: list[str] | None = None) -> subprocess.CompletedProcess:
    """Run `ezssh ARGS` (or `command ARGS`). If it shows a device code, complete it in the browser
    stand-in as `username`."""
    proc = subprocess.Popen((command or ezssh_command()) + args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, text=True)
    err_lines: list[str] = []
    browser_errors: list[BaseException] = []

    def read_stderr() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            err_lines.append(line)
            if echo:
                sys.stderr.write(line)
                sys.stderr.flush()
            m = DEVICE_LINE.search(line)
            if m and username:
                try:
                    complete_device_code(m["uri"], m["code"], username, password_for(username), ca_path)
                    if echo:
                        sys.stderr.write(f"(devstack: signed in as {username} in the browser stand-in)\n")
                except BaseException as exc:  # noqa: BLE001
                    browser_errors.append(exc)

    out_chunks: list[str] = []

    def read_stdout() -> None:
        assert proc.stdout is not None
        out_chunks.append(proc.stdout.read())

    readers = [threading.Thread(target=fn, daemon=True) for fn in (read_stderr, read_stdout)]
    for t in readers:
        t.start()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    for t in readers:
        t.join(timeout=5)
    out = "".join(out_chunks)
    if browser_errors:
        raise browser_errors[0]
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "".join(err_lines))


def run_demo(stack) -> int:  # type: ignore[no-untyped-def]
    home = stack.state_dir / "demo-home"
    shutil.rmtree(home, ignore_errors=True)
    env = cli_env(home)
    ca = stack.oidc.ca_path
    steps = [
        ("ezssh configure", ["configure", "--server", stack.api_url, "--ca-bundle", str(ca)]),
        ("ezssh login (device code; the demo plays alice's browser)", ["login"]),
        ("ezssh whoami", ["whoami"]),
        # No known_hosts entry for the sshd: it presents a host certificate of the demo policy's host
        # CA, which `ezssh login` fetched; ezssh runs ssh with StrictHostKeyChecking yes.
        (f"ezssh ssh alice@127.0.0.1 -p {stack.ports.sshd} whoami",
         ["ssh", "-e", "alice@127.0.0.1", "-p", str(stack.ports.sshd), "whoami"]),
    ]
    if stack.sshd is None:
        steps = steps[:-1] + [("ezssh ls (where alice may log in)", ["ls"])]
    for title, args in steps:
        print(f"\n$ {title}", file=sys.stderr, flush=True)
        r = run_cli(args, env, username="alice", ca_path=ca, echo=True)
        sys.stdout.write(r.stdout)
        sys.stdout.flush()
        if r.returncode != 0:
            print(f"demo: `{title}` failed with exit code {r.returncode}", file=sys.stderr)
            return r.returncode
    if stack.sshd is None:
        print("\nalice is signed in and the service answers; the SSH login itself needs the local sshd, which\n"
              "only root can run (it logs in as other users). Run `make demo` as root for that step.\n"
              f"Use the CLI: EZSSH_HOME={home} .venv/bin/ezssh whoami\nStop the stack with: make down",
              file=sys.stderr)
        return 0
    print("\nThe remote `whoami` above ran through the real sshd with a certificate ezssh issued; ssh checked\n"
          "the sshd by its host certificate (no host key was trusted on first use).\n"
          f"Try it yourself: EZSSH_HOME={home} .venv/bin/ezssh ssh alice@127.0.0.1 -p {stack.ports.sshd}\n"
          "Stop the stack with: make down", file=sys.stderr)
    return 0
