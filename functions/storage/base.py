"""What the service needs from storage. functions/storage/tables.py implements it on Table Storage."""

from __future__ import annotations

import heapq
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from ..core.audit import AuditEntry
from ..core.policy import Policy
from ..core.records import (
    CertificateRecord,
    HostChallenge,
    HostEnrolmentToken,
    HostKeyRecord,
    HostNamespaces,
    IdempotencyRecord,
    PendingSlots,
    Revoked,
    TrustVersion,
)
from ..core.requests import RequestRecord
from ..core.serials import SERIAL_RANDOM_BITS, serial_floor, serial_of_request_id

# The request indexes (functions/storage/requestrows.py): each lists request copies newest first.
BY_USER = "user"  # every request a user made that went through a decision (not those issued at once)
OPEN_BY_USER = "user-open"  # a user's pending and approved requests
OPEN_BY_POLICY = "policy-open"  # a policy's pending and approved requests: what its approvers decide
OPEN_IN_TENANT = "tenant-open"  # all of them (key "*"): for a scope of many policies, one range read
REQUEST_INDEXES = (BY_USER, OPEN_BY_USER, OPEN_BY_POLICY, OPEN_IN_TENANT)
POSITION_RE = re.compile(r"^[0-9a-f]{16}(?:-[A-Za-z0-9-]{1,64})?$")
_NEWEST_FIRST = (1 << 64) - 1


def index_position(rec: RequestRecord) -> str:
    """Where a request sorts in the request indexes (ascending = newest first): its id turned
    upside down (ids are serials, time first); an id of an older shape sorts by its creation time."""
    serial = serial_of_request_id(rec.id)
    if serial is not None:
        return f"{_NEWEST_FIRST - serial:016x}"
    return f"{_NEWEST_FIRST - serial_floor(rec.created_at * 1000):016x}-{rec.id}"


# ---- the audit's order ----------------------------------------------------------------------
# Every audit entry has a position: "<ms since epoch, 13 digits>|<sequence number in its chain, 6 hex>|
# <entry id>". Positions order the audit (oldest first; a chain's entries in written order within a
# millisecond), and a page's continuation is the position of the last row it read. The entries written
# with a new request (in its row) take their request's time (the request id is a time) and their place
# in the row (the order they were written in; for a chain, its sequence): they are found by that row,
# so they sort and filter by it. Rows written before sequence numbers have
# positions "<ms>|<entry id>", which sort among the others by their millisecond.
AUDIT_POSITION_RE = re.compile(r"^[0-9]{13}\|(?:[0-9a-f]{6}\|)?[0-9a-f]{0,32}$")


def audit_position(entry: AuditEntry, request_id: str | None = None, slot: int = 0) -> str:
    """An entry's position; with `request_id`, as the `slot`-th entry embedded in that request's row."""
    if request_id is None:
        return f"{int(entry.at * 1000):013d}|{entry.seq:06x}|{entry.entry_id}"
    ms = (serial_of_request_id(request_id) or 0) >> SERIAL_RANDOM_BITS
    return f"{ms:013d}|{slot:06x}|{entry.entry_id}"


POSITION_MS_MAX = (1 << (63 - SERIAL_RANDOM_BITS)) - 1  # the last millisecond a request id can name (year 2109)


def position_ms(ms: int) -> str:
    """The smallest position of millisecond `ms` (the bound of a time window), held to the range
    positions and request ids can name, so a bound of any size still compares as a position."""
    return f"{min(max(0, ms), POSITION_MS_MAX):013d}|"


@dataclass(frozen=True)
class AuditQuery:
    """Which audit entries a page holds: all conditions given hold. `since`/`until` (unix seconds,
    inclusive, to the millisecond) bound the position; `policies` None means any policy, a tuple only
    entries of those policies (a policy admin's view)."""

    since: float | None = None
    until: float | None = None
    request_id: str | None = None
    user: str | None = None  # the actor's object id
    serial: str | None = None
    key_id: str | None = None
    policies: tuple[str, ...] | None = None

    def matches(self, e: AuditEntry) -> bool:
        return (
            (self.request_id is None or e.request_id == self.request_id)
            and (self.user is None or e.actor_oid == self.user)
            and (self.serial is None or e.serial == self.serial)
            and (self.key_id is None or e.key_id == self.key_id)
            and (self.policies is None or e.policy_id in self.policies)
        )

    def window(self, after: str | None) -> tuple[str, str]:
        """Positions (lo, hi): an entry is in the page's range if lo < position < hi."""
        lo = position_ms(int(self.since * 1000)) if self.since is not None else ""
        if after is not None and after > lo:
            lo = after
        hi = position_ms(int(self.until * 1000) + 1) if self.until is not None else "}"
        return lo, hi


@dataclass(frozen=True)
class AuditPage:
    entries: list[AuditEntry]
    next: str | None  # where the next page starts (a position); None when nothing more matches


Positioned = tuple[str, "AuditEntry | None"]  # a row read: its position, and its entry (None: a row without one)


