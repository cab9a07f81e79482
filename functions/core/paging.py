"""Continuation tokens: where a list's next page starts, opaque to clients (base64url of a small JSON
object). A token that does not decode to an object is refused as a bad request, never a 500."""

from __future__ import annotations

import base64
import binascii
import json

from .errors import InvalidRequest

MAX_TOKEN = 1024


def encode_token(position: dict) -> str:
    raw = json.dumps(position, separators=(",", ":"), sort_keys=True).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def bad_token() -> InvalidRequest:
    return InvalidRequest("The continuation token is not one this service gave out; start again without it.")


def decode_token(token: str) -> dict:
    bad = bad_token()
    if not isinstance(token, str) or not 0 < len(token) <= MAX_TOKEN:
        raise bad
    try:
        value = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise bad from None
    if not isinstance(value, dict):
        raise bad
    return value
