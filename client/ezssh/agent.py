"""Agent mode: the key and its certificate go to ssh-agent with `ssh-add -t <time left>`, so the agent
drops them when the certificate expires, and `ssh -A` forwards a certificate that works. Stdlib only.

Signing out, `ezssh certs prune`, signing in as another account and configuring another server take
them out again (`ssh-add -d`, on the agent they were added to).

Opt in with `--agent` (ezssh ssh, ezssh cert ensure, ezssh config), `ezssh configure --agent on` (a
setting in config.json) or EZSSH_AGENT=1.
"""

from __future__ import annotations

import json
import os
import time

from . import certs
from .errors import EzsshError
from .home import write_private


def wanted(cfg: dict, flag: bool = False) -> bool:
    env = os.environ.get("EZSSH_AGENT", "").strip().lower()
    if env in ("0", "no", "off", "false"):
        return flag
    return flag or env in ("1", "yes", "on", "true") or bool(cfg.get("agent"))


def add(cached: certs.Cached, now: float | None = None) -> bool:
    """Add the slot's key and certificate to the agent at $SSH_AUTH_SOCK, for the certificate's time
    left. Skipped when this slot was added to this agent already. Returns whether ssh-add ran."""
    import subprocess

    sock = os.environ.get("SSH_AUTH_SOCK")
    if not sock:
        raise EzsshError(
            "Agent mode needs a running ssh-agent, and SSH_AUTH_SOCK is not set.",
            hint="Start one with `eval $(ssh-agent)`, or leave agent mode off.",
        )
    if cached.meta.get("agent_sock") == sock:
        return False
    left = int(cached.valid_before - (time.time() if now is None else now))
    if left <= 0:
        return False
    try:
        r = subprocess.run(
            ["ssh-add", "-q", "-t", str(left), str(cached.key)],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=30,
        )
    except FileNotFoundError:
        raise EzsshError("ssh-add is not installed (OpenSSH's client tools).") from None
    if r.returncode != 0:
        raise EzsshError(f"ssh-add could not add the certificate to the agent: {(r.stderr or '').strip()}")
    meta = {**cached.meta, "agent_sock": sock}
    write_private(cached.dir / certs.META, json.dumps(meta, indent=2, sort_keys=True) + "\n", 0o600)
    cached.meta = meta
    return True
