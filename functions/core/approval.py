"""The access request state machine.

    pending --approve x N--> approved --certificate--> issued
       |  \\--deny--> denied
       |   \\--cancel--> cancelled
       \\--time--> expired        (approved also expires if no certificate is fetched in time)

Every function returns a new record; storage writes it conditionally on the ETag it was read with,
so two racing transitions cannot both win.

Request ids and serials: a request's certificate serial is fixed when the request is made, and the
request id is that serial in 16 hex digits. The serial is the time in milliseconds (high 42 bits)
and 21 random bits; storage creates the request row under its id, so a serial is unique in its
tenant (hence per CA) by construction, request ids sort by time, and a certificate is found from its
serial, or from the key id sshd logs, with one point read. The certificate's own 32-byte random
nonce (OpenSSH puts it first in the signed data) keeps what is signed unpredictable.
"""

from __future__ import annotations

import hashlib
import secrets
import uuid
from dataclasses import dataclass, field, replace

from .errors import Conflict, Forbidden
from .policy import Identity

PENDING, APPROVED, DENIED, EXPIRED, CANCELLED, ISSUED = (
    "pending",
    "approved",
    "denied",
    "expired",
    "cancelled",
    "issued",
)
FINAL_STATES = frozenset({DENIED, EXPIRED, CANCELLED, ISSUED})
OPEN_STATES = frozenset({PENDING, APPROVED})
ISSUE_WINDOW = 15 * 60  # an approved request must be turned into a certificate within this
SERIAL_RANDOM_BITS = 21
_SERIAL_MS_LIMIT = 1 << (63 - SERIAL_RANDOM_BITS)  # milliseconds fit in 42 bits until the year 2109


def request_serial(now: float) -> int:
    """A new request's serial: milliseconds since the epoch, then 21 random bits (never zero)."""
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
    return request_id_of_serial(request_serial(now))


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


NAME_MAX = 256  # a display name is the token's `name` claim, kept as it was when the person acted


def display_name(who: Identity) -> str:
    """What to call `who` on pages and cards (never used to decide anything: oid+tid do that)."""
    return " ".join("".join(c if c.isprintable() else " " for c in who.name).split())[:NAME_MAX]


@dataclass(frozen=True)
class Approval:
    oid: str
    tid: str
    upn: str
    at: int
    comment: str | None = None
    name: str = ""

    def to_dict(self) -> dict:
        return {"oid": self.oid, "tid": self.tid, "upn": self.upn, "name": self.name, "at": self.at,
                "comment": self.comment}


@dataclass(frozen=True)
class RequestRecord:
    id: str
    tenant_id: str
    policy_id: str
    requester_oid: str
    requester_upn: str
    host: str
    principal: str
    ttl_seconds: int
    state: str
    created_at: int
    expires_at: int
    approvals_required: int = 0
    reason: str | None = None
    approvals: tuple[Approval, ...] = ()
    decided_by: str | None = None  # upn of whoever ended it (deny/cancel) or the last approver
    decided_by_oid: str | None = None  # and their object id (in the request's tenant): who, not a name
    decided_at: int | None = None
    comment: str | None = None
    serial: int | None = None
    key_id: str | None = None
    audit_head: str = "0" * 64  # hash of the last audit entry in this request's chain
    audit_seq: int = 0  # that entry's sequence number
    requester_name: str = ""  # display names, from the token of each person when they acted
    decided_by_name: str = ""
    etag: str | None = field(default=None, compare=False)
    # Whether storage holds this request's index rows (open requests per policy and per user, the
    # user's history, the expiry key). False only for a row written before the indexes existed and
    # not yet backfilled: its next write adds them instead of updating them.
    indexed: bool = field(default=True, compare=False, repr=False)

    def requester_is(self, who: Identity) -> bool:
        return who.oid == self.requester_oid and who.tid == self.tenant_id

    def effective_state(self, now: int) -> str:
        """The state as of `now`: a pending or approved request past its deadline is expired."""
        if self.state in (PENDING, APPROVED) and now >= self.expires_at:
            return EXPIRED
        return self.state

    def to_public(self, now: int) -> dict:
        return {
            "id": self.id,
            "status": self.effective_state(now),
            "policy": self.policy_id,
            "host": self.host,
            "principal": self.principal,
            "ttl_seconds": self.ttl_seconds,
            "reason": self.reason,
            "requester": self.requester_upn,
            "requester_name": self.requester_name or None,
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            "approvals_required": self.approvals_required,
            "approvals": [a.to_dict() for a in self.approvals],
            "decided_by": self.decided_by,
            "decided_by_name": self.decided_by_name or None,
            "decided_at": self.decided_at,
            "comment": self.comment,
            "serial": str(self.serial) if self.serial is not None else None,
            "key_id": self.key_id,
        }