def merge_pages(streams: Iterable[Iterable[Positioned]], query: AuditQuery, limit: int) -> AuditPage:
    """A page from rows in position order (each stream sorted), reading at most `limit` of them: the
    entries that match `query`, and the position of the last row read while more may follow."""
    out: list[AuditEntry] = []
    read, last = 0, None
    for pos, entry in heapq.merge(*streams, key=lambda row: row[0]):
        read, last = read + 1, pos
        if entry is not None and query.matches(entry):
            out.append(entry)
        if read >= limit:
            return AuditPage(out, last)
    return AuditPage(out, None)


def read_audit(store: Store, tenant_id: str, query: AuditQuery, limit: int) -> list[AuditEntry]:
    """Up to `limit` entries, following pages: for reading a bounded set whole (one request's chain)."""
    out: list[AuditEntry] = []
    after: str | None = None
    while len(out) < limit:
        page = store.audit_page(tenant_id, query, limit=min(1000, limit - len(out)), after=after)
        out += page.entries
        if page.next is None:
            break
        after = page.next
    return out


class Store(Protocol):
    def health(self) -> None: ...

    # policies
    def list_policies(self, tenant_id: str) -> list[Policy]: ...
    def get_policy(self, tenant_id: str, policy_id: str) -> Policy: ...
    def create_policy(self, policy: Policy, audit: AuditEntry) -> Policy: ...
    def replace_policy(self, policy: Policy, etag: str, audit: AuditEntry) -> Policy: ...

    # requests
    def get_request(self, tenant_id: str, request_id: str) -> RequestRecord: ...
    def list_requests(self, tenant_id: str, state: str | None = None) -> list[RequestRecord]:
        """Every request row of the tenant (a scan of its whole history): tests and offline tools
        only; no user-, host- or timer-facing path calls it."""
        ...

    def list_request_index(
        self, tenant_id: str, index: str, key: str, *, after: str | None = None, limit: int = 100
    ) -> list[RequestRecord]:
        """Up to `limit` request copies from one index (BY_USER / OPEN_BY_USER: key = the user's oid;
        OPEN_BY_POLICY: key = the policy id; OPEN_IN_TENANT: key = "*"), newest first, only those after position `after`
        (index_position: older). One range read of at most `limit` rows; the copies carry no ETag (read the request
        to change it). Requests written before the indexes are listed once backfilled."""
        ...

    def due_requests(self, tenant_id: str, now: int, limit: int = 100) -> list[tuple[int, str]]:
        """(expires_at, request id) of expiry keys at or before `now`, oldest first: one range read of
        the rows due. A key can outlive its request's deadline (the deadline moved at approval, or
        the request was decided): the sweep checks the request and removes the key."""
        ...

    def remove_expiry_key(self, tenant_id: str, expires_at: int, request_id: str) -> None:
        """Delete one expiry key (gone already is fine)."""
        ...

    def get_pending_slots(self, tenant_id: str, policy_id: str, owner_oid: str) -> PendingSlots: ...
    # Every write below lands together with its audit entries, idempotency key and index rows, or
    # not at all. `slots` (the new pending slots) is written only if still at its ETag; else the
    # whole write raises PreconditionFailed.
    def create_request(
        self,
        rec: RequestRecord,
        audit: AuditEntry,
        idempotency: IdempotencyRecord | None = None,
        slots: PendingSlots | None = None,
    ) -> RequestRecord: ...
    def update_request(self, rec: RequestRecord, etag: str, audit: AuditEntry) -> RequestRecord: ...
    def backfill_request_indexes(self, tenant_id: str, budget: int) -> tuple[int, bool]:
        """Index requests written before the indexes existed, reading at most `budget` request rows
        from where the last call stopped (a marker row). Returns (rows indexed, finished)."""
        ...

    # issuance: the request's new state, the certificate record and the audit entry all land
    # before the certificate is returned. `etag` None means the request row is new. The serial is
    # the request's own (core.serials: the request id is the serial in hex), so a serial is unique
    # in its tenant; any other serial is a Conflict and nothing is written.
    def record_issuance(
        self,
        rec: RequestRecord,
        etag: str | None,
        cert: CertificateRecord,
        audit: Sequence[AuditEntry],
        idempotency: IdempotencyRecord | None = None,
    ) -> None: ...
    def get_idempotency(
        self, tenant_id: str, owner_oid: str, key_hash: str, request_id: str | None = None
    ) -> IdempotencyRecord | None:
        """The key's record: with `request_id`, as carried by that request's row (one point read;
        None unless the row carries this user's key); else its own row."""
        ...

    def get_certificate(self, tenant_id: str, policy_id: str, serial: int) -> CertificateRecord: ...
    def live_user_certificates(
        self, tenant_id: str, now: int, window: int, requester_oid: str | None = None
    ) -> list[CertificateRecord]:
        """User certificates still valid at `now` and not revoked, of requests made in the last
        `window` seconds (a certificate never outlives its request by more: the TTL ceiling plus the
        time a request may wait for approval), optionally of one requester. One range read of the
        window's request rows: its cost follows the certificates that can still be live, never the
        history. Each record carries the ETag of the row that holds it (to revoke it)."""
        ...

    # audit: every write above lands its entries with their index rows (per request, actor, serial,
    # key id, policy) in the same transaction, except the entries embedded in a new request's row
    def add_audit(self, entry: AuditEntry) -> None: ...
    def audit_page(self, tenant_id: str, query: AuditQuery, *, limit: int = 100, after: str | None = None) -> AuditPage:
        """Entries matching `query` after position `after`, oldest first, at most `limit`. Reads at
        most `limit` rows plus a constant per index it merges, so a page may hold fewer entries than
        match and still name a `next`; following `next` to None yields each matching entry once."""
        ...

    def list_audit(
        self,
        tenant_id: str,
        *,
        since: float | None = None,
        until: float | None = None,
        request_id: str | None = None,
        limit: int = 200,
    ) -> list[AuditEntry]:
        """The first `limit` entries of `audit_page`'s order (read_audit)."""
        ...

    def backfill_audit_indexes(self, tenant_id: str, budget: int) -> tuple[int, bool]:
        """Index audit rows written before the indexes existed, reading at most `budget` of them from
        where the last call stopped (a marker row). Returns (rows indexed, finished)."""
        ...

    # revocation and hosts
    def revoke_certificate(self, cert: CertificateRecord, etag: str, audit: AuditEntry) -> CertificateRecord:
        """Mark a certificate revoked (cert carries revoked_at/revoked_by), conditional on `etag`."""
        ...

    def list_revoked(self, tenant_id: str, policy_id: str, *, valid_from: int) -> list[Revoked]:
        """Revoked certificates (user and host) of a policy still valid at `valid_from` (valid_before
        >= valid_from), by expiry: a range read that never reaches expired ones. It may also return
        older ones (rows written before the expiry index, until migrate_revocations moved them)."""
        ...

    def list_revoked_since(self, tenant_id: str, policy_id: str, *, revoked_from: int) -> list[Revoked]:
        """Revocations of a policy recorded at or after `revoked_from` (their revoked_at), whatever
        their expiry: what changed since a KRL was built, a range read by time of revocation."""
        ...

    def list_revoked_host(self, tenant_id: str, *, valid_from: int) -> list[Revoked]:
        """Revoked HOST certificates of every policy of the tenant still valid at `valid_from`
        (never a user revocation); the same caveat as list_revoked."""
        ...

    def trust_version(self, tenant_id: str, policy_id: str | None = None) -> TrustVersion:
        """One point read. With a policy: changes with each revocation under that policy (its KRL;
        its CA keys are in the policy row). Without: changes with each policy written (created,
        changed, rotated, deleted) and each host certificate revoked in the tenant (known-hosts)."""
        ...

    def migrate_revocations(self, tenant_id: str, limit: int = 300) -> int:
        """Move up to `limit` revocation rows of the old layout (not keyed by expiry) to the new
        one; how many were moved (0: none left)."""
        ...

    def get_host_token(self, tenant_id: str, policy_id: str) -> str | None: ...
    def ensure_host_token(self, tenant_id: str, policy_id: str, candidate: str) -> str:
        """The policy's host token; stores `candidate` if it has none yet (the first writer wins)."""
        ...

    # host namespaces
    def get_host_namespaces(self, tenant_id: str) -> HostNamespaces | None: ...
    def put_host_namespaces(self, ns: HostNamespaces, etag: str | None, audit: AuditEntry) -> HostNamespaces:
        """The tenant's namespaces and their audit entry, in one transaction. `etag` None: the row must
        not exist yet (Conflict if it does); else the row must still be at `etag` (PreconditionFailed)."""
        ...

    # host certificates
    def create_host_enrolment_token(self, token: HostEnrolmentToken, audit: AuditEntry) -> HostEnrolmentToken: ...
    def get_host_enrolment_token(self, tenant_id: str, token_hash: str) -> HostEnrolmentToken:
        """NotFound if there is none."""
        ...

    def create_host_challenge(self, challenge: HostChallenge) -> HostChallenge: ...
    def delete_expired_host_challenges(self, tenant_id: str, now: int) -> int:
        """Remove the tenant's challenges that expired before `now`; how many were removed."""
        ...

    def get_host_challenge(self, tenant_id: str, challenge_id: str) -> HostChallenge:
        """NotFound if there is none."""
        ...

    def get_host_key(self, tenant_id: str, policy_id: str, fingerprint: str) -> HostKeyRecord | None: ...
    def list_host_keys(self, tenant_id: str, policy_id: str, subject: str | None = None) -> list[HostKeyRecord]: ...
    def record_host_issuance(
        self,
        certs: Sequence[CertificateRecord],
        keys: Sequence[HostKeyRecord],
        audit: Sequence[AuditEntry],
        used: HostEnrolmentToken | HostChallenge | None = None,
    ) -> None:
        """One transaction: the certificate records, the host key records (upserted), the audit
        entries, and `used` (a token or challenge with used_at set) marked used only if it is still
        at its ETag. A lost race (the token used meanwhile) raises Conflict and writes nothing."""
        ...
