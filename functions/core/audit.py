"""Audit entries.

One entry per request, decision, issuance, refusal, revocation, policy change and enrolment. Each
entry carries a SHA-256 over its canonical JSON and the hash of the entry before it in the same
chain. Chains are per request (its request, decisions and certificate link in order) and per policy
for administrative changes, so concurrent requests never contend for one global chain head, while
any edit or deletion inside a chain is detectable by `verify_chain`.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import Field, dataclass, field, fields, replace
from typing import Any, ClassVar, Protocol, TypedDict, TypeVar

GENESIS = "0" * 64


class Chained(Protocol):
    """What holds a chain's head (a request or policy row, both dataclasses): the last entry's hash and
    sequence number."""

    __dataclass_fields__: ClassVar[dict[str, Field[Any]]]

    @property
    def audit_head(self) -> str: ...

    @property
    def audit_seq(self) -> int: ...


class AuditFields(TypedDict, total=False):
    """What a use case says about its action in an entry (the keywords of service.Base.audit_entry;
    the tenant, time and actor come from the caller's identity and the clock)."""

    request_id: str | None
    policy_id: str | None
    key_id: str | None
    serial: str | None
    host: str | None
    principal: str | None
    error_code: str | None
    message: str | None
    details: dict[str, Any]
    chain: str | None


@dataclass(frozen=True)
class AuditEntry:
    tenant_id: str
    at: float  # unix seconds with sub-second precision
    action: str  # request.created, request.approved, certificate.issued, <use case>.refused, ...
    outcome: str  # ok | refused | error
    actor_oid: str | None = None
    actor_upn: str | None = None
    request_id: str | None = None
    policy_id: str | None = None
    key_id: str | None = None
    serial: str | None = None  # decimal string: 63-bit values do not survive JSON numbers everywhere
    host: str | None = None
    principal: str | None = None
    error_code: str | None = None
    message: str | None = None
    details: dict[str, Any] = field(default_factory=dict)
    chain: str | None = None  # which chain this links into, e.g. "req:<id>" or "pol:<id>"
    prev_hash: str = GENESIS
    seq: int = 0  # its place in its chain (0 first): entries of one chain keep their written order
    entry_id: str = field(default_factory=lambda: secrets.token_hex(8))
    hash: str = ""

    def body(self) -> dict[str, Any]:
        """Every field but the hash (what the hash covers). `details` is a copy of its top level;
        its values are JSON-like data nobody changes in place."""
        d = {name: getattr(self, name) for name in _BODY_FIELDS}
        d["details"] = dict(self.details)
        if not self.seq:
            del d["seq"]  # entries written before sequence numbers hash (and verify) as they did
        return d

    def sealed(self) -> AuditEntry:
        body = self.body()
        return AuditEntry(**body, hash=_digest(body))

    def verify(self) -> bool:
        return self.sealed().hash == self.hash


_BODY_FIELDS = tuple(f.name for f in fields(AuditEntry) if f.name != "hash")


def _digest(body: dict[str, Any]) -> str:
    return hashlib.sha256(canonical_json(body).encode()).hexdigest()


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def link(entry: AuditEntry, previous: AuditEntry | Chained | None) -> AuditEntry:
    """Seal `entry` as the successor of `previous` in its chain: the entry before it, or the row
    holding the chain's head (a request or policy); None starts a chain. The entry takes the next
    sequence number, so storage keeps a chain's entries in written order even within a millisecond."""
    body = entry.body()
    if isinstance(previous, AuditEntry):
        body["prev_hash"], body["seq"] = previous.hash, previous.seq + 1
    elif previous is not None and previous.audit_head != GENESIS:
        body["prev_hash"], body["seq"] = previous.audit_head, previous.audit_seq + 1
    else:
        body["prev_hash"], body["seq"] = GENESIS, 0
    return AuditEntry(**body).sealed()


H = TypeVar("H", bound=Chained)


def with_head(holder: H, entry: AuditEntry) -> H:
    """`holder` (a request or policy) with `entry` as its chain's head."""
    return replace(holder, audit_head=entry.hash, audit_seq=entry.seq)


def verify_chain(entries: Iterable[AuditEntry], head: str | None = None) -> bool:
    """Every entry intact and linked to the one before. With `head` (the hash the request or policy
    row holds), the chain must also end there, so dropping its last entries is detected too."""
    prev = GENESIS
    for e in entries:
        if e.prev_hash != prev or not e.verify():
            return False
        prev = e.hash
    return head is None or prev == head


def in_link_order(entries: Sequence[AuditEntry]) -> list[AuditEntry]:
    """`entries` as given (storage's order), except that the entries of each chain take the places
    that chain holds in link order, each after the entry whose hash it carries.

    Storage orders entries by time in milliseconds, then sequence number, so a chain written by one
    worker already comes back in written order; this also holds when workers' clocks disagree (an
    approval stamped before its request). Only links decide: an entry whose predecessor is not among
    `entries` starts a run of its own, so a removed or edited entry still fails `verify_chain`.
    """
    out = list(entries)
    places: dict[str, list[int]] = {}
    for i, e in enumerate(out):
        if e.chain:
            places.setdefault(e.chain, []).append(i)
    for idx in places.values():
        if len(idx) > 1:
            for i, e in zip(idx, _follow_links([out[i] for i in idx]), strict=True):
                out[i] = e
    return out


def _follow_links(entries: list[AuditEntry]) -> list[AuditEntry]:
    hashes = {e.hash for e in entries}
    after: dict[str, list[AuditEntry]] = {}
    for e in entries:
        after.setdefault(e.prev_hash, []).append(e)
    out: list[AuditEntry] = []
    placed: set[int] = set()
    for start in entries:
        if start.prev_hash in hashes or id(start) in placed:
            continue
        cur: AuditEntry | None = start
        while cur is not None:
            out.append(cur)
            placed.add(id(cur))
            cur = next((n for n in after.get(cur.hash, ()) if id(n) not in placed), None)
    return out + [e for e in entries if id(e) not in placed]  # a second successor of one entry (a fork)
