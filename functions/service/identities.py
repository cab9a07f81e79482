"""Everything one person or app holds, revoked in one step: by an admin (`revoke_all`), or by the
leaver sweep (`sweep`) when Microsoft Graph says the identity may no longer sign in (disabled,
deleted, or rated risky by Entra ID Protection where the tenant asks for that).

Live certificates are found by one range read of the request rows of the last `window` seconds (a
certificate never outlives its request by more than the policies' longest approval wait plus the
deployment's TTL ceiling): the cost follows what can still be live, never the history. Each
certificate is revoked as one write with its own audit entry (the KRL changes at once; enrolled Azure
VMs get the new KRL from the reconcile timer, which re-pushes when a policy's KRL version changes);
one `identity.revoked` entry says who did it, why, and what it covered.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from typing import Any, Protocol

from ..core.errors import BackendUnavailable, Conflict, Forbidden, InvalidRequest, NotFound
from ..core.ids import is_guid
from ..core.policy import Identity
from ..core.records import CertificateRecord
from ..observability import event
from .base import Base
from .hosts import Hosts

log = logging.getLogger("ezssh.service")

IDENTITY_REVOKE_REFUSED = "identity.revoke.refused"
ACTIVE, DISABLED, DELETED = "active", "disabled", "deleted"
RISK_LEVELS = ("low", "medium", "high")
MAX_LISTED = 100  # serials named in one identity.revoked entry


class Directory(Protocol):
    """Who may still sign in (functions.graph.GraphDirectory on Microsoft Graph)."""

    def account_states(self, tid: str, oids: list[str]) -> dict[str, str]: ...
    def risky_users(self, tid: str, min_level: str) -> set[str]: ...


@dataclass(frozen=True)
class SweepConfig:
    interval: int = 300  # seconds between sweeps of a tenant; 0: no sweep
    risk_level: str | None = None  # revoke users Entra ID Protection rates at this level or above


class Identities:
    def __init__(
        self, base: Base, hosts: Hosts, directory: Directory | None = None, sweep: SweepConfig = SweepConfig()
    ) -> None:
        self.base = base
        self.hosts = hosts
        self.directory = directory
        self.sweep_config = sweep
        self._last_sweep: dict[str, float] = {}

    def window(self, tid: str) -> int:
        """How far back a request may be and still hold a live certificate."""
        wait = max((p.request_ttl for p in self.base.policies.cached(tid)), default=3600)
        return wait + self.base.config.max_ttl_ceiling + self.base.config.backdate_seconds

    # ---- an admin's call ----------------------------------------------------------------------
    def revoke_all(self, who: Identity, oid: str, reason: str | None = None) -> list[CertificateRecord]:
        """Revoke every live certificate of `oid` (a person or an app) in the caller's tenant: all of
        them for tenant admins, those of the policies they administer for policy admins."""
        b = self.base
        target = (oid or "").lower()
        with b.refusing(who, IDENTITY_REVOKE_REFUSED, details={"target_oid": target[:64]}):
            if not is_guid(target):
                raise InvalidRequest("Name the person or app by its object id (a GUID).")
            if reason is not None and (len(reason) > 1000 or "\n" in reason):
                raise InvalidRequest("'reason' must be one line of at most 1000 characters.")
            mine: set[str] | None = None
            if not who.is_tenant_admin:
                mine = {p.id for p in b.policies.all(who.tid) if not p.deleted and p.is_admin(who)}
                if not mine:
                    raise Forbidden("Only tenant admins and policy admins revoke what a person or app holds.")
        live = b.store.live_user_certificates(who.tid, int(b.now()), self.window(who.tid), requester_oid=target)
        covered = [c for c in live if mine is None or c.policy_id in mine]
        done = self._revoke(
            who,
            who.tid,
            target,
            covered,
            reason or "revoked by an admin",
            {"left_to_other_admins": len(live) - len(covered)},
        )
        return done

    # ---- the leaver sweep ---------------------------------------------------------------------
    def sweep(self, tenant_ids: list[str] | tuple[str, ...], force: bool = False) -> dict[str, int]:
        """For each tenant whose interval has passed: the identities holding live certificates, asked
        of the directory; every certificate of one that may no longer sign in is revoked. When the
        directory can't answer, nothing is revoked (and the next run asks again)."""
        cfg = self.sweep_config
        out = {"holders": 0, "revoked": 0, "identities": 0, "unavailable": 0}
        if self.directory is None or (cfg.interval <= 0 and not force):
            return out
        now = time.monotonic()
        for tid in tenant_ids:
            if not force and now - self._last_sweep.get(tid, -1e18) < cfg.interval:
                continue
            self._last_sweep[tid] = now
            try:
                holders, revoked, gone = self._sweep_tenant(tid)
            except BackendUnavailable as exc:
                out["unavailable"] += 1
                event(log, "identity.sweep.failed", logging.WARNING, tenant=tid, detail=exc.message)
                continue
            out["holders"] += holders
            out["revoked"] += revoked
            out["identities"] += gone
        return out

    def _sweep_tenant(self, tid: str) -> tuple[int, int, int]:
        assert self.directory is not None
        live = self.base.store.live_user_certificates(tid, int(self.base.now()), self.window(tid))
        holders = sorted({c.requester_oid.lower() for c in live})
        if not holders:
            return 0, 0, 0
        why: dict[str, str] = {}
        for oid, state in self.directory.account_states(tid, holders).items():
            if state in (DISABLED, DELETED):
                why[oid] = f"account {state} in Entra ID"
        if self.sweep_config.risk_level:
            try:
                for oid in self.directory.risky_users(tid, self.sweep_config.risk_level) & set(holders):
                    why.setdefault(oid, f"rated {self.sweep_config.risk_level} risk or above by Entra ID Protection")
            except BackendUnavailable as exc:  # e.g. no Entra ID P2: the account checks still stand
                event(log, "identity.sweep.risk_unavailable", logging.WARNING, tenant=tid, detail=exc.message)
        revoked = 0
        for oid, reason in sorted(why.items()):
            certs = [c for c in live if c.requester_oid.lower() == oid]
            revoked += len(self._revoke(None, tid, oid, certs, reason, {"by": "leaver sweep"}))
        return len(holders), revoked, len(why)

    # ---- one step -----------------------------------------------------------------------------
    def _revoke(
        self,
        who: Identity | None,
        tid: str,
        oid: str,
        certs: list[CertificateRecord],
        reason: str,
        details: dict[str, Any],
    ) -> list[CertificateRecord]:
        done: list[CertificateRecord] = []
        for c in certs:
            try:
                done.append(self.hosts.record_revocation(who, c, reason, {"target_oid": oid}))
            except (Conflict, NotFound):
                continue  # revoked or changed meanwhile: the other write has it
        b = self.base
        upns = sorted({c.requester_upn for c in certs})
        entry = b.audit_entry(
            who,
            "identity.revoked",
            details={
                "target_oid": oid,
                "target_upn": upns[0] if len(upns) == 1 else upns,
                "reason": reason,
                "revoked": len(done),
                "serials": [str(c.serial) for c in done[:MAX_LISTED]],
                "policies": sorted({c.policy_id for c in done}),
                **details,
            },
        )
        b.store.add_audit(replace(entry, tenant_id=tid))
        event(
            log,
            "identity.revoked",
            tenant=tid,
            target=oid,
            revoked=len(done),
            reason=reason,
            actor=who.upn if who else "ezssh",
        )
        return done
