"""Hosts: revocation, the KRL they fetch, and the setup script that makes them trust a policy."""

from __future__ import annotations

import functools
import hashlib
import hmac
import logging
import secrets
import threading
from collections import OrderedDict
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, replace
from typing import Any, Generic, TypeVar

from ..core.audit import AuditEntry, link
from ..core.errors import (
    CaKeyNotFound,
    Conflict,
    Forbidden,
    InvalidRequest,
    NotConfigured,
    NotFound,
    Unauthenticated,
)
from ..core.ids import is_guid
from ..core.keys import fingerprint_of_blob
from ..core.krl import CaRevocations, ca_key_blob, encode_krl
from ..core.policy import Identity, Policy
from ..core.records import CertificateRecord, Revoked
from ..observability import event
from .base import Base

log = logging.getLogger("ezssh.service")

REVOKE_REFUSED = "certificate.revoke.refused"

# Certificates stay in the KRL this long past their valid_before, for hosts whose clock lags.
KRL_EXPIRY_GRACE = 3600
# How much earlier than our last build a revocation we have not seen may be dated: a revocation's
# transaction lands within the request deadline of its time, on a clock a little off ours.
REVOKED_SKEW = 300
# ... and, should a clock be off by more than that, how long such a revocation may stay out of a
# worker's KRL: the revocations still valid are read whole again at least this often.
KRL_READ_WHOLE_EVERY = 3600
FOREVER = 2**63
V = TypeVar("V")


@dataclass(frozen=True)
class Derived:
    """An answer derived from stored rows (a KRL, known-hosts), with its HTTP ETag (a digest of the
    bytes, so equal answers have equal tags on every worker) and the KRL's krl_version. `unchanged`:
    the caller's copy (its If-None-Match) is this answer; the bytes were not built again (empty)."""

    data: bytes
    version: int
    known_etag: str | None = None
    unchanged: bool = False

    @functools.cached_property
    def etag(self) -> str:
        return self.known_etag or f'"{hashlib.sha256(self.data).hexdigest()[:32]}"'


class VersionCache(Generic[V]):
    """Per worker: the last answer built for a key, reused while its version (what was read to build
    it) is the same and it has not expired; at most `size` keys, the least recently used dropped."""

    def __init__(self, size: int = 1024) -> None:
        self._size = size
        self._lock = threading.Lock()
        self._items: OrderedDict[Hashable, tuple[Hashable, int, V]] = OrderedDict()

    def get(self, key: Hashable, version: Hashable, now: int) -> V | None:
        with self._lock:
            hit = self._items.get(key)
            if hit is None or hit[0] != version or now >= hit[1]:
                return None
            self._items.move_to_end(key)
            return hit[2]

    def peek(self, key: Hashable) -> V | None:
        """What is held for `key`, whatever its version and freshness."""
        with self._lock:
            hit = self._items.get(key)
            return hit[2] if hit is not None else None

    def put(self, key: Hashable, version: Hashable, fresh_until: int, value: V) -> V:
        with self._lock:
            self._items[key] = (version, fresh_until, value)
            self._items.move_to_end(key)
            while len(self._items) > self._size:
                self._items.popitem(last=False)
        return value


@dataclass(frozen=True)
class _BuiltKrl:
    """A KRL as built, and what it was built from (for the next build after a revocation)."""

    answer: Derived
    tag: str  # the policy's version row when built
    ca_keys: tuple[str, ...]
    rows: dict[tuple[int, str], Revoked]  # the revocations in it still in a KRL, by (serial, CA)
    built_at: int  # the service's time when built (after its version was read)
    latest: int  # its krl_version
    read_whole_at: int  # when its revocations were last read whole (not only what changed)


def revocations_by_ca(ca_keys: Iterable[str], revoked: Iterable[Revoked], now: int) -> tuple[list[CaRevocations], int]:
    """The serials each CA key (OpenSSH public key lines) revokes among `revoked`, leaving out
    certificates more than KRL_EXPIRY_GRACE past their valid_before; and until when that holds (the
    first moment one of them drops out)."""
    keys = {fingerprint_of_blob(ca_key_blob(k)): k for k in ca_keys}
    serials: dict[str, set[int]] = {fp: set() for fp in keys}
    fresh_until = FOREVER
    for r in revoked:
        if r.ca_fingerprint in serials and r.valid_before + KRL_EXPIRY_GRACE > now:
            serials[r.ca_fingerprint].add(r.serial)
            fresh_until = min(fresh_until, r.valid_before + KRL_EXPIRY_GRACE)
    return [CaRevocations(keys[fp], frozenset(s)) for fp, s in serials.items()], fresh_until


