"""The use cases, one module per concern over one small base (base.py):

    issuance   ask for access, get the certificate      (Issuance)
    requests   look, list, approve, deny, cancel, expire (Requests)
    policies   CRUD, CA rotation and retirement, BYO key (Policies)
    hosts      revocation, KRL, setup script             (Hosts)
    hostcerts  host certificates: tokens, ARM, renewal   (HostCerts)
    audit      audit queries and chain checks            (AuditLog)

Each takes the caller's Identity, checks what it may do, and leaves an audit entry; refusals go
through `Base.refusing()`. The service knows storage and signing only through their interfaces
(storage.base.Store, signing.base.KeyStore); wiring.py hands it the concrete adapters.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Sequence

from ..signing.base import KeyStore
from ..storage.base import Store
from .audit import AuditLog
from .base import Base, Notifier, ServiceConfig
from .hostcerts import HostCerts
from .hosts import Hosts
from .issuance import Issuance, Outcome
from .policies import Policies
from .requests import Requests

log = logging.getLogger("ezssh.service")
HEALTH_CACHE_SECONDS = 3.0
# request rows written before the request indexes that the timer reads per tenant per run (each
# old open or decided request costs one transaction; the run's work stays bounded)
BACKFILL_BATCH = 500


class Service:
    """One worker's use cases, sharing one Base."""

    def __init__(self, store: Store, keys: KeyStore, config: ServiceConfig,
                 clock: Callable[[], float] = time.time, notifier: Notifier | None = None) -> None:
        self.base = Base(store, keys, config, clock, notifier)
        self.requests = Requests(self.base)
        self.issuance = Issuance(self.base, self.requests)
        self.policies = Policies(self.base)
        self.hosts = Hosts(self.base)
        self.hostcerts = HostCerts(self.base, self.policies, self.hosts)
        self.audit = AuditLog(self.base, self.requests)
        self._health: tuple[float, dict] | None = None
        self._health_lock = threading.Lock()
        self._known_cas: list = []

    # the dependencies, for the wiring and the timers
    @property
    def store(self) -> Store:
        return self.base.store

    @property
    def keys(self) -> KeyStore:
        return self.base.keys

    @property
    def clock(self) -> Callable[[], float]:
        return self.base.clock

    def housekeeping(self, tenant_ids: Sequence[str]) -> dict[str, int]:
        """The timer's work: expire stale requests, retire CA keys past their window, remove host
        renewal challenges that expired (anyone may ask for one; none outlives its window), move
        revocations of the first storage layout to the one keyed by expiry, and index request rows
        written before the request indexes (each a bounded batch a tick, until none is left)."""
        expired = retired = challenges = moved = indexed = 0
        for tid in tenant_ids:
            expired += len(self.requests.expire(tid))
            retired += len(self.policies.retire_due_ca_keys(tid))
            challenges += self.store.delete_expired_host_challenges(tid, self.base.now())
            moved += self.store.migrate_revocations(tid)
            indexed += self.store.backfill_request_indexes(tid, BACKFILL_BATCH)[0]
        return {"expired_requests": expired, "retired_ca_keys": retired, "expired_host_challenges": challenges,
                "revocations_migrated": moved, "indexed_requests": indexed}

    def health(self, tenant_ids: Sequence[str] = ()) -> dict:
        """Storage answers; every current CA key (user and host) of the tenants' policies signs a probe (so a
        token that is away shows, not only a module that answers). Cached for HEALTH_CACHE_SECONDS:
        an unauthenticated caller can't make the service sign more often than that."""
        now = time.monotonic()
        with self._health_lock:
            if self._health is not None and now - self._health[0] < HEALTH_CACHE_SECONDS:
                return self._health[1]
        checks: dict[str, str] = {"storage": self._check("storage", self.store.health)}
        refs = self._current_cas(tenant_ids)
        probes = [self._check(f"CA {ca.fingerprint} of policy {ca.key_ref}", lambda ca=ca: self._probe(ca))
                  for ca in refs]
        # The signer is red when no CA key signs (the HSM or vault is away). One policy's key that
        # fails (a customer disabled their own key) counts in ca_keys, and the log names it, without
        # failing the service. Unauthenticated callers see counts only: which keys, of which tenants,
        # is for the log.
        ca_keys = {"ok": probes.count("ok"), "unavailable": probes.count("unavailable")}
        checks["signer"] = self._check("signer", self.keys.health) if not probes else \
            ("ok" if ca_keys["ok"] else "unavailable")
        result = {"checks": checks, "ca_keys": ca_keys}
        with self._health_lock:
            self._health = (time.monotonic(), result)
        return result

    def _current_cas(self, tenant_ids: Sequence[str]) -> list:
        try:
            refs = {ca.key_ref: ca for tid in tenant_ids for p in self.base.policies.cached(tid)
                    if not p.deleted for ca in (p.current_ca, p.current_host_ca) if ca is not None}
            self._known_cas = list(refs.values())
        except Exception as exc:  # noqa: BLE001 - storage is down: probe the keys known from before
            log.warning("health: cannot list policies: %s", exc)
        return self._known_cas

    def _probe(self, ca) -> None:  # type: ignore[no-untyped-def]
        from cryptography.hazmat.primitives import hashes

        self.keys.get_signer(ca.key_ref).sign(b"ezssh health probe", hashes.SHA256())

    @staticmethod
    def _check(name: str, fn) -> str:  # type: ignore[no-untyped-def]
        try:
            fn()
            return "ok"
        except Exception as exc:  # noqa: BLE001
            log.warning("health check %s failed: %s", name, exc)
            return "unavailable"


__all__: Sequence[str] = ["Service", "ServiceConfig", "Outcome", "Base"]
