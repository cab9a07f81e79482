"""Use cases. Each takes the caller's Identity, checks what it may do, and leaves an audit entry.

The service knows storage and signing only through their interfaces (storage.base.Store,
signing.base.KeyStore); wiring.py hands it the concrete adapters.
"""

from __future__ import annotations

import logging
import re
import secrets
import threading
import time
from dataclasses import dataclass, replace
from typing import Callable, Protocol, Sequence

from .core import approval as sm
from .core.audit import AuditEntry, link, verify_chain
from .core.certificate import IssuedCertificate, build_certificate, new_serial, verify_issued
from .core.errors import (
    CaKeyNotFound,
    Conflict,
    Denied,
    EzsshError,
    Forbidden,
    InvalidRequest,
    NotFound,
    PreconditionFailed,
    PreconditionRequired,
    TtlTooLong,
)
from .core.keys import VettedKey, parse_public_key
from .core.policy import (
    AccessRequest,
    CaKeyRef,
    Identity,
    Policy,
    allowed_principals,
    choose_policy,
    make_grant,
    policy_from_document,
    resolve_ttl,
)
from .signing.base import KeyStore, Signer, as_private_key, ssh_fingerprint, ssh_public_key_line
from .notify import Message
from .observability import event
from .storage.base import CertificateRecord, Store

log = logging.getLogger("ezssh.service")


class Notifier(Protocol):
    def send(self, msg: Message) -> None: ...


@dataclass(frozen=True)
class ServiceConfig:
    signer_backend: str
    ca_key_kind: str = "EC-P256"
    max_ttl_ceiling: int = 24 * 3600
    backdate_seconds: int = 60
    # How long a worker may reuse a tenant's policy list on the issuance path. Changes made through
    # this worker apply at once; other workers see them within this many seconds. A deleted policy
    # issues nothing even from a stale cache: its CA keys are disabled at deletion.
    policy_cache_seconds: float = 5.0


@dataclass(frozen=True)
class Outcome:
    """What request_access / issue return; the API renders it."""

    status: str  # issued | approved | pending
    request: sm.RequestRecord
    certificate: IssuedCertificate | None = None
    approvers_needed: int = 0
    approvers: dict | None = None  # who may approve: {"users": [...], "groups": [...]}


def new_request_id() -> str:
    return secrets.token_hex(12)


