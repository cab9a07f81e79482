"""What every use case shares: its dependencies, the policy reader, and the one way to refuse.

A use-case module (issuance, requests, policies, hosts, audit) takes a `Base` and nothing else that
reaches storage or signing. Refusals go through `Base.refusing()` only: a user error (4xx) is
recorded as an audit entry and re-raised; a system error (5xx: storage or signer down) is a log
event, never recorded as the caller's refusal.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Protocol, TypeVar

from ..core.audit import AuditEntry, AuditFields
from ..core.errors import CaKeyNotFound, Denied, EzsshError, NotFound, StorageUnavailable, TtlTooLong
from ..core.policy import Identity, Policy
from ..notify import Message
from ..observability import event
from ..signing.base import KeyKind, KeyStore
from ..storage.base import Store

if TYPE_CHECKING:
    from typing_extensions import Unpack

log = logging.getLogger("ezssh.service")
T = TypeVar("T")


class Notifier(Protocol):
    def send(self, msg: Message) -> None: ...


@dataclass(frozen=True)
class ServiceConfig:
    signer_backend: str
    ca_key_kind: KeyKind = "EC-P256"
    max_ttl_ceiling: int = 24 * 3600
    backdate_seconds: int = 60
    # How long a worker may reuse a tenant's policy list on the issuance path. Changes made through
    # this worker apply at once; other workers see them within this many seconds. A deleted policy
    # issues nothing even from a stale cache: its CA keys are disabled at deletion.
    policy_cache_seconds: float = 5.0
    # plain-http webhooks to loopback (local development only)
    webhook_allow_loopback_http: bool = False
    # how much one user may ask: open requests per policy, and requests per minute on this worker
    max_pending_requests: int = 5
    request_rate: int = 30
    # each tenant's host namespaces from the settings, until a tenant admin sets them (service.namespaces)
    host_namespaces: tuple[tuple[str, tuple[str, ...]], ...] = ()
    # where people reach this deployment (EZSSH_PUBLIC_URL): links to a request's web page
    public_url: str | None = None


class RefusalCounter:
    """Refusals of callers without an identity (no or bad token). They are counted here and logged
    with the running count, never written to storage one row per call: anyone can send junk tokens."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.total = 0

    def add(self) -> int:
        with self._lock:
            self.total += 1
            return self.total


class RateLimiter:
    """A token bucket per user on this worker: `rate` requests a minute, bursts up to `rate`.
    Bounded: past MAX_KEYS users the fullest buckets (idle users) are dropped."""

    MAX_KEYS = 10_000

    def __init__(self, rate: int) -> None:
        self._rate = max(1, rate)
        self._lock = threading.Lock()
        self._buckets: dict[tuple[str, str], tuple[float, float]] = {}

    def take(self, key: tuple[str, str], now: float) -> float:
        """0 if allowed, else the seconds until the next request would be."""
        per_second = self._rate / 60.0
        with self._lock:
            tokens, at = self._buckets.get(key, (float(self._rate), now))
            tokens = min(float(self._rate), tokens + (now - at) * per_second)
            if tokens >= 1:
                self._buckets[key] = (tokens - 1, now)
                if len(self._buckets) > self.MAX_KEYS:
                    self._prune(now, per_second)
                return 0.0
            self._buckets[key] = (tokens, now)
            return (1 - tokens) / per_second

    def _prune(self, now: float, per_second: float) -> None:
        full = [k for k, (t, at) in self._buckets.items() if t + (now - at) * per_second >= self._rate]
        for k in full:
            del self._buckets[k]
        while len(self._buckets) > self.MAX_KEYS:
            self._buckets.pop(next(iter(self._buckets)))


class PolicyReader:
    """Reads a tenant's policies: fresh for decisions that change state, from a short per-worker
    cache on the issuance path and for lists (`cached`). The cache remembers the tenant's version
    (Store.trust_version: it changes with every policy write) it was read at, so whether it is still
    right is one point read (`if_changed`), not a re-read of every policy."""

    def __init__(self, store: Store, cache_seconds: float) -> None:
        self._store = store
        self._ttl = cache_seconds
        self._cache: dict[str, tuple[float, str, list[Policy]]] = {}
        self._lock = threading.Lock()

    def cached(self, tid: str) -> list[Policy]:
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(tid)
        if self._ttl > 0 and hit is not None and now - hit[0] < self._ttl:
            return hit[2]
        return self._load(tid, now)

    def _load(self, tid: str, now: float) -> list[Policy]:
        version = self._store.trust_version(tid).tag  # before the list: a write in between reads as a change
        policies = self._store.list_policies(tid)
        with self._lock:
            self._cache[tid] = (now, version, policies)
        return policies

    def if_changed(self, tid: str) -> list[Policy] | None:
        """The tenant's policies read again if any changed since they were cached, else None (the
        cached list is current: one point read said so)."""
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(tid)
        if hit is not None and self._store.trust_version(tid).tag == hit[1]:
            with self._lock:
                self._cache[tid] = (now, hit[1], hit[2])
            return None
        return self._load(tid, now)

    def changed(self, tid: str) -> None:
        with self._lock:
            self._cache.pop(tid, None)

    def deciding(self, tid: str, decide: Callable[[list[Policy]], T]) -> T:
        """`decide(policies)` over the cached list, never refused on stale data: a refusal (Denied,
        TtlTooLong) is decided again if a point read says a policy changed (one created or widened on
        another worker a moment ago applies at once), and a CA key not found (the cached policy's CA
        rotated out, or the policy deleted, on another worker) after reading the list again."""
        policies, refused_again, reread = self.cached(tid), False, False
        while True:
            try:
                return decide(policies)
            except (Denied, TtlTooLong):
                current = None if refused_again else self.if_changed(tid)
                if current is None:
                    raise
                policies, refused_again = current, True
            except CaKeyNotFound:
                if reread:
                    raise
                self.changed(tid)
                policies, reread = self.cached(tid), True

    def all(self, tid: str) -> list[Policy]:
        return self._store.list_policies(tid)

    def get(self, tid: str, pid: str) -> Policy:
        return self._store.get_policy(tid, pid)

    def get_or_none(self, tid: str, pid: str) -> Policy | None:
        try:
            return self._store.get_policy(tid, pid)
        except NotFound:
            return None

    @staticmethod
    def can_see(who: Identity, p: Policy) -> bool:
        return p.is_admin(who) or p.is_member(who) or p.is_approver(who)

    def visible(self, who: Identity, policy_id: str) -> Policy:
        """The policy if `who` may see it; NotFound otherwise (the same answer for other tenants)."""
        p = self.get_or_none(who.tid, policy_id)
        if p is None or p.deleted or not self.can_see(who, p):
            raise NotFound(f"Policy {policy_id!r} was not found.")
        return p


