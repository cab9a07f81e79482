"""An in-memory Store (functions/storage/base.py) for fast service tests.

It passes the same contract test as Table Storage (tests/contract/test_store.py) and copies what that
test pins down about Table Storage: every write gives the row a new ETag and the returned object
carries it; conditional writes compare the ETag exactly (`*` matches anything, as If-Match does, and
an empty one is refused with ValueError as the Azure SDK refuses it); a write that fails changes
nothing, including its audit entries; a write whose audit entries (or certificate, or idempotency key)
belong to another partition than its row is refused with ValueError, as the SDK refuses such a batch;
audit entries are ordered by their position (functions/storage/base.py: milliseconds, sequence number,
entry id; the entries written with a new request take the request's time), and their `since`/`until`
bounds are inclusive at millisecond resolution; policies and audit entries come back through JSON, as
they do from a table row.

Test code only: production code builds TableStore in functions/wiring.py.
"""

from __future__ import annotations

import itertools
import json
import threading
from dataclasses import dataclass, replace
from typing import Sequence

from functions.core.requests import OPEN_STATES, RequestRecord
from functions.core.serials import serial_floor, serial_of_request_id
from functions.core.audit import AuditEntry
from functions.core.errors import Conflict, NotFound, PreconditionFailed
from functions.core.policy import Policy
from functions.core.policydoc import policy_from_row
from functions.storage.base import BY_USER, OPEN_BY_POLICY, OPEN_BY_USER, OPEN_IN_TENANT, AuditPage, AuditQuery, audit_position, index_position, merge_pages, read_audit
from functions.core.records import CertificateRecord, HostChallenge, HostEnrolmentToken, HostKeyRecord, HostNamespaces, IdempotencyRecord, PendingSlots, Revoked, TrustVersion

UNAUTHENTICATED = "_unauthenticated"  # the partition of refusals without a trustworthy tenant


@dataclass
class _Row:
    value: object
    etag: str


