"""Asking for access and getting the certificate: decide, sign, record (with its audit), answer."""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass, replace

from ..core import approval as sm
from ..core.audit import AuditEntry, link
from ..core.certificate import IssuedCertificate, build_certificate, new_serial, verify_issued
from ..core.errors import CaKeyNotFound, Conflict, Denied, EzsshError, Forbidden, TtlTooLong
from ..core.keys import VettedKey, parse_public_key
from ..core.policy import AccessRequest, Identity, Policy, allowed_principals, choose_policy, make_grant, resolve_ttl
from ..observability import event
from ..signing.base import as_private_key
from ..storage.base import CertificateRecord
from .base import Base
from .requests import Requests, request_message

log = logging.getLogger("ezssh.service")


@dataclass(frozen=True)
class Outcome:
    """What request_access / issue_for_request return; the API renders it."""

    status: str  # issued | approved | pending
    request: sm.RequestRecord
    certificate: IssuedCertificate | None = None
    approvers_needed: int = 0
    approvers: dict | None = None  # who may approve: {"users": [...], "groups": [...]}


def new_request_id() -> str:
    return secrets.token_hex(12)


class Issuance:
    def __init__(self, base: Base, requests: Requests) -> None:
        self.base = base
        self.requests = requests

    def request_access(self, who: Identity, req: AccessRequest, public_key: str | None) -> Outcome:
        return self._request_access(who, req, public_key, fresh=False)

    def _request_access(self, who: Identity, req: AccessRequest, public_key: str | None, *, fresh: bool) -> Outcome:
        b = self.base
        refusing = b.refusing(who, "request.refused", host=req.host, principal=req.principal, policy_id=req.policy_id)
        with refusing:
            try:
                decision = choose_policy(who, req, b.policies.cached(who.tid))
            except (Denied, TtlTooLong):
                # A refusal is never decided on cached data: a policy created or widened on
                # another worker a moment ago must apply at once.
                b.policies.changed(who.tid)
                decision = choose_policy(who, req, b.policies.cached(who.tid))
            vetted = parse_public_key(public_key) if public_key is not None else None
        policy = decision.policy
        now = b.now()
        rid = new_request_id()
        auto = decision.action == "auto"
        rec = sm.RequestRecord(
            id=rid, tenant_id=who.tid, policy_id=policy.id, requester_oid=who.oid, requester_upn=who.upn,
            host=req.host, principal=req.principal, ttl_seconds=decision.ttl_seconds,
            state=sm.APPROVED if auto else sm.PENDING, created_at=now,
            expires_at=now + (sm.ISSUE_WINDOW if auto else policy.request_ttl),
            approvals_required=0 if auto else policy.approvals_required, reason=req.reason,
        )
        created = link(
            b.audit_entry(who, "request.created", request_id=rid, policy_id=policy.id, host=req.host,
                          principal=req.principal, chain=f"req:{rid}",
                          details={"decision": decision.action, "ttl_seconds": decision.ttl_seconds,
                                   "reason": req.reason}),
            None,
        )
        if auto and vetted is not None:
            try:
                issued = self._sign(policy, rec, who, vetted)
            except EzsshError as exc:
                if isinstance(exc, CaKeyNotFound) and not fresh:
                    # The cached policy may be stale (its CA rotated out or the policy deleted on
                    # another worker): decide once more on fresh data.
                    b.policies.changed(who.tid)
                    return self._request_access(who, req, public_key, fresh=True)
                b.refuse(who, exc, "request.refused", host=req.host, principal=req.principal, policy_id=policy.id)
                raise
            final = replace(rec, state=sm.ISSUED, serial=issued.serial, key_id=issued.key_id)
            entry = link(self._issued_audit(who, final, issued, vetted), created)
            final = replace(final, audit_head=entry.hash)
            b.store.record_issuance(final, None, cert_record(final, issued, vetted), [created, entry])
            event(log, "certificate.issued", key_id=issued.key_id, serial=issued.serial, request=rid,
                  policy=policy.id, tenant=who.tid)
            return Outcome("issued", final, issued)
        rec = b.store.create_request(replace(rec, audit_head=created.hash), created)
        event(log, f"request.{rec.state}", request=rid, policy=policy.id, actor=who.upn, tenant=who.tid)
        if rec.state == sm.PENDING:
            b.notify(policy, request_message(rec, policy, f"ezssh: {who.upn} asks for access to {rec.host}",
                                             (("Approve with", f"ezssh requests approve {rec.id}"),)))
        return Outcome(rec.state, rec, approvers_needed=rec.approvals_required,
                       approvers=policy.approvers.to_dict() if rec.state == sm.PENDING else None)

    def issue_for_request(self, who: Identity, request_id: str, public_key: str) -> Outcome:
        b = self.base
        with b.refusing(who, "certificate.refused", request_id=request_id):
            rec, policy = self.requests.visible(who, request_id)
            if not rec.requester_is(who):
                raise Forbidden("Only the requester may fetch the certificate for a request.")
            vetted = parse_public_key(public_key)
            now = b.now()
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
            issued = self._sign(policy, rec, who, vetted)
        final = sm.mark_issued(rec, who, now, serial=issued.serial, key_id=issued.key_id)
        entry = link(self._issued_audit(who, final, issued, vetted), rec.audit_head)
        final = replace(final, audit_head=entry.hash)
        b.store.record_issuance(final, rec.etag, cert_record(final, issued, vetted), [entry])
        event(log, "certificate.issued", key_id=issued.key_id, serial=issued.serial, request=rec.id,
              policy=rec.policy_id, tenant=who.tid)
        return Outcome("issued", final, issued)

    def _sign(self, policy: Policy, rec: sm.RequestRecord, who: Identity, key: VettedKey) -> IssuedCertificate:
        ca = policy.current_ca
        if ca is None:
            raise CaKeyNotFound(f"Policy {policy.id!r} has no current CA key.")
        grant = make_grant(policy, rec.id, who.upn, rec.principal, rec.ttl_seconds, self.base.config.backdate_seconds)
        signer = self.base.keys.get_signer(ca.key_ref)
        now = self.base.now()
        issued = build_certificate(grant, key, as_private_key(signer), now=now, serial=new_serial())
        verify_issued(issued, grant, key, signer.public_key(), now=now)
        return issued

    def _issued_audit(self, who: Identity, rec: sm.RequestRecord, issued: IssuedCertificate,
                      key: VettedKey) -> AuditEntry:
        return self.base.audit_entry(
            who, "certificate.issued", request_id=rec.id, policy_id=rec.policy_id, key_id=issued.key_id,
            serial=str(issued.serial), host=rec.host, principal=rec.principal, chain=f"req:{rec.id}",
            details={"valid_after": issued.valid_after, "valid_before": issued.valid_before,
                     "ca_fingerprint": issued.ca_fingerprint, "public_key_fingerprint": key.fingerprint,
                     "principals": list(issued.principals)},
        )


def cert_record(rec: sm.RequestRecord, issued: IssuedCertificate, key: VettedKey) -> CertificateRecord:
    return CertificateRecord(
        tenant_id=rec.tenant_id, policy_id=rec.policy_id, serial=issued.serial, key_id=issued.key_id,
        request_id=rec.id, requester_oid=rec.requester_oid, requester_upn=rec.requester_upn,
        principals=issued.principals, host=rec.host, valid_after=issued.valid_after,
        valid_before=issued.valid_before, ca_fingerprint=issued.ca_fingerprint,
        public_key_fingerprint=key.fingerprint, certificate=issued.openssh,
    )
