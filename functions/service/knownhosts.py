"""Known hosts: what a signed-in user's ssh trusts, the host CAs of the policies they may use,
scoped to the names each may vouch for, and those CAs' host revocations."""

from __future__ import annotations

import base64
import itertools
import json
from collections.abc import Collection
from dataclasses import dataclass

from ..core.krl import CaRevocations, encode_krl
from ..core.namespaces import NOT_AN_ADDRESS, Namespace, trust_scope
from ..core.policy import Identity, Policy
from ..core.records import Revoked
from .base import Base
from .hosts import FOREVER, KRL_EXPIRY_GRACE, Derived, VersionCache, revocations_by_ca
from .namespaces import Namespaces
from .policies import Policies


@dataclass(frozen=True)
class _TrustSnapshot:
    policies: tuple[Policy, ...]  # the tenant's policies (not deleted), by id
    revoked: tuple[Revoked, ...]  # its host revocations still in a KRL
    namespaces: tuple[Namespace, ...]  # its host namespaces (written with the version row too)
    serial: int  # which snapshot of this worker (what a caller's answer was rendered from)


class KnownHosts:
    def __init__(self, base: Base, policies: Policies, namespaces: Namespaces) -> None:
        self.base = base
        self.policies = policies
        self.namespaces = namespaces
        self._trust: VersionCache[_TrustSnapshot] = VersionCache()
        self._serials = itertools.count()
        # per caller, the ETag of the known-hosts last rendered for them from which snapshot: a
        # refresh that changes nothing is a 304 without rendering every policy again
        self._given: VersionCache[Derived] = VersionCache(10_000)

    # Per worker and tenant, the policies and the host revocations still valid, kept while the
    # tenant's version row (written with every policy change and host revocation) is unchanged:
    # an unchanged answer costs one point read; a changed one two range reads, bounded by the
    # tenant's policies and its unexpired host revocations (never a user revocation, never one
    # read per policy).
    def _trust_snapshot(self, tid: str) -> _TrustSnapshot:
        store = self.base.store
        version = store.trust_version(tid)  # first the version, then what it versions
        now = self.base.now()
        hit = self._trust.get(tid, version.tag, now)
        if hit is not None:
            return hit
        policies = tuple(sorted((p for p in self.base.policies.all(tid) if not p.deleted), key=lambda p: p.id))
        revoked = store.list_revoked_host(tid, valid_from=now - KRL_EXPIRY_GRACE + 1)
        fresh_until = min([r.valid_before + KRL_EXPIRY_GRACE for r in revoked], default=FOREVER)
        return self._trust.put(
            tid,
            version.tag,
            fresh_until,
            _TrustSnapshot(policies, tuple(revoked), self.namespaces.current(tid), next(self._serials)),
        )

    def client_trust(self, who: Identity, if_none_match: Collection[str] = ()) -> Derived:
        """known-hosts for the policies `who` may use, as JSON: {known_hosts, krl (base64), policies}:
        per trusted host CA key, `@cert-authority` lines listing exactly the names it may vouch for
        (the intersection of the policy's host patterns with the tenant's host namespaces; never
        `*`), and every revoked certificate of those CAs (for RevokedHostKeys).
        What can't be written exactly is left out, with a comment saying so. A caller whose
        If-None-Match names the ETag this worker last gave it for the same snapshot gets `unchanged`
        without the answer being built again."""
        snap = self._trust_snapshot(who.tid)
        now = self.base.now()
        given = self._given.get((who.tid, who.oid), (snap.serial, who), now)
        if given is not None and given.etag in if_none_match:
            return Derived(b"", given.version, known_etag=given.etag, unchanged=True)
        lines = ["# ezssh: host CAs of the access policies you may use. Generated; do not edit."]
        namespaces = snap.namespaces
        if not namespaces:
            lines.append(
                "# ezssh: your tenant has declared no host namespaces, so no host CA is trusted; a tenant "
                "admin declares them (PUT /api/host-namespaces or EZSSH_HOST_NAMESPACES)."
            )
        revs: list[CaRevocations] = []
        ids: list[str] = []
        latest = 0
        for p in snap.policies:
            if not (p.is_member(who) or p.is_admin(who)):
                continue
            scope = trust_scope(p.hosts, namespaces)
            lines += [f"# ezssh: policy {p.id}: {msg}" for msg in scope.left_out]
            groups = [
                g
                for g in (list(scope.names), list(scope.ipv6), [*scope.ipv4, *NOT_AN_ADDRESS] if scope.ipv4 else [])
                if g
            ]
            if not groups:
                continue
            p = self.policies.ensure_host_ca(p, who)
            ids.append(p.id)
            for c in p.trusted_host_ca:
                key = " ".join(c.public_key.split()[:2])
                for g in groups:
                    # each pattern also as [pattern]:*, the form ssh looks up for a non-standard port
                    pats = [q for x in g for q in ((x,) if x.startswith("!") else (x, f"[{x}]:*"))]
                    lines.append(f"@cert-authority {','.join(pats)} {key} ezssh-host-ca:{p.id}")
            mine = [r for r in snap.revoked if r.policy_id == p.id]
            revs += revocations_by_ca((c.public_key for c in p.trusted_host_ca), mine, now)[0]
            latest = max([latest] + [r.revoked_at for r in mine])
        krl = encode_krl(revs, krl_version=latest, generated_date=latest, comment="ezssh host revocations")
        body = {"known_hosts": "\n".join(lines) + "\n", "krl": base64.b64encode(krl).decode(), "policies": ids}
        answer = Derived(json.dumps(body).encode(), latest)
        self._given.put((who.tid, who.oid), (snap.serial, who), FOREVER, Derived(b"", latest, known_etag=answer.etag))
        return answer
