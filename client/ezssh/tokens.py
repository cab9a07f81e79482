"""The access token already in MSAL's token cache, read without MSAL (slow to import).

Only where the cache is the plain 0600 JSON file (msal-extensions' FilePersistence): an encrypted
cache (libsecret, Keychain, DPAPI) is read through MSAL. Anything unexpected means "no token here",
and the caller signs in / refreshes through MSAL as before. Stdlib only.
"""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path

from .home import TOKEN_CACHE

MARGIN = 300  # seconds: a token that expires sooner is left for MSAL to refresh


def cached_access_token(cfg: dict, home: Path, now: float | None = None) -> str | None:
    try:
        data = json.loads((home / TOKEN_CACHE).read_bytes())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("AccessToken"), dict):
        return None
    now = time.time() if now is None else now
    want = {s.lower() for s in cfg.get("scopes") or []}
    account, tenant = cfg.get("account"), cfg.get("tenant_id")
    best = None
    for at in data["AccessToken"].values():
        try:
            if at.get("client_id") != cfg.get("client_id") or not at.get("secret"):
                continue
            if account and at.get("home_account_id") != account:
                continue
            if tenant and at.get("realm") and at["realm"] != tenant:
                continue
            if not want <= {s.lower() for s in str(at.get("target", "")).split()}:
                continue
            expires = int(at.get("expires_on", 0))
        except (AttributeError, TypeError, ValueError):
            continue
        if expires - MARGIN > now and (best is None or expires > best[0]):
            best = (expires, at["secret"])
    return best[1] if best else None


def claims(token: str) -> dict:
    """Claims of a JWT for DISPLAY only (no signature check: the service verifies tokens)."""
    try:
        payload = token.split(".")[1]
        payload += "=" * (-len(payload) % 4)
        data = json.loads(base64.urlsafe_b64decode(payload))
        return data if isinstance(data, dict) else {}
    except (IndexError, ValueError):
        return {}


def account_of(token: str | None) -> str | None:
    """`<oid>.<tid>` of an access token (the form of config.json's `account`), or None."""
    c = claims(token) if token else {}
    oid, tid = c.get("oid"), c.get("tid")
    return f"{oid}.{tid}" if isinstance(oid, str) and isinstance(tid, str) and oid and tid else None
