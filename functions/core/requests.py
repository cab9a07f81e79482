"""The access request state machine.

    pending --approve x N--> approved --certificate--> issued
       |  \\--deny--> denied
       |   \\--cancel--> cancelled
       \\--time--> expired        (approved also expires if no certificate is fetched in time)

Every function returns a new record; storage writes it conditionally on the ETag it was read with,
so two racing transitions cannot both win.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

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

    def to_dict(self) -> dict[str, Any]:
        return {
            "oid": self.oid,
            "tid": self.tid,
            "upn": self.upn,
            "name": self.name,
            "at": self.at,
            "comment": self.comment,
        }


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

    def to_public(self, now: int) -> dict[str, Any]:
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
            raise Conflict(
                f"Request {rec.id} was already {state} by {rec.decided_by}; it is no longer {' or '.join(allowed)}.",
                state=state,
                decided_by=rec.decided_by,
                decided_at=rec.decided_at,
            )
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
        return replace(_decided(rec, who, now, APPROVED), approvals=approvals, expires_at=now + ISSUE_WINDOW)
    return replace(rec, approvals=approvals)


def deny(rec: RequestRecord, who: Identity, now: int, *, comment: str | None = None) -> RequestRecord:
    if rec.requester_is(who):
        raise Forbidden("Cancel your own request instead of denying it.")
    # A decision is final: once approved, a late deny gets 409 (revoke the certificate instead),
    # so when approve and deny race exactly one of them succeeds, whatever the timing.
    _require_state(rec, now, PENDING)
    return replace(_decided(rec, who, now, DENIED), comment=comment)


def cancel(rec: RequestRecord, who: Identity, now: int, *, comment: str | None = None) -> RequestRecord:
    if not rec.requester_is(who):
        raise Forbidden("Only the requester may cancel a request.")
    _require_state(rec, now, PENDING, APPROVED)
    return replace(_decided(rec, who, now, CANCELLED), comment=comment)


def _decided(rec: RequestRecord, who: Identity, now: int, state: str) -> RequestRecord:
    """`rec` moved to `state` by `who` at `now`: their name, object id and display name on record."""
    return replace(
        rec,
        state=state,
        decided_by=who.upn,
        decided_by_oid=who.oid,
        decided_by_name=display_name(who),
        decided_at=now,
    )


def expire(rec: RequestRecord, now: int) -> RequestRecord:
    if rec.effective_state(now) != EXPIRED or rec.state == EXPIRED:
        raise Conflict(f"Request {rec.id} is not past its deadline.")
    return replace(rec, state=EXPIRED, decided_at=now)


def mark_issued(rec: RequestRecord, who: Identity, now: int, *, serial: int, key_id: str) -> RequestRecord:
    if not rec.requester_is(who):
        raise Forbidden("Only the requester may fetch the certificate for a request.")
    _require_state(rec, now, APPROVED)
    return replace(rec, state=ISSUED, serial=serial, key_id=key_id)
