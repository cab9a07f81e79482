"""Keys and certificates cached per (server, principal, host). Stdlib only at import time.

The fast path (`find_valid`, `sweep`) reads meta.json only, so a cached `ezssh ssh` never imports
cryptography. Writing a new key + certificate (`store`) is the slow path and imports it lazily.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

from .home import ensure_private_dir, server_hash, write_private

KEY = "id_ed25519"
PUB = "id_ed25519.pub"
CERT = "id_ed25519-cert.pub"
META = "meta.json"
EXPIRES = "reuse-until"  # valid_before - REUSE_MARGIN as decimal seconds: ssh_config's block reads it in sh
REUSE_MARGIN = 30  # seconds: a certificate is reused while valid_before - 30 s > now
STALE_PARTIAL = 600  # seconds: a directory without meta.json older than this is debris

# Characters kept as they are in slot names; the rest are %XX. ':' (IPv6 hosts) is not a valid file
# name character on Windows; elsewhere it stays, so ssh_config's %r@%h names the same directory.
_SAFE = re.compile(r"[^A-Za-z0-9._@+-]" if os.name == "nt" else r"[^A-Za-z0-9._:@+-]")


def _quote(part: str) -> str:
    q = _SAFE.sub(lambda m: "%%%02X" % ord(m.group()), part)
    return "%2E" + q[1:] if q.startswith(".") else q


def certs_root(home: Path) -> Path:
    return home / "certs"


def slot_dir(home: Path, server: str, principal: str, host: str) -> Path:
    return certs_root(home) / server_hash(server) / f"{_quote(principal)}@{_quote(host)}"


class Cached:
    """A slot directory and its meta.json (a plain class: dataclasses costs ~10 ms of imports)."""

    __slots__ = ("dir", "meta")

    def __init__(self, dir: Path, meta: dict) -> None:  # noqa: A002
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


def find_valid(home: Path, server: str, principal: str, host: str, *, policy: str | None = None,
               now: float | None = None) -> Cached | None:
    """The cached key + certificate for this slot if still good for more than REUSE_MARGIN seconds."""
    d = slot_dir(home, server, principal, host)
    meta = read_meta(d)
    if meta is None:
        return None
    now = time.time() if now is None else now
    if meta["valid_before"] - REUSE_MARGIN <= now:
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


def sweep(home: Path, now: float | None = None) -> list[Path]:
    """Remove every expired key + certificate under certs/ (all servers), and leftover debris."""
    now = time.time() if now is None else now
    root = certs_root(home)
    removed: list[Path] = []
    try:
        servers = list(root.iterdir())
    except OSError:
        return removed
    for srv in servers:
        if not srv.is_dir():
            continue
        for d in list(srv.iterdir()):
            if not d.is_dir():
                continue
            meta = read_meta(d)
            if meta is not None:
                dead = meta["valid_before"] <= now
            else:
                try:
                    dead = now - d.stat().st_mtime > STALE_PARTIAL
                except OSError:
                    dead = False
            if dead:
                remove(d)
                removed.append(d)
        try:
            srv.rmdir()  # only succeeds when empty
        except OSError:
            pass
    return removed


def slots(home: Path):
    """Every slot directory (complete or not) under certs/, all servers."""
    try:
        servers = [s for s in certs_root(home).iterdir() if s.is_dir()]
    except OSError:
        return
    for srv in servers:
        try:
            yield from (d for d in srv.iterdir() if d.is_dir() and not d.name.startswith("."))
        except OSError:
            continue


def remove_all(home: Path) -> None:
    """Every cached key and certificate, of every server (sign-out)."""
    remove(certs_root(home))


def remove_if_expired(d: Path, now: float | None = None) -> bool:
    meta = read_meta(d)
    now = time.time() if now is None else now
    if meta is not None and meta["valid_before"] <= now:
        remove(d)
        return True
    return False


def store(home: Path, server: str, principal: str, host: str, private_openssh: bytes, public_openssh: str,
          certificate: str, meta: dict) -> Cached:
    """Write key (0600), public key, certificate and meta.json into the slot, replacing what was there.

    Everything is written into a sibling temp directory first and renamed into place, so a slot is
    either complete or absent.
    """
    target = slot_dir(home, server, principal, host)
    ensure_private_dir(target.parent)
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
            remove(target)
        os.rename(tmp, target)
    except BaseException:
        remove(tmp)
        raise
    return Cached(target, meta)
