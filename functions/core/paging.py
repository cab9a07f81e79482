"""Continuation tokens: where a list's next page starts (the position after which it continues),
opaque to clients as base64url of a small JSON object. A token that is not one the service gave out
is refused as a bad request, never a 500."""

from __future__ import annotations

import base64
import binascii
import json
import re

from .errors import InvalidRequest

MAX_TOKEN = 1024


def encode_token(after: str) -> str:
    raw = json.dumps({"after": after}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_token(token: str | None, valid: re.Pattern[str]) -> str | None:
    """The position `token` continues after (None without a token); it must match `valid`."""
    if token is None:
        return None
    after = None
    if 0 < len(token) <= MAX_TOKEN:
        try:
            doc = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
            after = doc.get("after") if isinstance(doc, dict) else None
        except (binascii.Error, ValueError, UnicodeDecodeError):
            after = None
    if not isinstance(after, str) or not valid.fullmatch(after):
        raise InvalidRequest("The continuation token is not valid; start again without it.")
    return after
