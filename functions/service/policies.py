"""Policies and their CA keys: create (new key or the customer's own), read, change, delete,
rotate, and retire previous keys once no certificate they signed can still be valid."""

from __future__ import annotations

import builtins
import secrets
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from typing import Any

from ..core.audit import AuditEntry, link, with_head
from ..core.errors import (
    CaKeyNotFound,
    Conflict,
    Forbidden,
    InvalidRequest,
    PreconditionFailed,
    PreconditionRequired,
)
from ..core.jsonvalue import JsonValue
from ..core.policy import CaKeyRef, Identity, Policy
from ..core.policydoc import policy_from_document
from ..signing.base import Signer, ssh_fingerprint, ssh_public_key_line
from .base import Base

POLICY_CREATE_REFUSED = "policy.create.refused"
POLICY_UPDATE_REFUSED = "policy.update.refused"


class Policies:
    def __init__(self, base: Base) -> None:
        self.base = base

    # ---- reading --------------------------------------------------------------------------------
    def list(self, who: Identity) -> list[Policy]:
        return sorted(
            (p for p in self.base.policies.all(who.tid) if not p.deleted and self.base.policies.can_see(who, p)),
            key=lambda p: p.id,
        )

    def get(self, who: Identity, policy_id: str) -> Policy:
        return self.base.policies.visible(who, policy_id)

    def ca_public_keys(self, who: Identity, policy_id: str, kind: str = "user") -> builtins.list[CaKeyRef]:
        """Current first, then previous keys still inside their retirement window. `kind` "host" is
        the host CA (made on this first need for policies created before host CAs existed)."""
        p = self.get(who, policy_id)
        if kind == "host":
            return list(self.ensure_host_ca(p, who).trusted_host_ca)
        return list(p.trusted_ca)

    # ---- changing -------------------------------------------------------------------------------
    def create(self, who: Identity, doc: JsonValue) -> Policy:
        """Create a policy with a new CA key, or with `ca_key_id` naming an existing Key Vault key
        (bring your own key: the service proves it can read and sign with it before saving)."""
        b = self.base
        with b.refusing(who, POLICY_CREATE_REFUSED):
            if not who.is_tenant_admin:
                raise Forbidden("Only tenant admins (app role EZSSH.Admin) create policies.")
            customer_key: str | None = None
            customer_host_key: str | None = None
            if isinstance(doc, dict) and ("ca_key_id" in doc or "host_ca_key_id" in doc):
                doc = dict(doc)
                named = {name: doc.pop(name, None) for name in ("ca_key_id", "host_ca_key_id")}
                for name, value in named.items():
                    if value is not None and (not isinstance(value, str) or not value.startswith("https://")):
                        raise InvalidRequest(f"'{name}' must be the https key id of a Key Vault key.")
                customer_key, customer_host_key = (v if isinstance(v, str) else None for v in named.values())
                if customer_key and customer_key == customer_host_key:
                    raise InvalidRequest("The host CA must be another key than the user CA.")
            policy = policy_from_document(
                doc,
                tenant_id=who.tid,
                ttl_ceiling=b.config.max_ttl_ceiling,
                allow_loopback_http=b.config.webhook_allow_loopback_http,
            )
            if b.policies.get_or_none(who.tid, policy.id) is not None:
                raise Conflict(f"A policy with id {policy.id!r} already exists.")
            now = b.now()
            if customer_key:
                ca = self._ca_ref(b.keys.verify_key(customer_key), policy.id, now, customer_owned=True)
            else:
                ca = self._new_ca(policy.id, who.tid, now)
            try:
                if customer_host_key:
                    host_ca = self._ca_ref(
                        b.keys.verify_key(customer_host_key), policy.id, now, customer_owned=True, kind="host"
                    )
                else:
                    host_ca = self._new_ca(policy.id, who.tid, now, kind="host")
            except Exception:
                self.disable_ca(ca)
                raise
        policy = replace(policy, ca=(ca,), host_ca=(host_ca,))
        entry = self._audit(who, "policy.created", policy, None, {"policy": policy.to_dict()})
        try:
            return self._write(lambda: b.store.create_policy(with_head(policy, entry), entry), policy)
        except Exception:
            self._discard_unless_saved(who.tid, policy.id, ca)
            self._discard_unless_saved(who.tid, policy.id, host_ca)
            raise

    def update(self, who: Identity, policy_id: str, patch: JsonValue, if_match: str | None) -> Policy:
        b = self.base
        with b.refusing(who, POLICY_UPDATE_REFUSED, policy_id=policy_id):
            if not if_match:
                raise PreconditionRequired("Send If-Match with the policy's ETag to change it.")
            base = self._admin_policy(who, policy_id, "change", if_match)
            new = policy_from_document(
                patch,
                tenant_id=who.tid,
                ttl_ceiling=b.config.max_ttl_ceiling,
                base=base,
                allow_loopback_http=b.config.webhook_allow_loopback_http,
            )
            if not who.is_tenant_admin and (new.webhook_url, new.webhook_format) != (
                base.webhook_url,
                base.webhook_format,
            ):
                # a webhook URL is a credential and a way out of the network
                raise Forbidden("Only tenant admins set a policy's webhook_url and webhook_format.")
        added = None
        if new.current_host_ca is None:  # created before host CAs existed: it gets one with this edit
            added = self._new_ca(new.id, who.tid, b.now(), kind="host")
            new = replace(new, host_ca=(added,) + new.host_ca)
        before, after = base.to_dict(), new.to_dict()
        changed = {k: {"from": before[k], "to": after[k]} for k in after if before.get(k) != after[k]}
        entry = self._audit(who, "policy.updated", new, base, {"changed": changed})
        try:
            return self._write(lambda: b.store.replace_policy(with_head(new, entry), if_match, entry), new)
        except Exception:
            if added is not None:
                self._discard_unless_saved(who.tid, new.id, added)
            raise

    def ensure_host_ca(self, p: Policy, who: Identity | None = None) -> Policy:
        """The policy with a host CA: one is made (ETag-guarded, audited) if it has none yet. When
        another worker adds one first, theirs is kept and ours disabled."""
        b = self.base
        if p.current_host_ca is not None or p.deleted:
            return p
        new = self._new_ca(p.id, p.tenant_id, b.now(), kind="host")
        with_ca = replace(p, host_ca=(new,) + p.host_ca)
        entry = link(
            replace(
                b.audit_entry(
                    who,
                    "policy.host_ca_created",
                    policy_id=p.id,
                    chain=f"pol:{p.id}",
                    details={"host_ca": new.fingerprint, "reason": "first need"},
                ),
                tenant_id=p.tenant_id,
            ),
            p,
        )
        try:
            return self._write(lambda: b.store.replace_policy(with_head(with_ca, entry), p.etag or "", entry), p)
        except (Conflict, PreconditionFailed):
            self._discard_unless_saved(p.tenant_id, p.id, new)
            fresh = b.policies.get(p.tenant_id, p.id)
            if fresh.current_host_ca is None:
                raise Conflict(f"Policy {p.id!r} changed at the same time; retry.") from None
            return fresh

    def delete(self, who: Identity, policy_id: str, if_match: str | None) -> Policy:
        """Stop issuance at once and disable the policy's CA keys; its records and audit stay."""
        b = self.base
        with b.refusing(who, "policy.delete.refused", policy_id=policy_id):
            if not if_match:
                raise PreconditionRequired("Send If-Match with the policy's ETag to delete it.")
            p = self._admin_policy(who, policy_id, "delete", if_match, tenant_admin_only=True)
        now = b.now()
        retired = tuple(replace(c, state="retired", retire_after=now) for c in p.ca)
        host_retired = tuple(replace(c, state="retired", retire_after=now) for c in p.host_ca)
        gone = replace(p, deleted=True, ca=retired, host_ca=host_retired)
        entry = self._audit(
            who,
            "policy.deleted",
            gone,
            p,
            {"ca_disabled": [c.fingerprint for c in p.ca + p.host_ca if c.state != "retired"]},
        )
        saved = self._write(lambda: b.store.replace_policy(with_head(gone, entry), if_match, entry), gone)
        for c in p.ca + p.host_ca:
            if c.state != "retired":
                self.disable_ca(c)
        return saved

    def rotate_ca(self, who: Identity, policy_id: str, if_match: str | None = None, kind: str = "user") -> Policy:
        """A new current key; the old one stays trusted (listed second) until every certificate it
        signed has expired: max_ttl for the user CA, host_cert_ttl for the host CA."""
        b = self.base
        with b.refusing(who, "policy.rotate.refused", policy_id=policy_id, details={"kind": kind}):
            if kind not in ("user", "host"):
                raise InvalidRequest("'kind' must be user or host.")
            p = self._admin_policy(who, policy_id, "rotate the CA of", if_match)
        now = b.now()
        new = self._new_ca(p.id, who.tid, now, kind=kind)
        window = p.host_cert_ttl if kind == "host" else p.max_ttl
        keys = tuple(
            replace(c, state="previous", retire_after=now + window + b.config.backdate_seconds)
            if c.state == "current"
            else c
            for c in p.ca_keys(kind)
        )
        rotated = replace(p, host_ca=(new,) + keys) if kind == "host" else replace(p, ca=(new,) + keys)
        entry = self._audit(
            who,
            "policy.host_ca_rotated" if kind == "host" else "policy.ca_rotated",
            rotated,
            p,
            {"new": new.fingerprint, "previous": [c.fingerprint for c in keys if c.state == "previous"]},
        )
        try:
            return self._write(lambda: b.store.replace_policy(with_head(rotated, entry), p.etag or "", entry), rotated)
        except Exception:
            self._discard_unless_saved(who.tid, p.id, new)
            raise

    def retire_due_ca_keys(self, tenant_id: str) -> builtins.list[str]:
        """Disable previous CA keys whose certificates can no longer be valid. Returns fingerprints."""
        b = self.base
        now = b.now()
        done: list[str] = []
        for p in b.policies.all(tenant_id):
            due = [
                c
                for c in p.ca + p.host_ca
                if c.state == "previous" and c.retire_after is not None and c.retire_after <= now
            ]
            if not due:
                continue
            keys = tuple(replace(c, state="retired") if c in due else c for c in p.ca)
            host_keys = tuple(replace(c, state="retired") if c in due else c for c in p.host_ca)
            entry = link(
                replace(
                    b.audit_entry(
                        None,
                        "policy.ca_retired",
                        policy_id=p.id,
                        chain=f"pol:{p.id}",
                        details={"retired": [c.fingerprint for c in due]},
                    ),
                    tenant_id=tenant_id,
                ),
                p,
            )
            try:
                self._write(
                    partial(
                        b.store.replace_policy,
                        with_head(replace(p, ca=keys, host_ca=host_keys), entry),
                        p.etag or "",
                        entry,
                    ),
                    p,
                )
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
        except Exception:  # storage still away: keep the key; retiring is cheaper than a lost CA
            return
        if stored is None or all(c.key_ref != ca.key_ref for c in stored.ca + stored.host_ca):
            self.disable_ca(ca)

    def _write(self, write: Callable[[], Policy], policy: Policy) -> Policy:
        try:
            return write()
        finally:
            self.base.policies.changed(policy.tenant_id)

    def _new_ca(self, policy_id: str, tid: str, now: int, kind: str = "user") -> CaKeyRef:
        prefix = "ezh" if kind == "host" else "ez"
        name = f"{prefix}-{tid[:8]}-{policy_id[:30]}-{secrets.token_hex(4)}"
        signer = self.base.keys.create_key(name, self.base.config.ca_key_kind)
        return self._ca_ref(signer, policy_id, now, customer_owned=False, kind=kind)

    def _ca_ref(
        self, signer: Signer, policy_id: str, now: int, *, customer_owned: bool, kind: str = "user"
    ) -> CaKeyRef:
        return CaKeyRef(
            key_ref=signer.key_ref,
            backend=self.base.config.signer_backend,
            public_key=ssh_public_key_line(signer, f"ezssh-{'host-ca' if kind == 'host' else 'ca'}:{policy_id}"),
            fingerprint=ssh_fingerprint(signer.public_key()),
            state="current",
            created_at=now,
            customer_owned=customer_owned,
        )

    def _audit(
        self, who: Identity, action: str, policy: Policy, previous: Policy | None, details: dict[str, Any]
    ) -> AuditEntry:
        return link(
            self.base.audit_entry(who, action, policy_id=policy.id, chain=f"pol:{policy.id}", details=details), previous
        )

    def _admin_policy(
        self, who: Identity, policy_id: str, action: str, if_match: str | None, *, tenant_admin_only: bool = False
    ) -> Policy:
        """The policy `who` may change, read fresh; refusals are audited by the caller."""
        p = self.get(who, policy_id)
        allowed = who.is_tenant_admin if tenant_admin_only else p.is_admin(who)
        if not allowed:
            who_may = "tenant admins" if tenant_admin_only else "tenant admins and this policy's admins"
            raise Forbidden(f"Only {who_may} may {action} policy {policy_id!r}.")
        if if_match is not None and if_match != p.etag:
            raise PreconditionFailed(
                f"Policy {policy_id!r} changed since you read it (ETag mismatch); read it again and retry."
            )
        return p
