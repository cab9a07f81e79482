"""ezssh's own known hosts: the host CAs of the policies you may use, so ssh checks hosts by their
host certificates instead of trusting a key on first use. Stdlib only (used on the fast path).

    $EZSSH_HOME/known_hosts        `@cert-authority <patterns> <host CA key>` lines (GET /api/known-hosts)
    $EZSSH_HOME/known_hosts.krl    revoked host certificates of those CAs (a KRL, for RevokedHostKeys)
    $EZSSH_HOME/known_hosts.etag   the answer's ETag (If-None-Match on the next refresh)

`refresh(api, home)` rewrites both (on login, on `ezssh ssh` when older than STALE_AFTER, with
`ezssh hosts trust`). For a host the patterns cover, `ssh_options(home, host)` makes ssh read this file
before ~/.ssh/known_hosts with `StrictHostKeyChecking yes` and the KRL as `RevokedHostKeys`: a host
with a certificate from its policy's host CA connects with no prompt, any other key is refused.
"""

from __future__ import annotations

import base64
import fnmatch
import os
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .api import Api

KNOWN_HOSTS = "known_hosts"  # the same file `ezssh config`'s ssh_config block names
KRL = "known_hosts.krl"
ETAG = "known_hosts.etag"  # the ETag of the answer both files came from
STALE_AFTER = 3600
# An empty KRL (OpenSSH PROTOCOL.krl): magic, format 1, krl_version 0, date 0, flags 0, "", "".
EMPTY_KRL = b"SSHKRL\n\x00" + struct.pack(">IQQQII", 1, 0, 0, 0, 0, 0)
REFUSALS = ("Host key verification failed", "REMOTE HOST IDENTIFICATION HAS CHANGED", "revoked by file")


def paths(home: Path) -> tuple[Path, Path]:
    return home / KNOWN_HOSTS, home / KRL


def write(home: Path, known_hosts: str, krl: bytes) -> None:
    from .home import write_private

    known, krl_path = paths(home)
    if not krl.startswith(b"SSHKRL\n\x00"):
        krl = EMPTY_KRL
    write_private(krl_path, krl, 0o644)  # the KRL first: ssh refuses every host if it is missing
    write_private(known, known_hosts, 0o644)


def ensure_files(home: Path) -> None:
    """Both files exist (empty until the first refresh): ssh_config may name them already."""
    known, krl_path = paths(home)
    if not krl_path.exists():
        write(home, known.read_text() if known.exists() else "", EMPTY_KRL)
    elif not known.exists():
        from .home import write_private

        write_private(known, "", 0o644)


def refresh(api: Api, home: Path) -> int:
    """Fetch the host CAs and host revocations of the policies the signed-in user may use. The
    answer's ETag is kept (known_hosts.etag); the next refresh sends it as If-None-Match, and an
    unchanged answer (304, no body) keeps both files, marked fresh."""
    known, krl_path = paths(home)
    tag_path = home / ETAG
    tag = _read(tag_path) if known.exists() and krl_path.exists() else ""
    resp = api.call("GET", "/api/known-hosts", ok=(200, 304), headers={"If-None-Match": tag} if tag else None)
    if resp.status_code == 304:
        now = time.time()
        for f in (known, krl_path):
            os.utime(f, (now, now))
        text = _read(known)
    else:
        data = resp.json()
        text = str(data.get("known_hosts") or "")
        try:
            krl = base64.b64decode(str(data.get("krl") or ""), validate=True)
        except ValueError:
            krl = EMPTY_KRL
        write(home, text, krl)
        from .home import write_private

        write_private(tag_path, str(resp.headers.get("etag") or ""), 0o644)
    return sum(1 for line in text.splitlines() if line.startswith("@cert-authority "))


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def is_stale(home: Path, now: float | None = None) -> bool:
    known, krl_path = paths(home)
    try:
        age = (now or time.time()) - min(known.stat().st_mtime, krl_path.stat().st_mtime)
    except OSError:
        return True
    return age > STALE_AFTER


def refresh_if_stale(home: Path, api_factory: Callable[[], Api | None]) -> None:
    """Best effort: a failed refresh keeps the last good files and says so."""
    if not is_stale(home):
        return
    from .errors import EzsshError

    try:
        api = api_factory()
        if api is None:
            return  # not signed in (cheaply known): the next sign-in or new certificate refreshes
        refresh(api, home)
    except EzsshError as exc:
        print(f"ezssh: could not refresh the host CAs ({exc}); using the last ones fetched", file=sys.stderr)


