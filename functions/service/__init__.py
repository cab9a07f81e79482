"""The use cases, one module per concern over one small base (base.py):

    issuance   ask for access, get the certificate      (Issuance)
    requests   look, list, approve, deny, cancel, expire (Requests)
    policies   CRUD, CA rotation and retirement, BYO key (Policies)
    hosts      revocation, KRL, setup script             (Hosts)
    hostcerts  host certificates: token, ARM, renewal    (HostCerts)
    hosttokens host enrolment tokens, challenges, proofs (HostTokens, composed in HostCerts)
    knownhosts what users' ssh trusts: host CAs, revocations (KnownHosts)
    enrolment  pushing policies to Azure VMs (package)  (EnrolmentService)
    namespaces where the tenant's hosts live              (Namespaces)
    audit      audit queries and chain checks            (AuditLog)
    identities revoke what a person or app holds; leavers (Identities)

Each takes the caller's Identity, checks what it may do, and leaves an audit entry; refusals go
through `Base.refusing()`. The service knows storage and signing only through their interfaces
(storage.base.Store, signing.base.KeyStore); wiring.py hands it the concrete adapters.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from ..signing.base import KeyStore
from ..storage.base import Store
from .audit import AuditLog
from .base import Base, Notifier, ServiceConfig
from .hostcerts import HostCerts
from .hosts import Hosts
from .identities import Directory, Identities, SweepConfig
from .issuance import Issuance, Outcome
from .knownhosts import KnownHosts
from .namespaces import Namespaces
from .policies import Policies
from .requests import Requests

# rows written before the request and audit indexes that the timer reads per tenant per run (each
# old open or decided request costs one transaction; the run's work stays bounded)
BACKFILL_BATCH = 500


class Service:
    """One worker's use cases, sharing one Base."""

    def __init__(
        self,
        store: Store,
        keys: KeyStore,
        config: ServiceConfig,
        clock: Callable[[], float] = time.time,
        notifier: Notifier | None = None,
        directory: Directory | None = None,
        sweep: SweepConfig = SweepConfig(),
    ) -> None:
        self.base = Base(store, keys, config, clock, notifier)
        self.requests = Requests(self.base)
        self.issuance = Issuance(self.base, self.requests)
        self.policies = Policies(self.base)
        self.hosts = Hosts(self.base)
        self.namespaces = Namespaces(self.base)
        self.hostcerts = HostCerts(self.base, self.policies, self.hosts, self.namespaces)
        self.known_hosts = KnownHosts(self.base, self.policies, self.namespaces)
        self.audit = AuditLog(self.base, self.requests)
        self.identities = Identities(self.base, self.hosts, directory, sweep)

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
        revocations of the first storage layout to the one keyed by expiry, and index request rows and
        audit rows written before their indexes (each a bounded batch a tick, until none is left)."""
        expired = retired = challenges = moved = indexed = audit_indexed = 0
        for tid in tenant_ids:
            expired += len(self.requests.expire(tid))
            retired += len(self.policies.retire_due_ca_keys(tid))
            challenges += self.store.delete_expired_host_challenges(tid, self.base.now())
            moved += self.store.migrate_revocations(tid)
            indexed += self.store.backfill_request_indexes(tid, BACKFILL_BATCH)[0]
            audit_indexed += self.store.backfill_audit_indexes(tid, BACKFILL_BATCH)[0]
        return {
            "expired_requests": expired,
            "retired_ca_keys": retired,
            "expired_host_challenges": challenges,
            "revocations_migrated": moved,
            "indexed_requests": indexed,
            "audit_rows_indexed": audit_indexed,
        }


__all__: Sequence[str] = ["Service", "ServiceConfig", "Outcome", "Base"]
