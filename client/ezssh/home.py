"""The per-user ezssh directory and its config.json. Stdlib only (used on the fast path).

Layout of $EZSSH_HOME (default ~/.ezssh, mode 0700):
    config.json          server URL, CA bundle, identity provider settings (from /api/client-config)
    ca-bundle.pem        copy of --ca-bundle, when one was given
    token_cache.bin      MSAL token cache (msal-extensions; 0600 file, or a libsecret signal file)
    msal_http_cache.bin  MSAL's HTTP cache (the identity provider's discovery documents)
    ssh_config           the block `ezssh config` Includes from ~/.ssh/config
    known_hosts          ezssh's own known hosts (host CAs), named by that block
    certs/<principal>@<host>/  (one account's at a time: signing in as another removes them)
        id_ed25519       private key, OpenSSH format, 0600
        id_ed25519.pub   public key
        id_ed25519-cert.pub  the certificate
        meta.json        valid_before, valid_after, serial, key_id, policy, server, account, ...
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal, overload

from .errors import not_configured

CONFIG = "config.json"
CA_BUNDLE = "ca-bundle.pem"
TOKEN_CACHE = "token_cache.bin"
HTTP_CACHE = "msal_http_cache.bin"  # MSAL's cache of the identity provider's discovery documents


def home_dir(create: bool = True) -> Path:
    env = os.environ.get("EZSSH_HOME")
    path = Path(env).expanduser() if env else Path.home() / ".ezssh"
    if create:
        ensure_private_dir(path)
    return path


def ensure_private_dir(path: Path) -> Path:
    """Create `path` (and parents) if missing; the directory itself is always left at 0700."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if (path.stat().st_mode & 0o777) != 0o700:
        os.chmod(path, 0o700)
    return path


def write_private(path: Path, data: str | bytes, mode: int = 0o600) -> None:
    """Write a file atomically (temp file + rename) with `mode` from the start."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


@overload
def load_config(home: Path | None = None, required: Literal[True] = True) -> dict: ...
@overload
def load_config(home: Path | None, required: bool) -> dict | None: ...
def load_config(home: Path | None = None, required: bool = True) -> dict | None:
    home = home or home_dir()
    try:
        cfg = json.loads((home / CONFIG).read_text())
    except FileNotFoundError:
        if required:
            raise not_configured() from None
        return None
    except (OSError, ValueError) as exc:
        from .errors import EzsshError

        raise EzsshError(f"Cannot read {home / CONFIG}: {exc}") from None
    if required and not cfg.get("server"):
        raise not_configured()
    return cfg


def save_config(cfg: dict, home: Path | None = None) -> Path:
    home = home or home_dir()
    path = home / CONFIG
    write_private(path, json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return path