class Service:
    def __init__(
        self,
        store: Store,
        keys: KeyStore,
        config: ServiceConfig,
        clock: Callable[[], float] = time.time,
        notifier: Notifier | None = None,
    ) -> None:
        self.notifier = notifier
        self.store = store
        self.keys = keys
        self.config = config
        self.clock = clock
        self._signers: dict[str, Signer] = {}
        self._policy_cache: dict[str, tuple[float, list[Policy]]] = {}
        self._signers_lock = threading.Lock()

    # ---- helpers ----------------------------------------------------------------------------
    def _audit(self, who: Identity | None, action: str, outcome: str = "ok", **fields: object) -> AuditEntry:
        return AuditEntry(
            tenant_id=who.tid if who else "",
            at=self.clock(),
            action=action,
            outcome=outcome,
            actor_oid=who.oid if who else None,
            actor_upn=who.upn if who else None,
            **fields,  # type: ignore[arg-type]
        )

    def refuse(self, who: Identity | None, exc: EzsshError, action: str, **fields: object) -> None:
        """Record a refusal. Never lets a storage failure hide the original error."""
        entry = self._audit(who, action, "refused", error_code=exc.code, message=exc.message, **fields).sealed()
        try:
            self.store.add_audit(entry)
        except Exception:  # noqa: BLE001
            log.exception("could not record refusal %s for %s", exc.code, who.oid if who else "-")
        event(log, action, error=exc.code, actor=who.upn if who else None, tenant=who.tid if who else None,
              policy=fields.get("policy_id"), request=fields.get("request_id"), detail=exc.message)

    def _signer(self, ca: CaKeyRef) -> Signer:
        with self._signers_lock:
            s = self._signers.get(ca.key_ref)
        if s is None:
            s = self.keys.get_signer(ca.key_ref)
            with self._signers_lock:
                self._signers[ca.key_ref] = s
        return s

    def _cached_policies(self, tid: str) -> list[Policy]:
        ttl = self.config.policy_cache_seconds
        now = time.monotonic()
        hit = self._policy_cache.get(tid)
        if ttl > 0 and hit is not None and now - hit[0] < ttl:
            return hit[1]
        policies = self.store.list_policies(tid)
        self._policy_cache[tid] = (now, policies)
        return policies

    def _policies_changed(self, tid: str) -> None:
        self._policy_cache.pop(tid, None)

    def _write_policy(self, write: Callable[..., Policy], policy: Policy, *args: object) -> Policy:
        try:
            return write(policy, *args)
        finally:
            self._policies_changed(policy.tenant_id)

    def forget_signer(self, key_ref: str) -> None:
        with self._signers_lock:
            self._signers.pop(key_ref, None)

    def _sign(self, policy: Policy, rec: sm.RequestRecord, who: Identity, key: VettedKey) -> IssuedCertificate:
        ca = policy.current_ca
        if ca is None:
            raise CaKeyNotFound(f"Policy {policy.id!r} has no current CA key.")
        grant = make_grant(policy, rec.id, who.upn, rec.principal, rec.ttl_seconds, self.config.backdate_seconds)
        signer = self._signer(ca)
        now = int(self.clock())
        issued = build_certificate(grant, key, as_private_key(signer), now=now, serial=new_serial())
        verify_issued(issued, grant, key, signer.public_key(), now=now)
        return issued

    # ---- requests -----------------------------------------------------------------------------
    def request_access(self, who: Identity, req: AccessRequest, public_key: str | None,
                       *, _fresh: bool = False) -> Outcome:
        fields = dict(host=req.host, principal=req.principal, policy_id=req.policy_id)
        try:
            try:
                decision = choose_policy(who, req, self._cached_policies(who.tid))
            except (Denied, TtlTooLong):
                # A refusal is never decided on cached data: a policy created or widened on
                # another worker a moment ago must apply at once.
                self._policies_changed(who.tid)
                decision = choose_policy(who, req, self._cached_policies(who.tid))
            vetted = parse_public_key(public_key) if public_key is not None else None
        except EzsshError as exc:
            self.refuse(who, exc, "request.refused", **fields)
            raise
        policy = decision.policy
        now = int(self.clock())
        rid = new_request_id()
        rec = sm.RequestRecord(
            id=rid,
            tenant_id=who.tid,
            policy_id=policy.id,
            requester_oid=who.oid,
            requester_upn=who.upn,
            host=req.host,
            principal=req.principal,
            ttl_seconds=decision.ttl_seconds,
            state=sm.APPROVED if decision.action == "auto" else sm.PENDING,
            created_at=now,
            expires_at=now + (sm.ISSUE_WINDOW if decision.action == "auto" else policy.request_ttl),
            approvals_required=0 if decision.action == "auto" else policy.approvals_required,
            reason=req.reason,
        )
        created = link(
            self._audit(who, "request.created", request_id=rid, policy_id=policy.id, host=req.host,
                        principal=req.principal, chain=f"req:{rid}",
                        details={"decision": decision.action, "ttl_seconds": decision.ttl_seconds,
                                 "reason": req.reason}),
            None,
        )
        if decision.action == "auto" and vetted is not None:
            try:
                issued = self._sign(policy, rec, who, vetted)
            except CaKeyNotFound:
                if _fresh:
                    raise
                # The cached policy is stale (its CA was rotated out or the policy deleted on
                # another worker): decide again on fresh data.
                self._policies_changed(who.tid)
                return self.request_access(who, req, public_key, _fresh=True)
            final = replace(rec, state=sm.ISSUED, serial=issued.serial, key_id=issued.key_id)
            entry = link(self._issued_audit(who, final, issued, vetted), created)
            final = replace(final, audit_head=entry.hash)
            self.store.record_issuance(final, None, self._cert_record(final, issued, vetted), [created, entry])
            event(log, "certificate.issued", key_id=issued.key_id, serial=issued.serial, request=rid,
                  policy=policy.id, tenant=who.tid)
            return Outcome("issued", final, issued)
        rec = self.store.create_request(replace(rec, audit_head=created.hash), created)
        event(log, f"request.{rec.state}", request=rid, policy=policy.id, actor=who.upn, tenant=who.tid)
        if rec.state == sm.PENDING:
            self._notify(policy, rec, f"ezssh: {who.upn} asks for access to {rec.host}",
                         (("Approve with", f"ezssh requests approve {rec.id}"),))
        return Outcome(rec.state, rec, approvers_needed=rec.approvals_required,
                       approvers=policy.approvers.to_dict() if rec.state == sm.PENDING else None)

    def _notify(self, policy: Policy | None, rec: sm.RequestRecord, title: str,
                extra: tuple[tuple[str, str], ...] = ()) -> None:
        if self.notifier is None or policy is None or not policy.webhook_url:
            return
        facts = (
            ("Requester", rec.requester_upn),
            ("Host", rec.host),
            ("Login", rec.principal),
            ("For", f"{rec.ttl_seconds // 60} min"),
            ("Reason", rec.reason or "-"),
            ("Policy", rec.policy_id),
            ("Request", rec.id),
        ) + extra
        self.notifier.send(Message(rec.tenant_id, policy.webhook_url, policy.webhook_format, title, facts,
                                   request_id=rec.id, policy_id=rec.policy_id))

    def _issued_audit(self, who: Identity, rec: sm.RequestRecord, issued: IssuedCertificate,
                      key: VettedKey) -> AuditEntry:
        return self._audit(
            who, "certificate.issued", request_id=rec.id, policy_id=rec.policy_id, key_id=issued.key_id,
            serial=str(issued.serial), host=rec.host, principal=rec.principal, chain=f"req:{rec.id}",
            details={"valid_after": issued.valid_after, "valid_before": issued.valid_before,
                     "ca_fingerprint": issued.ca_fingerprint, "public_key_fingerprint": key.fingerprint,
                     "principals": list(issued.principals)},
        )

    @staticmethod
    def _cert_record(rec: sm.RequestRecord, issued: IssuedCertificate, key: VettedKey) -> CertificateRecord:
        return CertificateRecord(
            tenant_id=rec.tenant_id, policy_id=rec.policy_id, serial=issued.serial, key_id=issued.key_id,
            request_id=rec.id, requester_oid=rec.requester_oid, requester_upn=rec.requester_upn,
            principals=issued.principals, host=rec.host, valid_after=issued.valid_after,
            valid_before=issued.valid_before, ca_fingerprint=issued.ca_fingerprint,
            public_key_fingerprint=key.fingerprint, certificate=issued.openssh,
        )

    def _visible_request(self, who: Identity, request_id: str) -> tuple[sm.RequestRecord, Policy | None]:
        rec = self.store.get_request(who.tid, request_id)
        policy = self._policy_or_none(who.tid, rec.policy_id)
        if rec.requester_is(who):
            return rec, policy
        if policy is not None and (policy.is_approver(who) or policy.is_admin(who)):
            return rec, policy
        raise NotFound(f"Request {request_id!r} was not found.")

    def _policy_or_none(self, tid: str, pid: str) -> Policy | None:
        try:
            return self.store.get_policy(tid, pid)
        except NotFound:
            return None

    def get_request(self, who: Identity, request_id: str) -> sm.RequestRecord:
        return self._visible_request(who, request_id)[0]

    def list_requests(self, who: Identity, *, state: str | None = None, role: str | None = None) -> list[sm.RequestRecord]:
        now = int(self.clock())
        stored_state = state if state in (None, sm.DENIED, sm.CANCELLED, sm.ISSUED) else None
        recs = self.store.list_requests(who.tid, stored_state)
        policies = {p.id: p for p in self.store.list_policies(who.tid)}
        out = []
        for r in recs:
            p = policies.get(r.policy_id)
            mine = r.requester_is(who)
            approver = p is not None and p.is_approver(who) and not mine
            if role == "approver" and not approver:
                continue
            if role == "requester" and not mine:
                continue
            if not (mine or approver or (p is not None and p.is_admin(who))):
                continue
            if state and r.effective_state(now) != state:
                continue
            out.append(r)
        return sorted(out, key=lambda r: r.created_at, reverse=True)

    def issue_for_request(self, who: Identity, request_id: str, public_key: str) -> Outcome:
        try:
            rec, policy = self._visible_request(who, request_id)
            if not rec.requester_is(who):
                raise Forbidden("Only the requester may fetch the certificate for a request.")
            vetted = parse_public_key(public_key)
            now = int(self.clock())
            if rec.effective_state(now) != sm.APPROVED:
                raise Conflict(f"Request {rec.id} is {rec.effective_state(now)}; no certificate can be issued.",
                               state=rec.effective_state(now))
            if policy is None or policy.deleted:
                raise Denied(f"Policy {rec.policy_id!r} no longer exists.")
            # The approval is bound to the host, principal and TTL asked for; the policy may have
            # tightened since, and then the tighter rule wins.
            resolve_ttl(policy, rec.ttl_seconds)
            if not policy.covers_host(rec.host) or rec.principal not in allowed_principals(policy.principals, rec.requester_upn):
                raise Denied(f"Policy {policy.id!r} no longer allows this host or login.")
        except EzsshError as exc:
            self.refuse(who, exc, "certificate.refused", request_id=request_id)
            raise
        issued = self._sign(policy, rec, who, vetted)
        final = sm.mark_issued(rec, who, now, serial=issued.serial, key_id=issued.key_id)
        entry = link(self._issued_audit(who, final, issued, vetted), rec.audit_head)
        final = replace(final, audit_head=entry.hash)
        self.store.record_issuance(final, rec.etag, self._cert_record(final, issued, vetted), [entry])
        event(log, "certificate.issued", key_id=issued.key_id, serial=issued.serial, request=rec.id,
              policy=rec.policy_id, tenant=who.tid)
        return Outcome("issued", final, issued)

    def _transition(self, who: Identity, request_id: str, action: str, comment: str | None) -> sm.RequestRecord:
        try:
            rec, policy = self._visible_request(who, request_id)
            now = int(self.clock())
            if action in ("approve", "deny"):
                if policy is None or not policy.is_approver(who):
                    raise Forbidden("You are not an approver for this request's policy.")
            fn = {"approve": sm.approve, "deny": sm.deny, "cancel": sm.cancel}[action]
            new = fn(rec, who, now, comment=comment)
        except EzsshError as exc:
            self.refuse(who, exc, f"request.{action}.refused", request_id=request_id)
            raise
        past = {"approve": "approved", "deny": "denied", "cancel": "cancelled"}[action]
        entry = link(self._audit(who, f"request.{past}", request_id=rec.id, policy_id=rec.policy_id,
                                 host=rec.host, principal=rec.principal, chain=f"req:{rec.id}",
                                 details={"comment": comment, "state": new.state,
                                          "approvals": len(new.approvals)}), rec.audit_head)
        assert rec.etag is not None
        saved = self.store.update_request(replace(new, audit_head=entry.hash), rec.etag, entry)
        event(log, f"request.{past}", request=rec.id, policy=rec.policy_id, actor=who.upn, tenant=who.tid,
              state=saved.state)
        if saved.state in (sm.APPROVED, sm.DENIED):
            verdict = "approved" if saved.state == sm.APPROVED else "denied"
            self._notify(policy, saved, f"ezssh: {saved.requester_upn}'s request was {verdict} by {who.upn}",
                         (("Comment", comment or "-"),))
        return saved

    def expire_requests(self, tenant_id: str) -> list[str]:
        """Move pending/approved requests past their deadline to `expired` (the timer's sweep).
        Reads check expiry too, so this only makes storage and the audit say so."""
        now = int(self.clock())
        done = []
        for rec in self.store.list_requests(tenant_id):
            if rec.state not in (sm.PENDING, sm.APPROVED) or rec.effective_state(now) != sm.EXPIRED:
                continue
            new = sm.expire(rec, now)
            entry = link(AuditEntry(tenant_id=tenant_id, at=self.clock(), action="request.expired", outcome="ok",
                                    request_id=rec.id, policy_id=rec.policy_id, host=rec.host,
                                    principal=rec.principal, chain=f"req:{rec.id}",
                                    details={"was": rec.state}), rec.audit_head)
            try:
                self.store.update_request(replace(new, audit_head=entry.hash), rec.etag or "", entry)
            except (Conflict, NotFound):
                continue  # decided or swept meanwhile
            done.append(rec.id)
            self._notify(self._policy_or_none(tenant_id, rec.policy_id), new,
                         f"ezssh: {rec.requester_upn}'s request expired")
        return done

    def housekeeping(self, tenant_ids: Sequence[str]) -> dict[str, int]:
        """The timer's work: expire stale requests and retire CA keys past their window."""
        expired = retired = 0
        for tid in tenant_ids:
            expired += len(self.expire_requests(tid))
            retired += len(self.retire_due_ca_keys(tid))
        return {"expired_requests": expired, "retired_ca_keys": retired}

    def approve(self, who: Identity, request_id: str, comment: str | None = None) -> sm.RequestRecord:
        return self._transition(who, request_id, "approve", comment)

    def deny(self, who: Identity, request_id: str, comment: str | None = None) -> sm.RequestRecord:
        return self._transition(who, request_id, "deny", comment)

    def cancel(self, who: Identity, request_id: str, comment: str | None = None) -> sm.RequestRecord:
        return self._transition(who, request_id, "cancel", comment)

    # ---- policies -----------------------------------------------------------------------------
    def _new_ca(self, policy_id: str, tid: str, now: int) -> CaKeyRef:
        name = f"ez-{tid[:8]}-{policy_id[:30]}-{secrets.token_hex(4)}"
        signer = self.keys.create_key(name, self.config.ca_key_kind)  # type: ignore[arg-type]
        return CaKeyRef(
            key_ref=signer.key_ref,
            backend=self.config.signer_backend,
            public_key=ssh_public_key_line(signer, f"ezssh-ca:{policy_id}"),
            fingerprint=ssh_fingerprint(signer.public_key()),
            state="current",
            created_at=now,
        )

    def _policy_audit(self, who: Identity, action: str, policy: Policy, prev_hash: str | None,
                      details: dict) -> AuditEntry:
        return link(self._audit(who, action, policy_id=policy.id, chain=f"pol:{policy.id}", details=details),
                    prev_hash)

    def create_policy(self, who: Identity, doc: object) -> Policy:
        """Create a policy with a new CA key, or with `ca_key_id` naming an existing Key Vault key
        (bring your own key: the service proves it can read and sign with it before saving)."""
        byok: str | None = None
        try:
            if not who.is_tenant_admin:
                raise Forbidden("Only tenant admins (app role EZSSH.Admin) create policies.")
            if isinstance(doc, dict) and "ca_key_id" in doc:
                doc = dict(doc)
                byok = doc.pop("ca_key_id")
                if not isinstance(byok, str) or not byok.startswith("https://"):
                    raise InvalidRequest("'ca_key_id' must be the https key id of a Key Vault key.")
            policy = policy_from_document(doc, tenant_id=who.tid, ttl_ceiling=self.config.max_ttl_ceiling)
            if self._policy_or_none(who.tid, policy.id) is not None:
                raise Conflict(f"A policy with id {policy.id!r} already exists.")
            now = int(self.clock())
            ca = self._adopt_ca(policy.id, byok, now) if byok else self._new_ca(policy.id, who.tid, now)
        except EzsshError as exc:
            self.refuse(who, exc, "policy.create.refused")
            raise
        policy = replace(policy, ca=(ca,))
        entry = self._policy_audit(who, "policy.created", policy, None, {"policy": policy.to_dict()})
        try:
            return self._write_policy(self.store.create_policy, replace(policy, audit_head=entry.hash), entry)
        except Conflict:
            if not byok:
                self.keys.disable_key(ca.key_ref)
            raise

    def _adopt_ca(self, policy_id: str, kid: str, now: int) -> CaKeyRef:
        verify = getattr(self.keys, "verify_key", None)
        if verify is None:
            raise InvalidRequest("Bring-your-own-key needs the Key Vault signer backend.")
        signer = verify(kid)  # raises with the exact missing permission
        return CaKeyRef(
            key_ref=signer.key_ref,
            backend=f"{self.config.signer_backend}-byok",
            public_key=ssh_public_key_line(signer, f"ezssh-ca:{policy_id}"),
            fingerprint=ssh_fingerprint(signer.public_key()),
            state="current",
            created_at=now,
        )

    def list_policies(self, who: Identity) -> list[Policy]:
        return sorted(
            (p for p in self.store.list_policies(who.tid) if not p.deleted and self._can_see(who, p)),
            key=lambda p: p.id,
        )

    @staticmethod
    def _can_see(who: Identity, p: Policy) -> bool:
        return p.is_admin(who) or p.is_member(who) or p.is_approver(who)

    def get_policy(self, who: Identity, policy_id: str) -> Policy:
        p = self._policy_or_none(who.tid, policy_id)
        if p is None or p.deleted or not self._can_see(who, p):
            raise NotFound(f"Policy {policy_id!r} was not found.")
        return p

    def _admin_policy(self, who: Identity, policy_id: str, action: str, if_match: str | None,
                      *, tenant_admin_only: bool = False) -> Policy:
        """The policy `who` may change, read fresh; refusals are audited by the caller."""
        p = self.get_policy(who, policy_id)
        allowed = who.is_tenant_admin if tenant_admin_only else p.is_admin(who)
        if not allowed:
            who_may = "tenant admins" if tenant_admin_only else "tenant admins and this policy's admins"
            raise Forbidden(f"Only {who_may} may {action} policy {policy_id!r}.")
        if if_match is not None and if_match != p.etag:
            raise PreconditionFailed(
                f"Policy {policy_id!r} changed since you read it (ETag mismatch); read it again and retry.")
        return p

    def update_policy(self, who: Identity, policy_id: str, patch: object, if_match: str | None) -> Policy:
        try:
            if not if_match:
                raise PreconditionRequired("Send If-Match with the policy's ETag to change it.")
            base = self._admin_policy(who, policy_id, "change", if_match)
            new = policy_from_document(patch, tenant_id=who.tid, ttl_ceiling=self.config.max_ttl_ceiling,
                                       base=base)
        except EzsshError as exc:
            self.refuse(who, exc, "policy.update.refused", policy_id=policy_id)
            raise
        before, after = base.to_dict(), new.to_dict()
        changed = {k: {"from": before[k], "to": after[k]} for k in after if before.get(k) != after[k]}
        entry = self._policy_audit(who, "policy.updated", new, base.audit_head, {"changed": changed})
        return self._write_policy(self.store.replace_policy, replace(new, audit_head=entry.hash), if_match, entry)

    def delete_policy(self, who: Identity, policy_id: str, if_match: str | None) -> Policy:
        """Stop issuance at once and disable the policy's CA keys; its records and audit stay."""
        try:
            if not if_match:
                raise PreconditionRequired("Send If-Match with the policy's ETag to delete it.")
            p = self._admin_policy(who, policy_id, "delete", if_match, tenant_admin_only=True)
        except EzsshError as exc:
            self.refuse(who, exc, "policy.delete.refused", policy_id=policy_id)
            raise
        now = int(self.clock())
        retired = tuple(replace(c, state="retired", retire_after=now) for c in p.ca)
        gone = replace(p, deleted=True, ca=retired)
        entry = self._policy_audit(who, "policy.deleted", gone, p.audit_head,
                                   {"ca_disabled": [c.fingerprint for c in p.ca if c.state != "retired"]})
        saved = self._write_policy(self.store.replace_policy, replace(gone, audit_head=entry.hash), if_match, entry)
        for c in p.ca:
            if c.state != "retired":
                self._disable_ca(c)
        return saved

    def _disable_ca(self, ca: CaKeyRef) -> None:
        self.forget_signer(ca.key_ref)
        if ca.backend.endswith("-byok"):
            return  # a customer's own key: the policy stops using it; disabling it is theirs to do
        try:
            self.keys.disable_key(ca.key_ref)
        except CaKeyNotFound:
            pass  # already gone: the goal (it signs nothing) holds

    def rotate_ca(self, who: Identity, policy_id: str, if_match: str | None = None) -> Policy:
        """A new current key; the old one stays trusted (listed second) until max_ttl has passed."""
        try:
            p = self._admin_policy(who, policy_id, "rotate the CA of", if_match)
        except EzsshError as exc:
            self.refuse(who, exc, "policy.rotate.refused", policy_id=policy_id)
            raise
        now = int(self.clock())
        new = self._new_ca(p.id, who.tid, now)
        keys = tuple(
            replace(c, state="previous", retire_after=now + p.max_ttl + self.config.backdate_seconds)
            if c.state == "current" else c
            for c in p.ca
        )
        rotated = replace(p, ca=(new,) + keys)
        entry = self._policy_audit(who, "policy.ca_rotated", rotated, p.audit_head,
                                   {"new": new.fingerprint,
                                    "previous": [c.fingerprint for c in keys if c.state == "previous"]})
        try:
            return self._write_policy(self.store.replace_policy, replace(rotated, audit_head=entry.hash), p.etag or "", entry)
        except (Conflict, PreconditionFailed):
            self._disable_ca(new)
            raise

    def retire_due_ca_keys(self, tenant_id: str) -> list[str]:
        """Disable previous CA keys whose certificates can no longer be valid. Returns fingerprints."""
        now = int(self.clock())
        done: list[str] = []
        for p in self.store.list_policies(tenant_id):
            due = [c for c in p.ca if c.state == "previous" and c.retire_after is not None and c.retire_after <= now]
            if not due:
                continue
            keys = tuple(replace(c, state="retired") if c in due else c for c in p.ca)
            entry = link(self._audit(None, "policy.ca_retired", policy_id=p.id, chain=f"pol:{p.id}",
                                     details={"retired": [c.fingerprint for c in due]}), p.audit_head)
            entry = replace(entry, tenant_id=tenant_id).sealed()
            try:
                self._write_policy(self.store.replace_policy, replace(p, ca=keys, audit_head=entry.hash), p.etag or "", entry)
            except (Conflict, PreconditionFailed):
                continue  # changed meanwhile; the next sweep retries
            for c in due:
                self._disable_ca(c)
                done.append(c.fingerprint)
        return done

    def ca_public_keys(self, who: Identity, policy_id: str) -> list[CaKeyRef]:
        """Current first, then previous keys still inside their retirement window."""
        p = self.get_policy(who, policy_id)
        return [c for c in p.ca if c.state == "current"] + [c for c in p.ca if c.state == "previous"]

    # ---- revocation and hosts -----------------------------------------------------------------
    # Certificates stay in the KRL this long past their valid_before, for hosts whose clock lags.
    KRL_EXPIRY_GRACE = 3600

    def revoke_certificate(self, who: Identity, policy_id: str, serial: int,
                           reason: str | None = None) -> CertificateRecord:
        """Tenant admins, the policy's admins, or the certificate's own requester revoke it."""
        try:
            if reason is not None and (len(reason) > 1000 or "\n" in reason):
                raise InvalidRequest("'reason' must be one line of at most 1000 characters.")
            policy = self._policy_or_none(who.tid, policy_id)
            if policy is None:
                raise NotFound(f"Policy {policy_id!r} was not found.")
            cert = self.store.get_certificate(who.tid, policy_id, serial)
            own = cert.requester_oid == who.oid and cert.tenant_id == who.tid
            if not (own or policy.is_admin(who)):
                if not self._can_see(who, policy):
                    raise NotFound(f"No certificate with serial {serial} was issued under policy {policy_id!r}.")
                raise Forbidden("Only admins of this policy, or the certificate's own requester, may revoke it.")
            if cert.revoked_at is not None:
                raise Conflict(f"Certificate {serial} of policy {policy_id!r} was already revoked.",
                               revoked_at=cert.revoked_at)
        except EzsshError as exc:
            self.refuse(who, exc, "certificate.revoke.refused", policy_id=policy_id, serial=str(serial))
            raise
        now = int(self.clock())
        revoked = replace(cert, revoked_at=now, revoked_by=who.upn)
        entry = link(self._audit(who, "certificate.revoked", request_id=cert.request_id, policy_id=policy_id,
                                 key_id=cert.key_id, serial=str(serial), host=cert.host,
                                 chain=f"crt:{policy_id}:{serial}",
                                 details={"reason": reason, "requester_upn": cert.requester_upn,
                                          "valid_before": cert.valid_before, "own": own}), None)
        saved = self.store.revoke_certificate(revoked, cert.etag or "", entry)
        event(log, "certificate.revoked", key_id=cert.key_id, serial=serial, policy=policy_id, actor=who.upn,
              tenant=who.tid)
        return saved

    def build_krl(self, policy: Policy) -> bytes:
        """The policy's KRL: every revoked serial per CA key still trusted (current, previous).

        Byte-stable for the same revocations: krl_version and generated_date are the latest
        revocation time, so hosts replace their copy only when something was revoked (or expired
        out of it, EXPIRY_GRACE after its valid_before).
        """
        from .core.keys import fingerprint_of_blob
        from .core.krl import CaRevocations, ca_key_blob, encode_krl

        keys = {fingerprint_of_blob(ca_key_blob(c.public_key)): c.public_key
                for c in policy.ca if c.state in ("current", "previous")}
        revoked = self.store.list_revoked(policy.tenant_id, policy.id)
        latest = max((r.revoked_at or 0 for r in revoked), default=0)
        cutoff = int(self.clock()) - self.KRL_EXPIRY_GRACE
        serials: dict[str, set[int]] = {fp: set() for fp in keys}
        for r in revoked:
            if r.ca_fingerprint in serials and r.valid_before > cutoff:
                serials[r.ca_fingerprint].add(r.serial)
        return encode_krl([CaRevocations(keys[fp], frozenset(s)) for fp, s in serials.items()],
                          krl_version=latest, generated_date=latest,
                          comment=f"ezssh policy {policy.id} tenant {policy.tenant_id}")

    def krl_for(self, who: Identity, policy_id: str) -> bytes:
        return self.build_krl(self.get_policy(who, policy_id))

    def krl_for_host(self, tenant_id: str | None, policy_id: str, host_token: str) -> bytes:
        """A host's unauthenticated fetch: the policy's host token is the capability."""
        import hmac

        from .core.errors import Unauthenticated

        bad = Unauthenticated("The host token is not valid for this tenant and policy.")
        try:
            if not tenant_id:
                raise InvalidRequest("A host token fetch needs the 'tenant' query parameter.")
            stored = self.store.get_host_token(tenant_id, policy_id) if _is_tenant_id(tenant_id) else None
            # compare even when nothing is stored, so timing says nothing about which part was wrong
            ok = hmac.compare_digest((stored or "\0" * 43).encode(), host_token.encode())
            policy = self._policy_or_none(tenant_id, policy_id) if ok and stored else None
            if policy is None:
                raise bad
        except EzsshError as exc:
            self.refuse(None, exc, "krl.refused", policy_id=policy_id,
                        details={"tenant": (tenant_id or "")[:64]})
            raise
        return self.build_krl(policy)

    def host_setup_script(self, who: Identity, policy_id: str, api_url: str) -> str:
        """The setup script for a policy (its CA keys, host token and current KRL rendered in)."""
        from .hosts.setup import HostSetup, render_setup_script

        policy = self.get_policy(who, policy_id)
        token = self.store.ensure_host_token(who.tid, policy.id, secrets.token_urlsafe(32))
        keys = tuple(c.public_key for c in policy.ca if c.state == "current") + \
            tuple(c.public_key for c in policy.ca if c.state == "previous")
        if not keys:
            raise CaKeyNotFound(f"Policy {policy_id!r} has no CA key to trust.")
        script = render_setup_script(HostSetup(api_url=api_url, tenant_id=policy.tenant_id, policy_id=policy.id,
                                               ca_public_keys=keys, host_token=token,
                                               krl=self.build_krl(policy)))
        self.store.add_audit(self._audit(who, "policy.host_setup", policy_id=policy.id,
                                         details={"api_url": api_url}).sealed())
        return script

    # ---- audit --------------------------------------------------------------------------------
    def audit(self, who: Identity, *, since: float | None = None, until: float | None = None,
              request_id: str | None = None, policy_id: str | None = None, key_id: str | None = None,
              serial: str | None = None, limit: int = 200) -> list[AuditEntry]:
        """Audit entries of the caller's tenant: all of them for tenant admins, those of the policies
        they administer for policy admins. sshd's log lines join by key_id and serial."""
        if not who.is_tenant_admin:
            mine = {p.id for p in self.store.list_policies(who.tid) if not p.deleted and p.is_admin(who)}
            if not mine:
                raise Forbidden("Only tenant admins and policy admins read the audit log.")
            if policy_id is not None and policy_id not in mine:
                raise NotFound(f"Policy {policy_id!r} was not found.")
        else:
            mine = None
        if since is None and until is None and request_id is None:
            since = self.clock() - 24 * 3600
        out: list[AuditEntry] = []
        for e in self.store.list_audit(who.tid, since=since, until=until, request_id=request_id, limit=100_000):
            if mine is not None and e.policy_id not in mine:
                continue
            if (policy_id and e.policy_id != policy_id) or (key_id and e.key_id != key_id) or \
                    (serial and e.serial != serial):
                continue
            out.append(e)
        return out[-limit:]

    def request_chain_intact(self, who: Identity, request_id: str) -> bool:
        """The request's audit chain is whole: every entry intact, linked, and ending at the head
        its row holds."""
        rec = self._visible_request(who, request_id)[0]
        chain = [e for e in self.store.list_audit(who.tid, request_id=request_id, limit=100_000)
                 if e.chain == f"req:{request_id}"]
        return verify_chain(chain, head=rec.audit_head)

    # ---- health -------------------------------------------------------------------------------
    def health(self) -> dict[str, str]:
        checks: dict[str, str] = {}
        for name, fn in (("storage", self.store.health), ("signer", self.keys.health)):
            try:
                fn()
                checks[name] = "ok"
            except Exception as exc:  # noqa: BLE001
                log.warning("health check %s failed: %s", name, exc)
                checks[name] = "unavailable"
        return checks


def _is_tenant_id(s: str) -> bool:
    return bool(re.match(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$", s))


def ensure_policy(service: Service, who: Identity, doc: dict) -> Policy:
    """Create a policy unless one with that id exists (used to seed the demo)."""
    try:
        return service.store.get_policy(who.tid, doc["id"])
    except NotFound:
        return service.create_policy(who, doc)


__all__: Sequence[str] = ["Service", "ServiceConfig", "Outcome", "ensure_policy"]
