"""A valid certificate for (login, host): the cached one, or a new one from the service.

The cached path reads meta.json only (stdlib); a new certificate loads requests, msal and
cryptography through `issue.obtain`.
"""

from __future__ import annotations

from pathlib import Path

from . import certs


def certificate_for(
    cfg: dict,
    home: Path,
    principal: str,
    host: str,
    *,
    policy: str | None = None,
    ttl: int | None = None,
    reason: str | None = None,
    new: bool = False,
) -> tuple[certs.Cached, str]:
    """(cached slot, "cached certificate" | "new certificate (request ID)")."""
    certs.sweep(home)
    cached = (
        None
        if new
        else certs.find_valid(
            home, principal, host, server=cfg["server"], account=cfg.get("account"), policy=policy, ttl=ttl
        )
    )
    if cached is not None:
        return cached, "cached certificate"
    from .context import Ctx
    from .issue import obtain
    from .sshargs import SshInvocation

    inv = SshInvocation(
        destination=f"{principal}@{host}",
        host=host,
        principal=principal,
        policy=policy,
        ttl=ttl,
        reason=reason,
        new=new,
    )
    cached, issued = obtain(cfg, home, inv, Ctx().api)
    return cached, f"new certificate (request {issued.get('id')})"
