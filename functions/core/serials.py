"""Certificate serials and request ids: one scheme for user and host certificates.

A serial is the time in milliseconds (high 42 bits) and 21 random bits. A user certificate's serial
is fixed when its request is made, and the request id is that serial in 16 hex digits: storage
creates the request row under its id, so a serial is unique in its tenant (hence per CA) by
construction, request ids sort by time, and a certificate is found from its serial, or from the key
id sshd logs, with one point read. A host certificate's serial is drawn the same way when it is
signed. The certificate's own 32-byte random nonce (OpenSSH puts it first in the signed data) keeps
what is signed unpredictable.
"""

from __future__ import annotations

import hashlib
import secrets
import uuid

SERIAL_RANDOM_BITS = 21
_SERIAL_MS_LIMIT = 1 << (63 - SERIAL_RANDOM_BITS)  # milliseconds fit in 42 bits until the year 2109


def new_serial(now: float) -> int:
    """A new certificate serial: milliseconds since the epoch, then 21 random bits (never zero)."""
    ms = int(now * 1000)
    if not 0 <= ms < _SERIAL_MS_LIMIT:
        raise ValueError("the clock is outside the serial's time range")
    return (ms << SERIAL_RANDOM_BITS) | (secrets.randbits(SERIAL_RANDOM_BITS) or 1)


def request_id_of_serial(serial: int) -> str:
    return f"{serial:016x}"


def serial_of_request_id(request_id: str) -> int | None:
    """The serial a request id stands for; None for an id of another shape."""
    if len(request_id) != 16:
        return None
    try:
        serial = int(request_id, 16)
    except ValueError:
        return None
    return serial if 0 < serial < 1 << 63 and request_id == f"{serial:016x}" else None


def new_request_id(now: float) -> str:
    return request_id_of_serial(new_serial(now))


# A request made with an idempotency key that is a UUIDv7 (RFC 9562: the attempt's time in ms, then
# random bits) takes its id from the key: the key's time, then 21 bits of a hash of the tenant, the
# user and the key. A retry of the attempt names the same id, so its insert finds the first answer's
# row: one insert, no separate key row. The key's time must be within this window of the service's
# clock (a retry comes seconds later; ids stay ordered by time within it): older keys are looked up
# on the row they name and otherwise kept in a row of their own; a key from the future is refused.
KEY_TIME_BEHIND_MS = 120_000
KEY_TIME_AHEAD_MS = 30_000


def key_time_ms(key: str) -> int | None:
    """The time a UUIDv7 idempotency key carries (ms since the epoch); None for any other key."""
    if len(key) not in (32, 36):
        return None
    try:
        u = uuid.UUID(key)
    except ValueError:
        return None
    if u.version != 7 or u.variant != uuid.RFC_4122:
        return None
    return u.int >> 80


def keyed_request_id(ms: int, tenant_id: str, owner_oid: str, key: str) -> str:
    """The request id a UUIDv7 key names for this user: its time, then 21 bits of a hash (never zero)."""
    if not 0 <= ms < _SERIAL_MS_LIMIT:
        raise ValueError("the key's time is outside the serial's time range")
    h = hashlib.sha256(f"ezssh-request\0{tenant_id}\0{owner_oid}\0{key}".encode()).digest()
    low = int.from_bytes(h[:4], "big") & ((1 << SERIAL_RANDOM_BITS) - 1)
    return request_id_of_serial((ms << SERIAL_RANDOM_BITS) | (low or 1))


def request_of(key_id: str | None, serial: str | None) -> str | None:
    """The request a user certificate's key id (ezssh/<policy>/<request>/<upn>) or serial names."""
    if key_id:
        parts = key_id.split("/")
        if len(parts) >= 4 and parts[0] == "ezssh" and serial_of_request_id(parts[2]) is not None:
            return parts[2]
    if serial and serial.isdigit() and 0 < int(serial) < 2**63:
        return request_id_of_serial(int(serial))
    return None


def serial_floor(ms: int) -> int:
    """The smallest serial (and so request id) of a request made at or after `ms` milliseconds."""
    return max(0, ms) << SERIAL_RANDOM_BITS