class Hosts:
    def __init__(self, base: Base) -> None:
        self.base = base
        self._krls: VersionCache[_BuiltKrl] = VersionCache()

    # ---- revocation ---------------------------------------------------------------------------
    def revoke_certificate(
        self, who: Identity, policy_id: str, serial: int, reason: str | None = None
    ) -> CertificateRecord:
        """Tenant admins, the policy's admins, or the certificate's own requester revoke it."""
        b = self.base
        with b.refusing(who, REVOKE_REFUSED, policy_id=policy_id, serial=str(serial)):
            if reason is not None and (len(reason) > 1000 or "\n" in reason):
                raise InvalidRequest("'reason' must be one line of at most 1000 characters.")
            policy = b.policies.get_or_none(who.tid, policy_id)
            if policy is None:
                raise NotFound(f"Policy {policy_id!r} was not found.")
            cert = b.store.get_certificate(who.tid, policy_id, serial)
            own = cert.requester_oid == who.oid and cert.tenant_id == who.tid
            if not (own or policy.is_admin(who)):
                if not b.policies.can_see(who, policy):
                    raise NotFound(f"No certificate with serial {serial} was issued under policy {policy_id!r}.")
                raise Forbidden("Only admins of this policy, or the certificate's own requester, may revoke it.")
            if cert.revoked_at is not None:
                return self._revoked_before(who, cert)
            try:
                return self.record_revocation(who, cert, reason, {"own": own})
            except Conflict:  # changed since read: revoked meanwhile, perhaps by this very call's retry
                return self._revoked_before(who, b.store.get_certificate(who.tid, policy_id, serial))

    @staticmethod
    def _revoked_before(who: Identity, cert: CertificateRecord) -> CertificateRecord:
        """A certificate found revoked: this caller's own revocation (a retry, say after a lost answer)
        is answered with the record; anyone else's is a 409 saying whose it was."""
        if cert.revoked_at is not None and cert.revoked_by_oid == who.oid and cert.tenant_id == who.tid:
            return cert
        raise Conflict(
            f"Certificate {cert.serial} of policy {cert.policy_id!r} was already revoked"
            + (f" by {cert.revoked_by}." if cert.revoked_by else "."),
            revoked_at=cert.revoked_at,
            revoked_by=cert.revoked_by,
        )

    def record_revocation(
        self, who: Identity | None, cert: CertificateRecord, reason: str | None, details: dict[str, Any]
    ) -> CertificateRecord:
        """Revoke one certificate the caller may revoke (checked by the caller): the record, its audit
        entry and the KRL's row in one write, conditional on the ETag it was read with. `who` None: the
        service itself (the leaver sweep)."""
        b = self.base
        revoked = replace(
            cert, revoked_at=b.now(), revoked_by=who.upn if who else "ezssh", revoked_by_oid=who.oid if who else None
        )
        entry = b.audit_entry(
            who,
            "certificate.revoked",
            request_id=cert.request_id,
            policy_id=cert.policy_id,
            key_id=cert.key_id,
            serial=str(cert.serial),
            host=cert.host,
            chain=f"crt:{cert.policy_id}:{cert.serial}",
            details={
                "reason": reason,
                "requester_upn": cert.requester_upn,
                "valid_before": cert.valid_before,
                **details,
            },
        )
        entry = link(replace(entry, tenant_id=cert.tenant_id), None)
        saved = b.store.revoke_certificate(revoked, cert.etag or "", entry)
        event(
            log,
            "certificate.revoked",
            key_id=cert.key_id,
            serial=cert.serial,
            policy=cert.policy_id,
            actor=who.upn if who else "ezssh",
            tenant=cert.tenant_id,
        )
        return saved

    # ---- the KRL ------------------------------------------------------------------------------
    # Built from the policy's revocations still valid (a range read keyed by expiry) and kept per
    # worker by version: a fetch reads the policy's version row and, while it and the policy's CA
    # keys are unchanged and nothing has expired out, returns the bytes built before.
    def krl(self, policy: Policy) -> Derived:
        """The policy's KRL: every revoked serial per CA key still trusted, user and host CAs alike.

        Byte-stable for the same revocations: krl_version and generated_date are the time of the
        latest revocation, so hosts replace their copy only when something was revoked (or expired
        out of it, KRL_EXPIRY_GRACE after its valid_before).

        A worker that built the KRL before reads, once the version moved, only the revocations
        recorded since (minus REVOKED_SKEW for a revocation whose transaction landed after our last
        read but carries an earlier time), and drops expired ones in memory: after a revocation the
        next fetch reads a few rows, not every revocation still valid."""
        store = self.base.store
        version = store.trust_version(policy.tenant_id, policy.id)  # first the version, then what it versions
        ca_keys = tuple(c.public_key for c in policy.trusted_ca + policy.trusted_host_ca)
        key, ver, now = (policy.tenant_id, policy.id), (version.tag, ca_keys), self.base.now()
        hit = self._krls.get(key, ver, now)
        if hit is not None:
            return hit.answer
        held = self._krls.peek(key)
        if held is not None and held.ca_keys == ca_keys and now - held.read_whole_at < KRL_READ_WHOLE_EVERY:
            rows = dict(held.rows)
            if held.tag != version.tag:
                since = store.list_revoked_since(policy.tenant_id, policy.id, revoked_from=held.built_at - REVOKED_SKEW)
                rows.update({(r.serial, r.ca_fingerprint): r for r in since})
            latest = max([held.latest, version.at] + [r.revoked_at for r in rows.values()])
            read_whole_at = held.read_whole_at
        else:
            read = store.list_revoked(policy.tenant_id, policy.id, valid_from=now - KRL_EXPIRY_GRACE + 1)
            rows = {(r.serial, r.ca_fingerprint): r for r in read}
            latest = max([version.at] + [r.revoked_at for r in read])
            read_whole_at = now
        revs, fresh_until = revocations_by_ca(ca_keys, rows.values(), now)
        fresh_until = min(fresh_until, read_whole_at + KRL_READ_WHOLE_EVERY)
        rows = {k: r for k, r in rows.items() if r.valid_before + KRL_EXPIRY_GRACE > now}
        data = encode_krl(
            revs,
            krl_version=latest,
            generated_date=latest,
            comment=f"ezssh policy {policy.id} tenant {policy.tenant_id}",
        )
        built = _BuiltKrl(Derived(data, latest), version.tag, ca_keys, rows, now, latest, read_whole_at)
        return self._krls.put(key, ver, fresh_until, built).answer

    def krl_for(self, who: Identity, policy_id: str) -> Derived:
        return self.krl(self.base.policies.visible(who, policy_id))

    def krl_for_host(self, tenant_id: str | None, policy_id: str, host_token: str) -> Derived:
        """A host's unauthenticated fetch: the policy's host token is the capability."""
        b = self.base
        with b.refusing(None, "krl.refused", policy_id=policy_id, details={"tenant": (tenant_id or "")[:64]}):
            if not tenant_id:
                raise InvalidRequest("A host token fetch needs the 'tenant' query parameter.")
            stored = b.store.get_host_token(tenant_id, policy_id) if is_guid(tenant_id) else None
            # compare even when nothing is stored, so timing says nothing about which part was wrong
            ok = hmac.compare_digest((stored or "\0" * 43).encode(), host_token.encode())
            policy = b.policies.get_or_none(tenant_id, policy_id) if ok and stored else None
            if policy is None:
                raise Unauthenticated("The host token is not valid for this tenant and policy.")
        return self.krl(policy)

    # ---- setup script -------------------------------------------------------------------------
    def host_token(self, policy: Policy) -> str:
        """The policy's host token (made on first use; the first writer wins)."""
        return self.base.store.ensure_host_token(policy.tenant_id, policy.id, secrets.token_urlsafe(32))

    def render_setup(self, policy: Policy, api_url: str, krl: bytes | None = None, host_certs: str = "") -> str:
        from ..hosts.setup import HostSetup, render_setup_script

        keys = tuple(c.public_key for c in policy.trusted_ca)
        if not keys:
            raise CaKeyNotFound(f"Policy {policy.id!r} has no CA key to trust.")
        return render_setup_script(
            HostSetup(
                api_url=api_url,
                tenant_id=policy.tenant_id,
                policy_id=policy.id,
                ca_public_keys=keys,
                host_token=self.host_token(policy),
                krl=krl if krl is not None else self.krl(policy).data,
                host_certs=host_certs,
            )
        )

    def host_setup_script(self, who: Identity, policy_id: str, api_url: str | None) -> str:
        """The setup script for a policy (its CA keys, host token and current KRL rendered in).
        For the policy's admins only: the script carries the host token. `api_url` is the
        deployment's EZSSH_PUBLIC_URL, never anything taken from the request."""
        from ..hosts.setup import RenderError

        with self.base.refusing(who, "policy.host_setup.refused", policy_id=policy_id):
            policy = self.base.policies.visible(who, policy_id)
            if not policy.is_admin(who):
                raise Forbidden(
                    f"Only tenant admins and admins of policy {policy_id!r} get its host setup script "
                    "(it carries the policy's host token)."
                )
            if not api_url:
                raise NotConfigured(
                    "EZSSH_PUBLIC_URL is not set, so the setup script cannot tell hosts where this service is."
                )
            try:
                script = self.render_setup(policy, api_url)
            except RenderError as exc:
                raise NotConfigured(f"The setup script cannot be rendered: {exc}") from None
        self.record(
            self.base.audit_entry(who, "policy.host_setup", policy_id=policy.id, details={"api_url": api_url}).sealed()
        )
        return script

    def policy(self, who: Identity, policy_id: str) -> Policy:
        return self.base.policies.visible(who, policy_id)

    def record(self, entry: AuditEntry) -> None:
        """An audit entry about a host (setup handed out, enrolment outcome)."""
        self.base.store.add_audit(entry)

    def policies_with_ca(self, tenant_id: str, *, cached: bool = False) -> list[Policy]:
        """`cached`: from the worker's short policy cache (events arrive in bursts: a scale set of
        1,000 VMs is 1,000 events, not 1,000 reads of every policy)."""
        every = self.base.policies.cached(tenant_id) if cached else self.base.policies.all(tenant_id)
        return [p for p in every if not p.deleted and p.current_ca is not None]
