"""Host patterns: what a policy may name (globs, CIDRs, Azure VM or resource group ids, tags) and
whether a host matches one. The one matcher, shared by access requests and host certificates."""

from __future__ import annotations

import fnmatch
import ipaddress
import re

from .errors import InvalidRequest

GLOB_RE = re.compile(r"^[A-Za-z0-9*?.\-_\[\]!]{1,253}$")


_CANONICAL_HOST_RE = re.compile(r"^[a-z0-9.:-]{1,253}$")


def host_matches(pattern: str, host: str, tags: dict[str, str]) -> bool:
    host = host.strip().lower().rstrip(".")
    if not _CANONICAL_HOST_RE.fullmatch(host.strip("[]")) and not pattern.startswith(("tag:", "/subscriptions/")):
        return False  # only normalised names match (fnmatch's * would match a newline)
    if pattern.startswith("tag:"):
        k, _, v = pattern[4:].partition("=")
        return tags.get(k) == v
    if pattern.startswith("/subscriptions/"):
        resource_id = tags.get("_resource_id", "").lower()
        p = pattern.lower()
        return bool(resource_id) and (resource_id == p or resource_id.startswith(p + "/"))
    if "/" in pattern or _looks_like_ip(pattern):
        try:
            return ipaddress.ip_address(host.strip("[]")) in ipaddress.ip_network(pattern, strict=False)
        except ValueError:
            return False
    return fnmatch.fnmatchcase(host, pattern.lower())


def validate_host_pattern(pattern: str) -> None:
    if pattern.startswith("tag:"):
        k, sep, v = pattern[4:].partition("=")
        if not sep or not k or not v:
            raise InvalidRequest(f"Host pattern {pattern!r}: a tag pattern looks like 'tag:name=value'.")
        return
    if pattern.startswith("/subscriptions/"):
        if not re.match(
            r"^/subscriptions/[^/]+/resourceGroups/[^/]+(/providers/Microsoft\.Compute/virtualMachines/[^/]+)?$",
            pattern,
            re.IGNORECASE,
        ):
            raise InvalidRequest(f"Host pattern {pattern!r} is not an Azure VM or resource group id.")
        return
    if "/" in pattern or _looks_like_ip(pattern):
        try:
            ipaddress.ip_network(pattern, strict=True)
        except ValueError:
            raise InvalidRequest(f"Host pattern {pattern!r} is not a valid CIDR (host bits must be zero).") from None
        return
    if not GLOB_RE.match(pattern) or pattern.count("[") != pattern.count("]"):
        raise InvalidRequest(f"Host pattern {pattern!r} is not a valid host name glob.")


def _looks_like_ip(s: str) -> bool:
    return bool(re.match(r"^[0-9.]+$", s)) or ":" in s