def api_if_signed_in() -> Api | None:
    """The API only with an access token read without MSAL (a cached path stays light), else None."""
    from .context import Ctx
    from .tokens import cached_access_token

    ctx = Ctx()
    return ctx.api if cached_access_token(ctx.cfg, ctx.home) else None


def full_api() -> Api:
    from .context import Ctx

    return Ctx().api


def patterns(home: Path) -> list[tuple[str, str]]:
    """(pattern, policy) for every @cert-authority line."""
    known, _ = paths(home)
    out: list[tuple[str, str]] = []
    try:
        text = known.read_text()
    except OSError:
        return out
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[0] == "@cert-authority":
            policy = parts[4].split(":", 1)[1] if len(parts) >= 5 and ":" in parts[4] else ""
            out += [(p, policy) for p in parts[1].split(",")]
    return out


def covering_policies(home: Path, host: str) -> list[str]:
    """The policies whose host CA vouches for `host` (ssh's glob match, case-insensitive)."""
    h = host.lower()
    return sorted({pol for pat, pol in patterns(home) if not pat.startswith("[") and fnmatch.fnmatchcase(h, pat)})


def _quote(p: Path | str) -> str:
    s = str(p)
    return f'"{s}"' if any(c.isspace() for c in s) else s


def ssh_options(home: Path, host: str) -> list[str]:
    """ssh options that check `host` against the host CAs, or [] when none covers it."""
    if not covering_policies(home, host):
        return []
    known, krl = paths(home)
    if not krl.exists():
        return []
    return [
        "-o",
        f"UserKnownHostsFile={_quote(known)} ~/.ssh/known_hosts",
        "-o",
        "StrictHostKeyChecking=yes",
        "-o",
        f"RevokedHostKeys={_quote(krl)}",
    ]


def refusal_message(stderr: str, host: str, policies: list[str]) -> str | None:
    """One clear sentence when ssh refused the host's key."""
    if not any(r in stderr for r in REFUSALS):
        return None
    which = ", ".join(policies) or "its policy"
    if "revoked" in stderr:
        return (
            f"ezssh: {host}'s host certificate was revoked, so ssh refused to connect. "
            f"Ask an admin of policy {which} to enrol it again."
        )
    return (
        f"ezssh: {host} did not present a host certificate from the host CA of policy {which}, so ssh refused "
        "to connect (StrictHostKeyChecking yes). Someone may be in the middle; or the host is not enrolled "
        f"yet: an admin enrols it with `ezssh hosts token {host}`."
    )


def run_ssh_watching(argv: list[str], env: dict[str, str]) -> tuple[int, str]:
    """Run ssh sharing the terminal, its stderr passed through as it comes and kept (the last 64 KiB)
    to explain a refused host key. Returns (exit code, stderr). Ctrl-C goes to ssh alone."""
    import signal

    r, w = os.pipe()
    old_int = signal.signal(signal.SIGINT, lambda *_: None)
    old_quit = signal.signal(signal.SIGQUIT, lambda *_: None)
    try:
        try:
            if hasattr(os, "posix_spawnp"):
                pid = os.posix_spawnp(
                    argv[0], argv, env, file_actions=[(os.POSIX_SPAWN_DUP2, w, 2), (os.POSIX_SPAWN_CLOSE, r)]
                )
            else:  # pragma: no cover - Windows
                import subprocess

                proc = subprocess.Popen(argv, env=env, stderr=w)
                pid = proc.pid
        except BaseException:
            os.close(r)
            os.close(w)
            raise
        os.close(w)
        kept = b""
        out = getattr(sys.stderr, "buffer", None)
        with os.fdopen(r, "rb", buffering=0) as f:
            while True:
                chunk = f.read(4096)
                if not chunk:
                    break
                if out is not None:
                    out.write(chunk)
                    out.flush()
                kept = (kept + chunk)[-65536:]
        _, status = os.waitpid(pid, 0)
        rc = os.waitstatus_to_exitcode(status)
    finally:
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGQUIT, old_quit)
    return (128 - rc if rc < 0 else rc), kept.decode(errors="replace")