class Base:
    """The dependencies of one worker's use cases."""

    def __init__(
        self,
        store: Store,
        keys: KeyStore,
        config: ServiceConfig,
        clock: Callable[[], float] = time.time,
        notifier: Notifier | None = None,
    ) -> None:
        self.store = store
        self.keys = keys
        self.config = config
        self.clock = clock
        self.notifier = notifier
        self.policies = PolicyReader(store, config.policy_cache_seconds)
        self.anonymous_refusals = RefusalCounter()
        self.rate = RateLimiter(config.request_rate)

    def now(self) -> int:
        return int(self.clock())

    def audit_entry(
        self, who: Identity | None, action: str, outcome: str = "ok", **fields: Unpack[AuditFields]
    ) -> AuditEntry:
        return AuditEntry(
            tenant_id=who.tid if who else "",
            at=self.clock(),
            action=action,
            outcome=outcome,
            actor_oid=who.oid if who else None,
            actor_upn=who.upn if who else None,
            **fields,
        )

    def refuse(
        self,
        who: Identity | None,
        exc: EzsshError,
        action: str,
        *,
        tenant_id: str | None = None,
        **fields: Unpack[AuditFields],
    ) -> None:
        """Record a refusal. Never lets a storage failure hide the original error. A caller without
        an identity is counted, not stored, unless it proved it belongs to a tenant (`tenant_id`: a
        host that presented that tenant's real token or challenge): then its refusal is the tenant's
        to read."""
        if exc.status >= 500 and (who is None or isinstance(exc, StorageUnavailable)):
            # An outage (storage, the identity provider, the HSM) is no decision about the caller:
            # a failure in the log, never a refusal, and nothing written where nothing can be.
            event(
                log,
                action,
                logging.WARNING,
                error=exc.code,
                outcome="failed",
                actor=who.upn if who else None,
                tenant=who.tid if who else tenant_id,
                policy=fields.get("policy_id"),
                request=fields.get("request_id"),
                detail=exc.message,
            )
            return
        if who is None and tenant_id is None:
            # No identity (a missing or bad token): a log event and a counter, not a storage row.
            total = self.anonymous_refusals.add()
            # every one at INFO; the 1st, 2nd, 4th, 8th, ... also at WARNING, with the count so far
            level = logging.WARNING if total & (total - 1) == 0 else logging.INFO
            event(
                log,
                action,
                level,
                error=exc.code,
                outcome="refused",
                detail=exc.message,
                unauthenticated_refusals=total,
            )
            return
        # A user error is a refusal; a system error (e.g. the HSM is away) is a failure on record.
        outcome = "refused" if exc.status < 500 else "failed"
        entry = replace(self.audit_entry(who, action, outcome, **fields), error_code=exc.code, message=exc.message)
        if who is None:
            entry = replace(entry, tenant_id=tenant_id or "")
        try:
            self.store.add_audit(entry.sealed())
        except Exception as store_exc:
            log.warning("could not record refusal %s for %s: %s", exc.code, who.oid if who else "-", store_exc)
        event(
            log,
            action,
            error=exc.code,
            actor=who.upn if who else None,
            tenant=who.tid if who else tenant_id,
            policy=fields.get("policy_id"),
            request=fields.get("request_id"),
            detail=exc.message,
        )

    @contextmanager
    def refusing(
        self, who: Identity | None, action: str, *, tenant_id: str | None = None, **fields: Unpack[AuditFields]
    ) -> Iterator[AuditFields]:
        """`with base.refusing(who, REQUEST_REFUSED, host=...) as known:` - the one refusal path: a
        use case's body runs inside it once, and adds to `known` what it learns on the way (the
        policy it decided on), so the refusal is recorded with it."""
        known = fields  # a dict of its own (a call's keywords)
        try:
            yield known
        except EzsshError as exc:
            self.refuse(who, exc, action, tenant_id=tenant_id, **known)
            raise

    def request_link(self, request_id: str) -> str | None:
        """The request's page on the web app, or None when the deployment's public URL is not set."""
        base = self.config.public_url
        return f"{base.rstrip('/')}/app/requests/{request_id}" if base else None

    def notify(self, policy: Policy | None, msg: Message) -> None:
        if self.notifier is None or policy is None or not policy.webhook_url:
            return
        if msg.request_id and msg.link is None:
            msg = replace(msg, link=self.request_link(msg.request_id))
        self.notifier.send(msg)
