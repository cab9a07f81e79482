"""Text that crosses the service's edge: host names, free text people type, network addresses.

Pure (stdlib only). The API normalises with these before anything is stored or compared; policy
validation and notifications use the same rules.
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata

from .errors import InvalidRequest

_BIDI_CONTROLS = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def printable_text(value: object, field_name: str, max_len: int, *, multiline: bool = False) -> str:
    """Text a person typed (a reason, a comment, a name): printable characters only (no control or
    bidirectional-override characters, no lone surrogates), at most `max_len` characters. Newlines
    only where `multiline` says so. Returns it stripped."""
    if not isinstance(value, str):
        raise InvalidRequest(f"'{field_name}' must be a string.")
    if len(value) > max_len:
        raise InvalidRequest(f"'{field_name}' must be at most {max_len} characters.")
    for ch in value:
        if multiline and ch == "\n":
            continue
        cat = unicodedata.category(ch)
        if cat == "Cs":
            raise InvalidRequest(f"'{field_name}' is not valid Unicode text (it holds a lone surrogate).")
        if cat in ("Cc", "Co", "Cn") or ch in _BIDI_CONTROLS or cat in ("Zl", "Zp"):
            raise InvalidRequest(
                f"'{field_name}' may hold printable text only; it holds the control character U+{ord(ch):04X}."
            )
    return value.strip()


def storable_text(value: str, field_name: str) -> str:
    """A string storage can hold: valid Unicode (no lone surrogates)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRequest(f"'{field_name}' is not valid Unicode text (it holds a lone surrogate).") from None
    return value


_LABEL_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")


def normalize_host(value: object) -> str:
    """A host as people type it -> its one canonical form, or InvalidRequest.

    An IP literal (IPv4 dotted quad, or IPv6 with or without brackets, no zone) becomes its normal
    text form; anything else must be a DNS name (RFC 1123 labels, after IDNA): lower-cased, ASCII
    (xn--), without the trailing dot."""
    if not isinstance(value, str):
        raise InvalidRequest("'host' must be a string.")
    if any(unicodedata.category(ch) in ("Cc", "Cs", "Cf", "Zl", "Zp") for ch in value):
        raise InvalidRequest("'host' must be a host name or IP address; it holds control characters.")
    raw = value.strip(" ")
    if not raw or len(raw) > 253 + 2:
        raise InvalidRequest("'host' must be a host name or IP address of at most 253 characters.")
    if any(unicodedata.category(ch) == "Zs" for ch in raw):
        raise InvalidRequest("'host' must be a host name or IP address; it holds spaces or control characters.")
    literal = raw[1:-1] if raw.startswith("[") and raw.endswith("]") else raw
    if ":" in literal or re.fullmatch(r"[0-9.]+", literal):
        if "%" in literal:
            raise InvalidRequest("'host': IPv6 zone ids (%...) are not accepted.")
        try:
            return str(ipaddress.ip_address(literal))
        except ValueError:
            raise InvalidRequest(f"'host' {raw!r} is not a valid IP address.") from None
    name = raw.rstrip(".") if raw.endswith(".") and not raw.endswith("..") else raw
    labels = name.split(".")
    out = []
    for label in labels:
        if not label:
            raise InvalidRequest(f"'host' {raw!r} has an empty label.")
        try:
            ascii_label = label.encode("idna").decode("ascii") if not label.isascii() else label
        except UnicodeError:
            raise InvalidRequest(f"'host' {raw!r} is not a valid internationalised domain name.") from None
        ascii_label = ascii_label.lower()
        if not _LABEL_RE.match(ascii_label):
            raise InvalidRequest(
                f"'host' {raw!r} is not a valid host name: each label is 1-63 letters, digits or hyphens, "
                "not starting or ending with a hyphen."
            )
        out.append(ascii_label)
    host = ".".join(out)
    if len(host) > 253:
        raise InvalidRequest("'host' is longer than 253 characters.")
    if out[-1].isdigit():
        raise InvalidRequest(f"'host' {raw!r} is neither a valid IP address nor a host name.")
    return host


def address_is_public(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """True only for a globally routable unicast address. IPv4-mapped, IPv4-compatible, 6to4, Teredo
    and NAT64 (64:ff9b::/96) forms are judged by the IPv4 address they carry."""
    if isinstance(addr, ipaddress.IPv6Address):
        embedded = None
        if addr.ipv4_mapped is not None:
            embedded = addr.ipv4_mapped
        elif addr.sixtofour is not None:
            embedded = addr.sixtofour
        elif addr.teredo is not None:
            return False  # a tunnel endpoint: never a webhook
        elif addr in ipaddress.ip_network("64:ff9b::/96") or addr in ipaddress.ip_network("64:ff9b:1::/48"):
            embedded = ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
        elif int(addr) >> 32 == 0:  # ::a.b.c.d (deprecated IPv4-compatible) and ::, ::1
            return False
        if embedded is not None:
            return address_is_public(embedded)
    if (
        addr.is_private
        or addr.is_loopback
        or addr.is_link_local
        or addr.is_multicast
        or addr.is_reserved
        or addr.is_unspecified
        or not addr.is_global
    ):
        return False
    # carrier-grade NAT and IETF protocol assignments are not global either
    return not (
        isinstance(addr, ipaddress.IPv4Address)
        and (addr in ipaddress.ip_network("100.64.0.0/10") or addr in ipaddress.ip_network("192.0.0.0/24"))
    )


# ---- webhook destinations ----------------------------------------------------------------------


def validate_webhook_url(url: object, *, allow_loopback_http: bool = False) -> str:
    """A webhook URL an admin may store: https, a host name or a public IP, no user info. Plain http
    only to a loopback address, and only where the deployment allows it (local development)."""
    from urllib.parse import urlsplit

    if not isinstance(url, str) or not url.strip() or len(url) > 2048:
        raise InvalidRequest("'webhook_url' must be an https URL of at most 2048 characters, or null.")
    url = url.strip()
    if any(ord(ch) < 0x21 or ord(ch) == 0x7F or ord(ch) > 0x7E for ch in url):
        raise InvalidRequest("'webhook_url' must be a URL of printable ASCII characters without spaces.")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise InvalidRequest("'webhook_url' is not a valid URL.") from None
    host = (parts.hostname or "").lower()
    if not host:
        raise InvalidRequest("'webhook_url' names no host.")
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        raise InvalidRequest("'webhook_url' must not carry a user name or password.")
    if parts.fragment:
        raise InvalidRequest("'webhook_url' must not have a #fragment.")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    loopback = ip is not None and (
        ip.is_loopback
        or (isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None and ip.ipv4_mapped.is_loopback)
    )
    if parts.scheme == "http":
        if not (allow_loopback_http and loopback):
            raise InvalidRequest("'webhook_url' must be an https URL.")
        return url
    if parts.scheme != "https":
        raise InvalidRequest("'webhook_url' must be an https URL.")
    if port == 0:
        raise InvalidRequest("'webhook_url' has port 0.")
    if ip is not None and not address_is_public(ip) and not (allow_loopback_http and loopback):
        raise InvalidRequest("'webhook_url' points at a private, loopback or otherwise non-public address.")
    if ip is None:
        if host == "localhost" or host.endswith(".localhost") or host.endswith(".local") or "." not in host:
            raise InvalidRequest("'webhook_url' must name a public host (a fully qualified domain name).")
        try:
            normalize_host(host)
        except InvalidRequest:
            raise InvalidRequest("'webhook_url' has an invalid host name.") from None
    return url