class MemoryStore:
    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._etags = itertools.count(1)
        self._policies: dict[tuple[str, str], _Row] = {}  # value: (policy JSON, audit head, its sequence number)
        self._requests: dict[tuple[str, str], _Row] = {}  # value: RequestRecord (frozen)
        self._certs: dict[tuple[str, str, int], _Row] = {}  # value: CertificateRecord (frozen)
        self._audit: dict[str, dict[str, str]] = {}  # partition -> position -> JSON
        self._host_tokens: dict[tuple[str, str], str] = {}
        self._idempotency: dict[tuple[str, str, str], IdempotencyRecord] = {}
        self._enrol_tokens: dict[tuple[str, str], _Row] = {}  # value: HostEnrolmentToken
        self._challenges: dict[tuple[str, str], _Row] = {}  # value: HostChallenge
        self._host_keys: dict[tuple[str, str, str], _Row] = {}  # value: HostKeyRecord
        self._host_certs: set[tuple[str, str, int]] = set()  # which of _certs are host certificates
        self._revoked: dict[tuple[str, str, int], Revoked] = {}  # the revocation index
        self._versions: dict[tuple[str, str | None], TrustVersion] = {}  # (tenant, policy or None)
        # the request indexes: which requests were issued at once (never indexed), the expiry keys
        # (kept until the sweep removes them, as on the table), the pending slots, the backfill marker
        self._born_issued: set[tuple[str, str]] = set()
        self._expiry: set[tuple[str, int, str]] = set()
        self._slots: dict[tuple[str, str, str], _Row] = {}  # value: tuple of (request id, expires_at)
        self._backfill: dict[str, dict] = {}  # tenant -> where each pass stopped, what is done
        self._namespaces: dict[str, _Row] = {}  # value: HostNamespaces

    # ---- helpers ------------------------------------------------------------------------------
    def _etag(self) -> str:
        return f'W/"mem-{next(self._etags)}"'

    @staticmethod
    def _matches(row: _Row, etag: str) -> bool:
        if not etag:
            raise ValueError("IfNotModified must be specified with etag.")
        return etag == "*" or etag == row.etag

    @staticmethod
    def _audit_key(entry: AuditEntry, request_id: str | None = None, slot: int = 0) -> tuple[str, str]:
        """Partition and position; with `request_id`, of the `slot`-th entry written in that new request's row."""
        return entry.tenant_id or UNAUTHENTICATED, audit_position(entry, request_id, slot)

    @staticmethod
    def _one_partition(tenant_id: str, audit: Sequence[AuditEntry], *others: object) -> None:
        """A write and its audit entries are one transaction, so one partition (the SDK refuses more)."""
        if any((a.tenant_id or UNAUTHENTICATED) != tenant_id for a in audit) or \
                any(o is not None and o.tenant_id != tenant_id for o in others):  # type: ignore[attr-defined]
            raise ValueError("Partition Keys in the batch must all be the same.")

    def _bump(self, tenant_id: str, policy_id: str | None, at: float) -> None:
        self._versions[(tenant_id, policy_id)] = TrustVersion(self._etag(), int(at))

    def _check_new_audit(self, entries: Sequence[AuditEntry], request_id: str | None = None) -> None:
        keys = [self._audit_key(a, request_id, slot) for slot, a in enumerate(entries)]
        if len(set(keys)) != len(keys) or any(k in self._audit.get(p, {}) for p, k in keys):
            raise Conflict("An audit entry with that id already exists.")

    def _put_audit(self, entries: Sequence[AuditEntry], request_id: str | None = None) -> None:
        for slot, a in enumerate(entries):
            partition, key = self._audit_key(a, request_id, slot)
            doc = json.dumps(a.body() | {"hash": a.hash}, separators=(",", ":"), default=str)
            self._audit.setdefault(partition, {})[key] = doc

    # ---- Store --------------------------------------------------------------------------------
    def health(self) -> None:
        return None

    # policies
    @staticmethod
    def _policy(row: _Row) -> Policy:
        doc, head, seq = row.value  # type: ignore[misc]
        return policy_from_row(json.loads(doc), etag=row.etag, audit_head=head, audit_seq=seq)

    @staticmethod
    def _policy_value(policy: Policy) -> tuple[str, str, int]:
        return json.dumps(policy.to_dict(), separators=(",", ":")), policy.audit_head, policy.audit_seq

    def list_policies(self, tenant_id: str) -> list[Policy]:
        with self._lock:
            return [self._policy(r) for (t, _), r in sorted(self._policies.items()) if t == tenant_id]

    def get_policy(self, tenant_id: str, policy_id: str) -> Policy:
        with self._lock:
            row = self._policies.get((tenant_id, policy_id))
            if row is None:
                raise NotFound(f"Policy {policy_id!r} was not found.")
            return self._policy(row)

    def create_policy(self, policy: Policy, audit: AuditEntry) -> Policy:
        self._one_partition(policy.tenant_id, [audit])
        with self._lock:
            if (policy.tenant_id, policy.id) in self._policies:
                raise Conflict(f"A policy with id {policy.id!r} already exists.")
            self._check_new_audit([audit])
            row = self._policies[(policy.tenant_id, policy.id)] = _Row(self._policy_value(policy), self._etag())
            self._put_audit([audit])
            self._bump(policy.tenant_id, None, audit.at)
            return replace(policy, etag=row.etag)

    def replace_policy(self, policy: Policy, etag: str, audit: AuditEntry) -> Policy:
        self._one_partition(policy.tenant_id, [audit])
        with self._lock:
            row = self._policies.get((policy.tenant_id, policy.id))
            if row is None:
                raise NotFound(f"Policy {policy.id!r} was not found.")
            if not self._matches(row, etag):
                raise PreconditionFailed(
                    f"Policy {policy.id!r} changed since you read it (ETag mismatch); read it again and retry.")
            self._check_new_audit([audit])
            row.value, row.etag = self._policy_value(policy), self._etag()
            self._put_audit([audit])
            self._bump(policy.tenant_id, None, audit.at)
            return replace(policy, etag=row.etag)


    # requests
    def get_request(self, tenant_id: str, request_id: str) -> RequestRecord:
        with self._lock:
            row = self._requests.get((tenant_id, request_id))
            if row is None:
                raise NotFound(f"Request {request_id!r} was not found.")
            return replace(row.value, etag=row.etag)  # type: ignore[type-var]

    def list_requests(self, tenant_id: str, state: str | None = None) -> list[RequestRecord]:
        with self._lock:
            return [
                replace(r.value, etag=r.etag)  # type: ignore[type-var]
                for (t, _), r in sorted(self._requests.items(), key=lambda kv: kv[0])
                if t == tenant_id and (not state or r.value.state == state)  # type: ignore[attr-defined]
            ]

    def list_request_index(self, tenant_id: str, index: str, key: str, *, after: str | None = None,
                           limit: int = 100) -> list[RequestRecord]:
        field = {BY_USER: "requester_oid", OPEN_BY_USER: "requester_oid", OPEN_BY_POLICY: "policy_id",
                 OPEN_IN_TENANT: None}[index]
        with self._lock:
            found = [replace(r.value, etag=None) for (t, rid), r in self._requests.items()  # type: ignore[type-var]
                     if t == tenant_id and r.value.indexed and (t, rid) not in self._born_issued  # type: ignore[attr-defined]
                     and (getattr(r.value, field) == key if field else key == "*")
                     and (index == BY_USER or r.value.state in OPEN_STATES)]  # type: ignore[attr-defined]
        found = sorted((index_position(r), r) for r in found)
        return [r for pos, r in found if after is None or pos > after][:max(0, limit)]

    def due_requests(self, tenant_id: str, now: int, limit: int = 100) -> list[tuple[int, str]]:
        with self._lock:
            return sorted((x, rid) for t, x, rid in self._expiry if t == tenant_id and x <= now)[:max(0, limit)]

    def remove_expiry_key(self, tenant_id: str, expires_at: int, request_id: str) -> None:
        with self._lock:
            self._expiry.discard((tenant_id, expires_at, request_id))

    def get_pending_slots(self, tenant_id: str, policy_id: str, owner_oid: str) -> PendingSlots:
        with self._lock:
            row = self._slots.get((tenant_id, policy_id, owner_oid))
            if row is None:
                return PendingSlots(tenant_id, policy_id, owner_oid)
            return PendingSlots(tenant_id, policy_id, owner_oid, row.value, etag=row.etag)  # type: ignore[arg-type]

    def _check_slots(self, slots: PendingSlots | None) -> None:
        if slots is None:
            return
        row = self._slots.get((slots.tenant_id, slots.policy_id, slots.owner_oid))
        if (row is None) != (slots.etag is None) or (row is not None and not self._matches(row, slots.etag or "")):
            raise PreconditionFailed("Your pending requests under this policy changed at the same time; retry.")

    def _check_index(self, rec: RequestRecord, was_indexed: bool) -> None:
        """A decision deletes the expiry key it keeps (as the table's delete, NotFound if it is gone)."""
        if was_indexed and rec.state not in OPEN_STATES and (rec.tenant_id, rec.expires_at, rec.id) not in self._expiry:
            raise NotFound(f"Request {rec.id!r} was not found.")

    def _index(self, rec: RequestRecord, was_indexed: bool = False) -> None:
        """What the table's index rows of `rec` change in the expiry keys: its key while open; a
        decision removes it."""
        if rec.state in OPEN_STATES:
            self._expiry.add((rec.tenant_id, rec.expires_at, rec.id))
        elif was_indexed:
            self._expiry.discard((rec.tenant_id, rec.expires_at, rec.id))

    def create_request(self, rec: RequestRecord, audit: AuditEntry,
                       idempotency: IdempotencyRecord | None = None,
                       slots: PendingSlots | None = None) -> RequestRecord:
        self._one_partition(rec.tenant_id, [audit], idempotency, slots)
        with self._lock:
            if (rec.tenant_id, rec.id) in self._requests:
                raise Conflict("That request already exists.")
            self._check_new_audit([audit], rec.id)
            self._check_idempotency(rec, idempotency)
            self._check_slots(slots)
            row = self._requests[(rec.tenant_id, rec.id)] = _Row(replace(rec, etag=None, indexed=True), self._etag())
            self._put_audit([audit], rec.id)  # in the new request's row
            self._put_idempotency(idempotency)
            self._index(rec)
            if slots is not None:
                self._slots[(slots.tenant_id, slots.policy_id, slots.owner_oid)] = _Row(slots.requests, self._etag())
            return replace(rec, etag=row.etag, indexed=True)

    def put_legacy_request(self, rec: RequestRecord, *, issued_at_once: bool = False) -> RequestRecord:
        """Test seeding: a request row as written before the request indexes existed (no index rows)."""
        with self._lock:
            row = self._requests[(rec.tenant_id, rec.id)] = _Row(replace(rec, etag=None, indexed=False), self._etag())
            if issued_at_once:
                self._born_issued.add((rec.tenant_id, rec.id))
            return replace(rec, etag=row.etag, indexed=False)

    def backfill_request_indexes(self, tenant_id: str, budget: int) -> tuple[int, bool]:
        """As the table's: the open requests first, then all the rest, `budget` rows a call."""
        with self._lock:
            mark = self._backfill.setdefault(tenant_id, {})
            if mark.get("Finished"):
                return 0, True
            indexed, left = 0, max(1, budget)
            for pass_, done in (("Open", "OpenDone"), ("All", "Finished")):
                if mark.get(done):
                    continue
                keys = sorted(k for k, r in self._requests.items() if k[0] == tenant_id and k[1] > mark.get(pass_, "")
                              and (pass_ == "All" or r.value.state in OPEN_STATES))[:left]  # type: ignore[attr-defined]
                for key in keys:
                    row = self._requests[key]
                    rec: RequestRecord = row.value  # type: ignore[assignment]
                    if rec.indexed or key in self._born_issued:
                        continue
                    row.value, row.etag = replace(rec, indexed=True), self._etag()
                    self._index(rec)
                    indexed += 1
                if keys:
                    mark[pass_] = keys[-1][1]
                left -= len(keys)
                if not left:
                    break
                mark[done] = True
            return indexed, bool(mark.get("Finished"))

    # idempotency keys: in a row of their own, or (on_request_row) on the row of the request they name
    @staticmethod
    def _idk(i: IdempotencyRecord) -> tuple[str, str, str]:
        return i.tenant_id, i.owner_oid, "req|" + i.request_id if i.on_request_row else i.key_hash

    def _check_idempotency(self, rec: RequestRecord, i: IdempotencyRecord | None) -> None:
        if i is not None and i.on_request_row and \
                (i.tenant_id, i.owner_oid, i.request_id) != (rec.tenant_id, rec.requester_oid, rec.id):
            raise ValueError("An idempotency key rides only on the row of the request it names, of its owner.")
        if i is not None and self._idk(i) in self._idempotency:
            raise Conflict("That request already exists.")

    def _put_idempotency(self, i: IdempotencyRecord | None) -> None:
        if i is not None:
            self._idempotency[self._idk(i)] = i

    def get_idempotency(self, tenant_id: str, owner_oid: str, key_hash: str,
                        request_id: str | None = None) -> IdempotencyRecord | None:
        with self._lock:
            found = self._idempotency.get((tenant_id, owner_oid, key_hash if request_id is None else "req|" + request_id))
            return found if found is not None and found.key_hash == key_hash else None

    def _claim_request(self, rec: RequestRecord, etag: str) -> _Row:
        row = self._requests.get((rec.tenant_id, rec.id))
        if row is None:
            raise NotFound(f"Request {rec.id!r} was not found.")
        if not self._matches(row, etag):
            raise Conflict(f"Request {rec.id} changed at the same time; read it again.")
        return row

    def update_request(self, rec: RequestRecord, etag: str, audit: AuditEntry) -> RequestRecord:
        self._one_partition(rec.tenant_id, [audit])
        with self._lock:
            row = self._claim_request(rec, etag)
            self._check_new_audit([audit])
            was_indexed = row.value.indexed  # type: ignore[attr-defined]
            self._check_index(rec, was_indexed)
            row.value, row.etag = replace(rec, etag=None, indexed=True), self._etag()
            self._put_audit([audit])
            self._index(rec, was_indexed)
            return replace(rec, etag=row.etag, indexed=True)

    # issuance: all or nothing
    def record_issuance(
        self, rec: RequestRecord, etag: str | None, cert: CertificateRecord, audit: Sequence[AuditEntry],
        idempotency: IdempotencyRecord | None = None,
    ) -> None:
        self._one_partition(rec.tenant_id, audit, cert, idempotency)
        if (cert.tenant_id, cert.policy_id, cert.request_id, cert.serial) != \
                (rec.tenant_id, rec.policy_id, rec.id, rec.serial):
            raise ValueError("The certificate record does not belong to this request.")
        if serial_of_request_id(rec.id) != cert.serial:
            raise Conflict(f"The certificate's serial must be its request's own ({rec.id}); nothing was recorded.")
        with self._lock:
            row = None
            if etag is None:
                if (rec.tenant_id, rec.id) in self._requests:
                    raise Conflict("The certificate could not be recorded (serial or request already used); retry.")
            else:
                row = self._claim_request(rec, etag)
                self._check_index(rec, row.value.indexed)  # type: ignore[attr-defined]
            if (cert.tenant_id, cert.policy_id, cert.serial) in self._certs:
                raise Conflict("The certificate could not be recorded (serial or request already used); retry.")
            embedded_in = rec.id if etag is None else None  # a new request's row holds its entries
            self._check_new_audit(audit, embedded_in)
            try:
                self._check_idempotency(rec, idempotency)
            except Conflict:
                raise Conflict("The certificate could not be recorded (serial or request already used); retry.") from None
            if row is None:
                self._requests[(rec.tenant_id, rec.id)] = _Row(replace(rec, etag=None, indexed=True), self._etag())
                self._born_issued.add((rec.tenant_id, rec.id))
            else:
                self._index(rec, row.value.indexed)  # type: ignore[attr-defined]
                row.value, row.etag = replace(rec, etag=None, indexed=True), self._etag()
            self._certs[(cert.tenant_id, cert.policy_id, cert.serial)] = _Row(replace(cert, etag=None), self._etag())
            self._put_audit(audit, embedded_in)
            self._put_idempotency(idempotency)

    def get_certificate(self, tenant_id: str, policy_id: str, serial: int) -> CertificateRecord:
        with self._lock:
            row = self._certs.get((tenant_id, policy_id, serial))
            if row is None:
                raise NotFound(f"No certificate with serial {serial} was issued under policy {policy_id!r}.")
            return replace(row.value, etag=row.etag)  # type: ignore[type-var]

    def live_user_certificates(self, tenant_id: str, now: int, window: int,
                               requester_oid: str | None = None) -> list[CertificateRecord]:
        floor = serial_floor((now - window) * 1000)
        with self._lock:
            out = []
            for (t, _, serial), r in sorted(self._certs.items(), key=lambda kv: kv[0][2]):
                c: CertificateRecord = r.value  # type: ignore[assignment]
                if t != tenant_id or serial < floor or c.revoked_at is not None or c.valid_before <= now:
                    continue
                if (requester_oid is not None and c.requester_oid != requester_oid) or \
                        serial_of_request_id(c.request_id) != serial:  # host certificates have their own
                    continue
                out.append(replace(c, etag=r.etag))
            return out

    # audit
    def add_audit(self, entry: AuditEntry) -> None:
        with self._lock:
            self._check_new_audit([entry])
            self._put_audit([entry])

    def audit_page(self, tenant_id: str, query: AuditQuery, *, limit: int = 100,
                   after: str | None = None) -> AuditPage:
        lo, hi = query.window(after)
        with self._lock:
            rows = sorted(self._audit.get(tenant_id, {}).items())
        entries = ((pos, AuditEntry(**json.loads(doc))) for pos, doc in rows if lo < pos < hi)
        return merge_pages([[(pos, e) for pos, e in entries if query.matches(e)]], query, limit)

    def list_audit(self, tenant_id: str, *, since: float | None = None, until: float | None = None,
                   request_id: str | None = None, limit: int = 200) -> list[AuditEntry]:
        return read_audit(self, tenant_id, AuditQuery(since=since, until=until, request_id=request_id), limit)

    def backfill_audit_indexes(self, tenant_id: str, budget: int) -> tuple[int, bool]:
        return 0, True  # every entry here was written with its indexes

    # revocation and hosts
    def revoke_certificate(self, cert: CertificateRecord, etag: str, audit: AuditEntry) -> CertificateRecord:
        self._one_partition(cert.tenant_id, [audit])
        with self._lock:
            row = self._certs.get((cert.tenant_id, cert.policy_id, cert.serial))
            if row is None:
                raise NotFound(
                    f"No certificate with serial {cert.serial} was issued under policy {cert.policy_id!r}.")
            if not self._matches(row, etag):
                raise Conflict(f"Certificate {cert.serial} changed at the same time; read it again.")
            self._check_new_audit([audit])
            stored: CertificateRecord = row.value  # type: ignore[assignment]
            # A merge of the two revocation fields, as on the table (a None there leaves the old value).
            row.value = replace(
                stored,
                revoked_at=cert.revoked_at if cert.revoked_at is not None else stored.revoked_at,
                revoked_by=cert.revoked_by if cert.revoked_by is not None else stored.revoked_by,
                revoked_by_oid=cert.revoked_by_oid if cert.revoked_by_oid is not None else stored.revoked_by_oid,
            )
            row.etag = self._etag()
            self._put_audit([audit])
            key = (cert.tenant_id, cert.policy_id, cert.serial)
            host = key in self._host_certs
            self._revoked[key] = Revoked(cert.policy_id, cert.serial, cert.ca_fingerprint, cert.valid_before,
                                         cert.revoked_at or 0, host)
            self._bump(cert.tenant_id, cert.policy_id, audit.at)
            if host:
                self._bump(cert.tenant_id, None, audit.at)
            return replace(cert, etag=row.etag)

    def list_revoked(self, tenant_id: str, policy_id: str, *, valid_from: int) -> list[Revoked]:
        with self._lock:
            return sorted((r for (t, p, _), r in self._revoked.items()
                           if t == tenant_id and p == policy_id and r.valid_before >= valid_from),
                          key=lambda r: (r.valid_before, r.serial))

    def list_revoked_since(self, tenant_id: str, policy_id: str, *, revoked_from: int) -> list[Revoked]:
        with self._lock:
            return sorted((r for (t, p, _), r in self._revoked.items()
                           if t == tenant_id and p == policy_id and r.revoked_at >= revoked_from),
                          key=lambda r: (r.revoked_at, r.serial))

    def list_revoked_host(self, tenant_id: str, *, valid_from: int) -> list[Revoked]:
        with self._lock:
            return sorted((r for (t, _, _), r in self._revoked.items()
                           if t == tenant_id and r.host and r.valid_before >= valid_from),
                          key=lambda r: (r.valid_before, r.policy_id, r.serial))

    def trust_version(self, tenant_id: str, policy_id: str | None = None) -> TrustVersion:
        with self._lock:
            return self._versions.get((tenant_id, policy_id), TrustVersion(""))

    def migrate_revocations(self, tenant_id: str, limit: int = 300) -> int:
        return 0  # this store never had another layout

    def get_host_token(self, tenant_id: str, policy_id: str) -> str | None:
        with self._lock:
            return self._host_tokens.get((tenant_id, policy_id))

    def ensure_host_token(self, tenant_id: str, policy_id: str, candidate: str) -> str:
        with self._lock:
            if (tenant_id, policy_id) not in self._host_tokens:
                self._host_tokens[(tenant_id, policy_id)] = candidate
            return self._host_tokens[(tenant_id, policy_id)]

    # host namespaces
    def get_host_namespaces(self, tenant_id: str) -> HostNamespaces | None:
        with self._lock:
            row = self._namespaces.get(tenant_id)
            return None if row is None else replace(row.value, etag=row.etag)  # type: ignore[type-var]

    def put_host_namespaces(self, ns: HostNamespaces, etag: str | None, audit: AuditEntry) -> HostNamespaces:
        self._one_partition(ns.tenant_id, [audit])
        with self._lock:
            row = self._namespaces.get(ns.tenant_id)
            if etag is None and row is not None:
                raise Conflict("The host namespaces were set at the same time; read them again and retry.")
            if etag is not None and (row is None or not self._matches(row, etag)):
                if row is None:
                    raise NotFound("The host namespaces were not found.")
                raise PreconditionFailed("The host namespaces changed since you read them (ETag mismatch); read "
                                         "them again and retry.")
            self._check_new_audit([audit])
            new = self._namespaces[ns.tenant_id] = _Row(replace(ns, etag=None), self._etag())
            self._put_audit([audit])
            self._bump(ns.tenant_id, None, audit.at)
            return replace(ns, etag=new.etag)

    # host certificates
    def create_host_enrolment_token(self, token: HostEnrolmentToken, audit: AuditEntry) -> HostEnrolmentToken:
        self._one_partition(token.tenant_id, [audit])
        with self._lock:
            if (token.tenant_id, token.token_hash) in self._enrol_tokens:
                raise Conflict("That enrolment token already exists; mint another.")
            self._check_new_audit([audit])
            row = self._enrol_tokens[(token.tenant_id, token.token_hash)] = _Row(replace(token, etag=None), self._etag())
            self._put_audit([audit])
            return replace(token, etag=row.etag)

    def get_host_enrolment_token(self, tenant_id: str, token_hash: str) -> HostEnrolmentToken:
        with self._lock:
            row = self._enrol_tokens.get((tenant_id, token_hash))
            if row is None:
                raise NotFound("No such enrolment token.")
            return replace(row.value, etag=row.etag)  # type: ignore[type-var]

    def create_host_challenge(self, challenge: HostChallenge) -> HostChallenge:
        with self._lock:
            if (challenge.tenant_id, challenge.id) in self._challenges:
                raise Conflict("That challenge already exists; ask again.")
            row = self._challenges[(challenge.tenant_id, challenge.id)] = _Row(replace(challenge, etag=None),
                                                                              self._etag())
            return replace(challenge, etag=row.etag)

    def delete_expired_host_challenges(self, tenant_id: str, now: int) -> int:
        with self._lock:
            gone = [k for k, row in self._challenges.items()
                    if k[0] == tenant_id and row.value.expires_at < now]  # type: ignore[attr-defined]
            for k in gone:
                del self._challenges[k]
            return len(gone)

    def get_host_challenge(self, tenant_id: str, challenge_id: str) -> HostChallenge:
        with self._lock:
            row = self._challenges.get((tenant_id, challenge_id))
            if row is None:
                raise NotFound("No such challenge.")
            return replace(row.value, etag=row.etag)  # type: ignore[type-var]

    def get_host_key(self, tenant_id: str, policy_id: str, fingerprint: str) -> HostKeyRecord | None:
        with self._lock:
            row = self._host_keys.get((tenant_id, policy_id, fingerprint))
            return None if row is None else replace(row.value, etag=row.etag)  # type: ignore[type-var]

    def list_host_keys(self, tenant_id: str, policy_id: str, subject: str | None = None) -> list[HostKeyRecord]:
        with self._lock:
            return [replace(r.value, etag=r.etag)  # type: ignore[type-var]
                    for (t, p, _), r in sorted(self._host_keys.items(), key=lambda kv: kv[0])
                    if t == tenant_id and p == policy_id
                    and (subject is None or r.value.subject == subject)]  # type: ignore[attr-defined]

    def record_host_issuance(self, certs: Sequence[CertificateRecord], keys: Sequence[HostKeyRecord],
                             audit: Sequence[AuditEntry],
                             used: HostEnrolmentToken | HostChallenge | None = None) -> None:
        rows = [*certs, *keys, *([used] if used is not None else [])]
        if rows:
            self._one_partition(rows[0].tenant_id, audit, *rows)
        with self._lock:
            used_row = None
            if used is not None:
                table = self._enrol_tokens if isinstance(used, HostEnrolmentToken) else self._challenges
                key = (used.tenant_id, used.token_hash if isinstance(used, HostEnrolmentToken) else used.id)
                used_row = table.get(key)
                if used_row is None:
                    raise NotFound("That token or challenge is gone; nothing was issued.")
                if not self._matches(used_row, used.etag or ""):
                    raise Conflict("That token or challenge was used at the same time; nothing was issued.")
            if any((c.tenant_id, c.policy_id, c.serial) in self._certs for c in certs) or \
                    len({c.serial for c in certs}) != len(certs):
                raise Conflict("The host certificate could not be recorded (serial already used); retry.")
            self._check_new_audit(audit)
            if used_row is not None:
                used_row.value, used_row.etag = replace(used, etag=None), self._etag()  # type: ignore[type-var]
            for c in certs:
                self._certs[(c.tenant_id, c.policy_id, c.serial)] = _Row(replace(c, etag=None), self._etag())
                self._host_certs.add((c.tenant_id, c.policy_id, c.serial))
            for k in keys:
                self._host_keys[(k.tenant_id, k.policy_id, k.fingerprint)] = _Row(replace(k, etag=None), self._etag())
            self._put_audit(audit)