def _require_state(rec: RequestRecord, now: int, *allowed: str) -> None:
    state = rec.effective_state(now)
    if state not in allowed:
        if state in (APPROVED, DENIED, CANCELLED) and rec.decided_by:
            # a decision that lost the race says which one won, and whose it was
            raise Conflict(f"Request {rec.id} was already {state} by {rec.decided_by}; it is no longer {' or '.join(allowed)}.",
                           state=state, decided_by=rec.decided_by, decided_at=rec.decided_at)
        raise Conflict(f"Request {rec.id} is {state}, not {' or '.join(allowed)}.", state=state)


def already_decided(rec: RequestRecord, who: Identity, action: str) -> bool:
    """True if `rec` already records this very decision by `who` (a retry, e.g. after its answer
    was lost): the recorded outcome is the answer, and nothing is written again."""
    if action == "approve":
        return any(a.oid == who.oid and a.tid == who.tid for a in rec.approvals)
    if action == "deny":
        return rec.state == DENIED and rec.decided_by_oid == who.oid and rec.tenant_id == who.tid
    if action == "cancel":
        return rec.state == CANCELLED and rec.requester_is(who)
    return False


def approve(rec: RequestRecord, who: Identity, now: int, *, comment: str | None = None) -> RequestRecord:
    """Add `who`'s approval. The caller has already checked that `who` is an approver."""
    if rec.requester_is(who):
        raise Forbidden("Nobody approves their own request.")
    _require_state(rec, now, PENDING)
    if any(a.oid == who.oid and a.tid == who.tid for a in rec.approvals):
        raise Conflict("You have already approved this request; an approver counts once.")
    approvals = rec.approvals + (Approval(who.oid, who.tid, who.upn, now, comment, display_name(who)),)
    if len(approvals) >= rec.approvals_required:
        return replace(
            rec,
            approvals=approvals,
            state=APPROVED,
            decided_by=who.upn,
            decided_by_oid=who.oid,
            decided_by_name=display_name(who),
            decided_at=now,
            expires_at=now + ISSUE_WINDOW,
        )
    return replace(rec, approvals=approvals)


def deny(rec: RequestRecord, who: Identity, now: int, *, comment: str | None = None) -> RequestRecord:
    if rec.requester_is(who):
        raise Forbidden("Cancel your own request instead of denying it.")
    # A decision is final: once approved, a late deny gets 409 (revoke the certificate instead),
    # so when approve and deny race exactly one of them succeeds, whatever the timing.
    _require_state(rec, now, PENDING)
    return replace(rec, state=DENIED, decided_by=who.upn, decided_by_oid=who.oid, decided_by_name=display_name(who),
                   decided_at=now, comment=comment)


def cancel(rec: RequestRecord, who: Identity, now: int, *, comment: str | None = None) -> RequestRecord:
    if not rec.requester_is(who):
        raise Forbidden("Only the requester may cancel a request.")
    _require_state(rec, now, PENDING, APPROVED)
    return replace(rec, state=CANCELLED, decided_by=who.upn, decided_by_oid=who.oid, decided_by_name=display_name(who),
                   decided_at=now, comment=comment)


def expire(rec: RequestRecord, now: int) -> RequestRecord:
    if rec.effective_state(now) != EXPIRED or rec.state == EXPIRED:
        raise Conflict(f"Request {rec.id} is not past its deadline.")
    return replace(rec, state=EXPIRED, decided_at=now)


def mark_issued(rec: RequestRecord, who: Identity, now: int, *, serial: int, key_id: str) -> RequestRecord:
    if not rec.requester_is(who):
        raise Forbidden("Only the requester may fetch the certificate for a request.")
    _require_state(rec, now, APPROVED)
    return replace(rec, state=ISSUED, serial=serial, key_id=key_id)
