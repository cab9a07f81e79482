"""Identifier shapes shared across the service."""

from __future__ import annotations

import re

GUID = r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"  # to build larger patterns
GUID_RE = re.compile(f"^{GUID}$")


def is_guid(s: object) -> bool:
    """A tenant, object or group id as Entra ID writes it."""
    return isinstance(s, str) and GUID_RE.fullmatch(s) is not None  # fullmatch: "$" would allow a final newline
