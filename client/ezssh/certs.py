"""Keys and certificates cached per (principal, host), each bound to the account that got it. Stdlib
only at import time.

A slot is `certs/<principal>@<host>/`: the same path whatever the server or the account, so the
ssh_config block of `ezssh config` names no server and no account. Its meta.json records the server
and the signed-in account (MSAL's home account id, `<oid>.<tid>`) it was issued to: `find_valid` uses
a slot only for that server and account, and signing in as someone else or configuring another server
removes the others' keys from disk and from ssh-agent (`forget_others`), before anything can use them.

The fast path (`find_valid`, `sweep`) reads meta.json only, so a cached `ezssh ssh` never imports
cryptography. Writing a new key + certificate (`store`) is the slow path and imports it lazily.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

from .home import ensure_private_dir, write_private

KEY = "id_ed25519"
PUB = "id_ed25519.pub"
CERT = "id_ed25519-cert.pub"
META = "meta.json"
EXPIRES = "reuse-until"  # valid_before - REUSE_MARGIN as decimal seconds: ssh_config's block reads it in sh
REUSE_MARGIN = 30  # seconds: a certificate is reused while valid_before - 30 s > now
STALE_PARTIAL = 600  # seconds: a directory without meta.json older than this is debris
TTL_SLACK = 60  # seconds: the service's clock may run ahead of ours by this much

# Characters kept as they are in slot names; the rest are %XX. ':' (IPv6 hosts) is not a valid file
# name character on Windows; elsewhere it stays, so ssh_config's %r@%h names the same directory.
_SAFE = re.compile(r"[^A-Za-z0-9._@+-]" if os.name == "nt" else r"[^A-Za-z0-9._:@+-]")


def _quote(part: str) -> str:
    q = _SAFE.sub(lambda m: f"%{ord(m.group()):02X}", part)
    return "%2E" + q[1:] if q.startswith(".") else q


def certs_root(home: Path) -> Path:
    return home / "certs"


def slot_dir(home: Path, principal: str, host: str) -> Path:
    return certs_root(home) / f"{_quote(principal)}@{_quote(host)}"


def same_server(a: object, b: object) -> bool:
    return isinstance(a, str) and isinstance(b, str) and a.rstrip("/").lower() == b.rstrip("/").lower()


class Cached:
    """A slot directory and its meta.json (a plain class: dataclasses is slow to import)."""

    __slots__ = ("dir", "meta")

    def __init__(self, dir: Path, meta: dict) -> None:
        self.dir = dir
        self.meta = meta

    @property
    def key(self) -> Path:
        return self.dir / KEY

    @property
    def cert(self) -> Path:
        return self.dir / CERT

    @property
    def valid_before(self) -> int:
        return int(self.meta["valid_before"])


def read_meta(d: Path) -> dict | None:
    try:
        meta = json.loads((d / META).read_text())
        int(meta["valid_before"])
        return meta
    except (OSError, ValueError, KeyError, TypeError):
        return None


def find_valid(
    home: Path,
    principal: str,
    host: str,
    *,
    server: str,
    account: str | None,
    policy: str | None = None,
    ttl: int | None = None,
    now: float | None = None,
) -> Cached | None:
    """The cached key + certificate for this slot if it answers what is asked: issued to `account` on
    `server` for exactly this principal and host (and `policy` when named), good for more than
    REUSE_MARGIN seconds, and, with `ttl`, expiring no later than a new one would (now + ttl) with at
    least half of `ttl` left."""
    d = slot_dir(home, principal, host)
    meta = read_meta(d)
    if meta is None or not account:
        return None
    if meta.get("account") != account or not same_server(meta.get("server"), server):
        return None
    if meta.get("principal") != principal or meta.get("host") != host:
        return None
    now = time.time() if now is None else now
    left = meta["valid_before"] - now
    if left <= REUSE_MARGIN:
        return None
    if ttl is not None and not (ttl / 2 <= left <= ttl + TTL_SLACK):
        return None
    if policy is not None and meta.get("policy") != policy:
        return None
    key, cert = d / KEY, d / CERT
    try:
        if not cert.is_file() or (key.stat().st_mode & 0o077):
            return None  # ssh ignores a private key others can read; get a new one
    except OSError:
        return None
    return Cached(d, meta)


def remove(d: Path) -> None:
    import shutil

    shutil.rmtree(d, ignore_errors=True)


def agent_delete(public_key: Path, certificate: Path, sock: str) -> bool:
    """Take a key and its certificate out of the agent at `sock` (`ssh-add -d`), where they were added.
    An agent that is gone, or no longer holds them, is fine: returns whether the agent removed them."""
    import subprocess

    if not os.path.exists(sock):
        return False
    env = {**os.environ, "SSH_AUTH_SOCK": sock}
    try:
        r = subprocess.run(
            ["ssh-add", "-q", "-d", str(public_key), str(certificate)],
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return r.returncode == 0


def discard(d: Path) -> None:
    """Take a slot out of the ssh-agent it was added to (if any), then off the disk."""
    meta = read_meta(d)
    if meta is not None and meta.get("agent_sock"):
        agent_delete(d / PUB, d / CERT, meta["agent_sock"])
    remove(d)


def _legacy(d: Path) -> bool:
    """A directory of the earlier layout (certs/<server hash>/<principal>@<host>/)."""
    return "@" not in d.name and not d.name.startswith(".")


def sweep(home: Path, now: float | None = None) -> list[Path]:
    """Remove every expired key + certificate under certs/, and leftover debris. (The agent drops an
    expired one itself: it was added with `ssh-add -t <time left>`.)"""
    now = time.time() if now is None else now
    removed: list[Path] = []
    try:
        entries = [d for d in certs_root(home).iterdir() if d.is_dir()]
    except OSError:
        return removed
    for d in entries:
        meta = read_meta(d)
        if meta is not None:
            dead = meta["valid_before"] <= now
        elif _legacy(d):
            dead = True
        else:
            try:
                dead = now - d.stat().st_mtime > STALE_PARTIAL
            except OSError:
                dead = False
        if dead:
            if meta is None and _legacy(d):
                for old in [c for c in d.iterdir() if c.is_dir()]:
                    discard(old)  # out of the agent too: no later sign-out would find it
            remove(d)
            removed.append(d)
    return removed


def slots(home: Path):
    """Every slot directory (complete or not) under certs/."""
    try:
        yield from (
            d for d in certs_root(home).iterdir() if d.is_dir() and not d.name.startswith(".") and not _legacy(d)
        )
    except OSError:
        return


def remove_all(home: Path) -> int:
    """Every cached key and certificate, from the agent and the disk (sign-out). Returns how many."""
    n = 0
    for d in list(slots(home)):
        discard(d)
        n += 1
    remove(certs_root(home))
    return n


def forget_others(home: Path, server: str, account: str | None) -> int:
    """Remove (agent and disk) every slot not issued to `account` on `server`: after an account
    switch or a change of server, nothing of the one before stays usable. Returns how many."""
    n = 0
    for d in list(slots(home)):
        meta = read_meta(d) or {}
        if not account or meta.get("account") != account or not same_server(meta.get("server"), server):
            discard(d)
            n += 1
    return n


def remove_if_expired(d: Path, now: float | None = None) -> bool:
    meta = read_meta(d)
    now = time.time() if now is None else now
    if meta is not None and meta["valid_before"] <= now:
        remove(d)
        return True
    return False


def store(
    home: Path, principal: str, host: str, private_openssh: bytes, public_openssh: str, certificate: str, meta: dict
) -> Cached:
    """Write key (0600), public key, certificate and meta.json into the slot, replacing what was there.

    Everything is written into a sibling temp directory first and renamed into place, so a slot is
    either complete or absent.
    """
    target = slot_dir(home, principal, host)
    ensure_private_dir(certs_root(home))
    tmp = target.parent / f".new-{os.getpid()}-{int(time.time() * 1000)}"
    ensure_private_dir(tmp)
    try:
        write_private(tmp / KEY, private_openssh, 0o600)
        write_private(tmp / PUB, public_openssh.strip() + "\n", 0o644)
        write_private(tmp / CERT, certificate.strip() + "\n", 0o644)
        write_private(tmp / META, json.dumps(meta, indent=2, sort_keys=True) + "\n", 0o600)
        write_private(tmp / EXPIRES, f"{int(meta['valid_before']) - REUSE_MARGIN}\n", 0o600)
        if target.exists():
            discard(target)
        os.rename(tmp, target)
    except BaseException:
        remove(tmp)
        raise
    return Cached(target, meta)
