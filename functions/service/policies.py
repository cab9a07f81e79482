"""Policies and their CA keys: create (new key or the customer's own), read, change, delete,
rotate, and retire previous keys once no certificate they signed can still be valid."""

from __future__ import annotations

import secrets
from dataclasses import replace

from ..core.audit import AuditEntry, link
from ..core.errors import (
    CaKeyNotFound,
    Conflict,
    Forbidden,
    InvalidRequest,
    PreconditionFailed,
    PreconditionRequired,
)
from ..core.policy import CaKeyRef, Identity, Policy, policy_from_document
from ..signing.base import Signer, ssh_fingerprint, ssh_public_key_line
from .base import Base


class Policies:
    def __init__(self, base: Base) -> None:
        self.base = base

    # ---- reading --------------------------------------------------------------------------------
    def list(self, who: Identity) -> list[Policy]:
        return sorted((p for p in self.base.policies.all(who.tid) if not p.deleted and self.base.policies.can_see(who, p)),
                      key=lambda p: p.id)

    def get(self, who: Identity, policy_id: str) -> Policy:
        return self.base.policies.visible(who, policy_id)

    def ca_public_keys(self, who: Identity, policy_id: str) -> list[CaKeyRef]:
        """Current first, then previous keys still inside their retirement window."""
        return list(self.get(who, policy_id).trusted_ca)

    # ---- changing -------------------------------------------------------------------------------
    def create(self, who: Identity, doc: object) -> Policy:
        """Create a policy with a new CA key, or with `ca_key_id` naming an existing Key Vault key
        (bring your own key: the service proves it can read and sign with it before saving)."""
        b = self.base
        with b.refusing(who, "policy.create.refused"):
            if not who.is_tenant_admin:
                raise Forbidden("Only tenant admins (app role EZSSH.Admin) create policies.")
            customer_key: str | None = None
            if isinstance(doc, dict) and "ca_key_id" in doc:
                doc = dict(doc)
                customer_key = doc.pop("ca_key_id")
                if not isinstance(customer_key, str) or not customer_key.startswith("https://"):
                    raise InvalidRequest("'ca_key_id' must be the https key id of a Key Vault key.")
            policy = policy_from_document(doc, tenant_id=who.tid, ttl_ceiling=b.config.max_ttl_ceiling)
            if b.policies.get_or_none(who.tid, policy.id) is not None:
                raise Conflict(f"A policy with id {policy.id!r} already exists.")
            now = b.now()
            if customer_key:
                ca = self._ca_ref(b.keys.verify_key(customer_key), policy.id, now, customer_owned=True)
            else:
                ca = self._new_ca(policy.id, who.tid, now)
        policy = replace(policy, ca=(ca,))
        entry = self._audit(who, "policy.created", policy, None, {"policy": policy.to_dict()})
        try:
            return self._write(lambda: b.store.create_policy(replace(policy, audit_head=entry.hash), entry), policy)
        except Exception:
            self._discard_unless_saved(who.tid, policy.id, ca)
            raise

    def update(self, who: Identity, policy_id: str, patch: object, if_match: str | None) -> Policy:
        b = self.base
        with b.refusing(who, "policy.update.refused", policy_id=policy_id):
            if not if_match:
                raise PreconditionRequired("Send If-Match with the policy's ETag to change it.")
            base = self._admin_policy(who, policy_id, "change", if_match)
            new = policy_from_document(patch, tenant_id=who.tid, ttl_ceiling=b.config.max_ttl_ceiling, base=base)
        before, after = base.to_dict(), new.to_dict()
        changed = {k: {"from": before[k], "to": after[k]} for k in after if before.get(k) != after[k]}
        entry = self._audit(who, "policy.updated", new, base.audit_head, {"changed": changed})
        return self._write(lambda: b.store.replace_policy(replace(new, audit_head=entry.hash), if_match, entry), new)

    def delete(self, who: Identity, policy_id: str, if_match: str | None) -> Policy:
        """Stop issuance at once and disable the policy's CA keys; its records and audit stay."""
        b = self.base
        with b.refusing(who, "policy.delete.refused", policy_id=policy_id):
            if not if_match:
                raise PreconditionRequired("Send If-Match with the policy's ETag to delete it.")
            p = self._admin_policy(who, policy_id, "delete", if_match, tenant_admin_only=True)
        now = b.now()
        retired = tuple(replace(c, state="retired", retire_after=now) for c in p.ca)
        gone = replace(p, deleted=True, ca=retired)
        entry = self._audit(who, "policy.deleted", gone, p.audit_head,
                            {"ca_disabled": [c.fingerprint for c in p.ca if c.state != "retired"]})
        saved = self._write(lambda: b.store.replace_policy(replace(gone, audit_head=entry.hash), if_match, entry), gone)
        for c in p.ca:
            if c.state != "retired":
                self.disable_ca(c)
        return saved

    def rotate_ca(self, who: Identity, policy_id: str, if_match: str | None = None) -> Policy:
        """A new current key; the old one stays trusted (listed second) until max_ttl has passed."""
        b = self.base
        with b.refusing(who, "policy.rotate.refused", policy_id=policy_id):
            p = self._admin_policy(who, policy_id, "rotate the CA of", if_match)
        now = b.now()
        new = self._new_ca(p.id, who.tid, now)
        keys = tuple(
            replace(c, state="previous", retire_after=now + p.max_ttl + b.config.backdate_seconds)
            if c.state == "current" else c
            for c in p.ca
        )
        rotated = replace(p, ca=(new,) + keys)
        entry = self._audit(who, "policy.ca_rotated", rotated, p.audit_head,
                            {"new": new.fingerprint,
                             "previous": [c.fingerprint for c in keys if c.state == "previous"]})
        try:
            return self._write(lambda: b.store.replace_policy(replace(rotated, audit_head=entry.hash), p.etag or "", entry),
                               rotated)
        except Exception:
            self._discard_unless_saved(who.tid, p.id, new)
            raise

    def retire_due_ca_keys(self, tenant_id: str) -> list[str]:
        """Disable previous CA keys whose certificates can no longer be valid. Returns fingerprints."""
        b = self.base
        now = b.now()
        done: list[str] = []
        for p in b.policies.all(tenant_id):
            due = [c for c in p.ca if c.state == "previous" and c.retire_after is not None and c.retire_after <= now]
            if not due:
                continue
            keys = tuple(replace(c, state="retired") if c in due else c for c in p.ca)
            entry = link(replace(b.audit_entry(None, "policy.ca_retired", policy_id=p.id, chain=f"pol:{p.id}",
                                               details={"retired": [c.fingerprint for c in due]}),
                                 tenant_id=tenant_id), p.audit_head)
            try:
                self._write(lambda: b.store.replace_policy(replace(p, ca=keys, audit_head=entry.hash), p.etag or "", entry), p)
            except (Conflict, PreconditionFailed):
                continue  # changed meanwhile; the next sweep retries
            for c in due:
                self.disable_ca(c)
                done.append(c.fingerprint)
        return done

    def disable_ca(self, ca: CaKeyRef) -> None:
        if ca.customer_owned:
            return  # a customer's own key: the policy stops using it; disabling it is theirs to do
        try:
            self.base.keys.disable_key(ca.key_ref)
        except CaKeyNotFound:
            pass  # already gone: the goal (it signs nothing) holds

    # ---- helpers --------------------------------------------------------------------------------
    def _discard_unless_saved(self, tid: str, policy_id: str, ca: CaKeyRef) -> None:
        """After a failed write: disable the key it made, unless the write landed after all (a
        lost answer), in which case the stored policy uses it."""
        try:
            stored = self.base.policies.get_or_none(tid, policy_id)
        except Exception:  # noqa: BLE001 - storage still away: keep the key; retiring is cheaper than a lost CA
            return
        if stored is None or all(c.key_ref != ca.key_ref for c in stored.ca):
            self.disable_ca(ca)

    def _write(self, write, policy: Policy) -> Policy:  # type: ignore[no-untyped-def]
        try:
            return write()
        finally:
            self.base.policies.changed(policy.tenant_id)

    def _new_ca(self, policy_id: str, tid: str, now: int) -> CaKeyRef:
        name = f"ez-{tid[:8]}-{policy_id[:30]}-{secrets.token_hex(4)}"
        signer = self.base.keys.create_key(name, self.base.config.ca_key_kind)  # type: ignore[arg-type]
        return self._ca_ref(signer, policy_id, now, customer_owned=False)

    def _ca_ref(self, signer: Signer, policy_id: str, now: int, *, customer_owned: bool) -> CaKeyRef:
        return CaKeyRef(
            key_ref=signer.key_ref,
            backend=self.base.config.signer_backend,
            public_key=ssh_public_key_line(signer, f"ezssh-ca:{policy_id}"),
            fingerprint=ssh_fingerprint(signer.public_key()),
            state="current",
            created_at=now,
            customer_owned=customer_owned,
        )

    def _audit(self, who: Identity, action: str, policy: Policy, prev_hash: str | None, details: dict) -> AuditEntry:
        return link(self.base.audit_entry(who, action, policy_id=policy.id, chain=f"pol:{policy.id}", details=details),
                    prev_hash)

    def _admin_policy(self, who: Identity, policy_id: str, action: str, if_match: str | None,
                      *, tenant_admin_only: bool = False) -> Policy:
        """The policy `who` may change, read fresh; refusals are audited by the caller."""
        p = self.get(who, policy_id)
        allowed = who.is_tenant_admin if tenant_admin_only else p.is_admin(who)
        if not allowed:
            who_may = "tenant admins" if tenant_admin_only else "tenant admins and this policy's admins"
            raise Forbidden(f"Only {who_may} may {action} policy {policy_id!r}.")
        if if_match is not None and if_match != p.etag:
            raise PreconditionFailed(
                f"Policy {policy_id!r} changed since you read it (ETag mismatch); read it again and retry.")
        return p
