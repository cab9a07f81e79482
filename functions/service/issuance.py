"""Asking for access and getting the certificate: decide, sign, record (with its audit), answer."""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass, replace
from typing import Any

from cryptography.hazmat.primitives.serialization import ssh

from ..core import requests as sm
from ..core import serials
from ..core.audit import AuditEntry, AuditFields, canonical_json, link, with_head
from ..core.certificate import IssuedCertificate, build_certificate, verify_issued
from ..core.errors import (
    CaKeyNotFound,
    Conflict,
    Denied,
    EzsshError,
    Forbidden,
    IdempotencyKeyAhead,
    IntegrityError,
    InvalidRequest,
    NotFound,
    PreconditionFailed,
    TooManyPending,
    TooManyRequests,
)
from ..core.evaluation import AccessRequest, choose_policy, evaluate, make_grant
from ..core.keys import VettedKey, parse_public_key
from ..core.policy import Identity, Policy
from ..core.records import CertificateRecord, IdempotencyRecord, PendingSlots
from ..observability import event
from ..signing.base import as_private_key
from .base import Base
from .requests import Requests, request_message

log = logging.getLogger("ezssh.service")

IDEMPOTENCY_KEY_RE = re.compile(r"^[A-Za-z0-9_-]{8,128}$")


@dataclass(frozen=True)
class Outcome:
    """What request_access / issue_for_request return; the API renders it."""

    status: str  # issued | approved | pending
    request: sm.RequestRecord
    certificate: IssuedCertificate | None = None
    approvers_needed: int = 0
    approvers: dict[str, Any] | None = None  # who may approve: {"users": [...], "groups": [...]}


def new_request_id(now: float) -> str:
    """A request id: the serial its certificate will carry, in hex (core.serials)."""
    return serials.new_request_id(now)


REQUEST_REFUSED = "request.refused"
CERTIFICATE_REFUSED = "certificate.refused"


@dataclass(frozen=True)
class _Plan:
    """What a decided request will write: its record, the audit entry that creates it, and the
    certificate when it is issued at once (signed, not yet stored)."""

    policy: Policy
    record: sm.RequestRecord
    created: AuditEntry
    issued: IssuedCertificate | None = None
    key: VettedKey | None = None


class Issuance:
    def __init__(self, base: Base, requests: Requests) -> None:
        self.base = base
        self.requests = requests

    def request_access(
        self, who: Identity, req: AccessRequest, public_key: str | None, idempotency_key: str | None = None
    ) -> Outcome:
        """Decide, and when auto-approved with a public key, issue. With an idempotency key (one per
        client attempt), a retry of the same attempt gets the first answer: the same certificate or
        the same pending request, never a second one. A refusal is recorded here, once."""
        with self.base.refusing(
            who, REQUEST_REFUSED, host=req.host, principal=req.principal, policy_id=req.policy_id
        ) as known:
            if idempotency_key is None:
                return self._ask(who, req, public_key, None, known)
            return self._idempotent(who, req, public_key, idempotency_key, known)

    def _idempotent(
        self, who: Identity, req: AccessRequest, public_key: str | None, key: str, known: AuditFields
    ) -> Outcome:
        """The use case under an idempotency key: a retry finds the first answer instead of asking again."""
        idem = self._idempotency(who, req, public_key, key)
        if not idem.on_request_row and serials.key_time_ms(key) is not None:
            # A UUIDv7 key older than a retry's window: a late retry finds its answer on the row the
            # key names; a first attempt (a client whose clock is behind) keeps its key in a row of
            # its own, under a new id.
            replay = self._replay(who, idem, on_row=True)
            if replay is not None:
                return replay
            idem = replace(idem, request_id=new_request_id(self.base.clock()))
        return self._keyed(who, req, public_key, idem, known)

    def _keyed(
        self, who: Identity, req: AccessRequest, public_key: str | None, idem: IdempotencyRecord, known: AuditFields
    ) -> Outcome:
        # Optimistic: the first attempt writes at once (with its key); only an attempt that is refused
        # or finds its row or key taken - a retry, or a concurrent twin - reads the first answer.
        try:
            return self._ask(who, req, public_key, idem, known)
        except EzsshError as exc:
            # refused now (the policy changed since?) but answered before: the recorded answer stands
            replay = self._replay(who, idem) if exc.status < 500 else None
            if replay is not None:
                return replay
            if not (isinstance(exc, Conflict) and idem.on_request_row):
                raise
            # The row this key names is another's (its 21 hashed bits matched in the same
            # millisecond): the key goes in a row of its own, under a new id.
            return self._keyed(
                who,
                req,
                public_key,
                replace(idem, request_id=new_request_id(self.base.clock()), on_request_row=False),
                known,
            )

    def _idempotency(self, who: Identity, req: AccessRequest, public_key: str | None, key: str) -> IdempotencyRecord:
        """The key's record. A UUIDv7 key names its request's id (core.serials.keyed_request_id):
        within the window around the service's clock the key rides on that row (on_request_row);
        older, the id is only where a first answer may be. Other keys get an id when written."""
        if not IDEMPOTENCY_KEY_RE.match(key):
            raise InvalidRequest("The Idempotency-Key header must be 8 to 128 letters, digits, '-' or '_'.")
        # the key by its blob (the comment may differ between attempts); it is vetted once, on issuance
        key_blob = (public_key.split() + ["", ""])[1] if public_key is not None else None
        asked = canonical_json(
            {
                "host": req.host,
                "principal": req.principal,
                "policy": req.policy_id,
                "ttl": req.ttl_seconds,
                "reason": req.reason,
                "key": key_blob,
            }
        )
        now = self.base.clock()
        ms, now_ms = serials.key_time_ms(key), int(now * 1000)
        if ms is not None and ms > now_ms + serials.KEY_TIME_AHEAD_MS:
            raise IdempotencyKeyAhead(
                f"The Idempotency-Key is a UUIDv7 {(ms - now_ms) // 1000} s ahead of the service's clock; "
                "ask again with a new key (a random one, or a UUIDv7 from a clock that is right)."
            )
        return IdempotencyRecord(
            tenant_id=who.tid,
            owner_oid=who.oid,
            key_hash=hashlib.sha256(key.encode()).hexdigest(),
            request_id=serials.keyed_request_id(ms, who.tid, who.oid, key) if ms is not None else new_request_id(now),
            digest=hashlib.sha256(asked.encode()).hexdigest(),
            created_at=int(now),
            on_request_row=ms is not None and ms >= now_ms - serials.KEY_TIME_BEHIND_MS,
        )

    def _replay(self, who: Identity, idem: IdempotencyRecord, *, on_row: bool | None = None) -> Outcome | None:
        """The answer an earlier attempt with this key got, if one was recorded."""
        b = self.base
        found = b.store.get_idempotency(
            who.tid,
            who.oid,
            idem.key_hash,
            idem.request_id if (idem.on_request_row if on_row is None else on_row) else None,
        )
        if found is None:
            return None
        if found.digest != idem.digest:
            raise Conflict(
                "This Idempotency-Key was already used for a different request; use a new key for each new attempt."
            )
        rec = b.store.get_request(who.tid, found.request_id)
        if rec.serial is not None:
            cert = b.store.get_certificate(who.tid, rec.policy_id, rec.serial)
            return Outcome("issued", rec, issued_from_record(cert))
        policy = b.policies.get_or_none(who.tid, rec.policy_id)
        pending = rec.state == sm.PENDING
        return Outcome(
            rec.state,
            rec,
            approvers_needed=rec.approvals_required if pending else 0,
            approvers=policy.approvers.to_dict() if pending and policy is not None else None,
        )

    def _ask(
        self,
        who: Identity,
        req: AccessRequest,
        public_key: str | None,
        idem: IdempotencyRecord | None,
        known: AuditFields,
    ) -> Outcome:
        """decide -> plan the record and its audit -> sign -> persist -> notify."""
        b = self.base
        wait = b.rate.take((who.tid, who.oid), b.clock())
        if wait > 0:
            raise TooManyRequests(
                f"Too many access requests; at most {b.config.request_rate} a minute. "
                f"Try again in {int(wait) + 1} seconds.",
                retry_after=int(wait) + 1,
            )
        plan = b.policies.deciding(who.tid, lambda policies: self._plan(who, req, public_key, idem, policies, known))
        return self._persist(who, plan, idem)

    def _plan(
        self,
        who: Identity,
        req: AccessRequest,
        public_key: str | None,
        idem: IdempotencyRecord | None,
        policies: list[Policy],
        known: AuditFields,
    ) -> _Plan:
        b = self.base
        decision = choose_policy(who, req, policies)
        vetted = parse_public_key(public_key) if public_key is not None else None
        policy = decision.policy
        known["policy_id"] = policy.id
        now = b.now()
        rid = idem.request_id if idem is not None else new_request_id(b.clock())
        auto = decision.action == "auto"
        rec = sm.RequestRecord(
            id=rid,
            tenant_id=who.tid,
            policy_id=policy.id,
            requester_oid=who.oid,
            requester_upn=who.upn,
            requester_name=sm.display_name(who),
            host=req.host,
            principal=req.principal,
            ttl_seconds=decision.ttl_seconds,
            state=sm.APPROVED if auto else sm.PENDING,
            created_at=now,
            expires_at=now + (sm.ISSUE_WINDOW if auto else policy.request_ttl),
            approvals_required=0 if auto else policy.approvals_required,
            reason=req.reason,
        )
        created = link(
            b.audit_entry(
                who,
                "request.created",
                request_id=rid,
                policy_id=policy.id,
                host=req.host,
                principal=req.principal,
                chain=f"req:{rid}",
                details={"decision": decision.action, "ttl_seconds": decision.ttl_seconds, "reason": req.reason},
            ),
            None,
        )
        if auto and vetted is not None:
            return _Plan(policy, rec, created, self._sign(policy, rec, who, vetted), vetted)
        return _Plan(policy, rec, created)

    def _persist(self, who: Identity, plan: _Plan, idem: IdempotencyRecord | None) -> Outcome:
        b = self.base
        policy, rec, created, issued = plan.policy, plan.record, plan.created, plan.issued
        if issued is not None and plan.key is not None:
            final = replace(rec, state=sm.ISSUED, serial=issued.serial, key_id=issued.key_id)
            entry = link(self._issued_audit(who, final, issued, plan.key), created)
            final = with_head(final, entry)
            b.store.record_issuance(final, None, cert_record(final, issued, plan.key), [created, entry], idem)
            return self._issued(who, final, issued)
        rec = with_head(rec, created)
        if rec.state == sm.PENDING:
            rec = self._create_pending(who, policy, rec, created, idem)
        else:
            rec = b.store.create_request(rec, created, idem)
        event(log, f"request.{rec.state}", request=rec.id, policy=policy.id, actor=who.upn, tenant=who.tid)
        if rec.state == sm.PENDING:
            b.notify(
                policy,
                request_message(
                    rec,
                    policy,
                    "ezssh: access request waiting for approval",
                    (("Approve with", f"ezssh requests approve {rec.id}"),),
                ),
            )
        return Outcome(
            rec.state,
            rec,
            approvers_needed=rec.approvals_required,
            approvers=policy.approvers.to_dict() if rec.state == sm.PENDING else None,
        )

    def _create_pending(
        self, who: Identity, policy: Policy, rec: sm.RequestRecord, created: AuditEntry, idem: IdempotencyRecord | None
    ) -> sm.RequestRecord:
        """Create a pending request in one of the user's pending slots under its policy. The slots row
        is written in the request's own transaction, only if unchanged since read: of concurrent
        requests exactly one takes a given slot, and the others read the row again. Each lost race
        means another request took a slot, so after max_pending_requests + 1 losses the row is full."""
        b = self.base
        for _ in range(b.config.max_pending_requests + 2):
            slots = self._pending_slots(who, policy, rec)
            try:
                return b.store.create_request(rec, created, idem, slots)
            except PreconditionFailed:
                continue
        raise Conflict("Too many of your requests under this policy arrived at the same time; retry.")

    def _pending_slots(self, who: Identity, policy: Policy, rec: sm.RequestRecord) -> PendingSlots:
        """The slots with `rec` added, or TooManyPending. Slots past their deadline are free; when the
        rest fill the cap, each is checked (at most max_pending_requests point reads) and those no
        longer pending (decided) are freed."""
        b = self.base
        limit = b.config.max_pending_requests
        now = b.now()
        slots = b.store.get_pending_slots(who.tid, policy.id, who.oid)
        live = [(rid, exp) for rid, exp in slots.requests if exp > now]
        if len(live) >= limit:
            live = [(rid, exp) for rid, exp in live if self._still_pending(who.tid, rid, now)]
        if len(live) >= limit:
            raise TooManyPending(
                f"You have {len(live)} pending requests under policy {policy.id!r}, the most allowed; cancel one "
                "(ezssh requests cancel <id>) or wait for a decision.",
                policy=policy.id,
                limit=limit,
            )
        return replace(slots, requests=(*live, (rec.id, rec.expires_at)))

    def _still_pending(self, tid: str, request_id: str, now: int) -> bool:
        try:
            return self.base.store.get_request(tid, request_id).effective_state(now) == sm.PENDING
        except NotFound:
            return False

    def issue_for_request(self, who: Identity, request_id: str, public_key: str) -> Outcome:
        b = self.base
        with b.refusing(who, CERTIFICATE_REFUSED, request_id=request_id):
            rec, policy = self.requests.visible(who, request_id)
            if not rec.requester_is(who):
                raise Forbidden("Only the requester may fetch the certificate for a request.")
            vetted = parse_public_key(public_key)
            now = b.now()
            if rec.state == sm.ISSUED and rec.serial is not None:
                # A retry after a lost answer: the same certificate, to the same key, never a second one.
                cert = b.store.get_certificate(who.tid, rec.policy_id, rec.serial)
                if cert.public_key_fingerprint == vetted.fingerprint and cert.requester_oid == who.oid:
                    return Outcome("issued", rec, issued_from_record(cert))
            if rec.effective_state(now) != sm.APPROVED:
                raise Conflict(
                    f"Request {rec.id} is {rec.effective_state(now)}; no certificate can be issued.",
                    state=rec.effective_state(now),
                )
            if policy is None or policy.deleted:
                raise Denied(f"Policy {rec.policy_id!r} no longer exists.")
            # The approval is bound to the host, principal and TTL asked for, and it is decided again
            # now against the current policy and the caller's current groups: a deny rule, a group
            # removal or a tightened policy since the approval wins over the approval.
            if not policy.covers_host(rec.host):
                raise Denied(f"Policy {policy.id!r} no longer covers host {rec.host!r}; ask again.", policy=policy.id)
            try:
                evaluate(
                    who,
                    AccessRequest(
                        host=rec.host, principal=rec.principal, ttl_seconds=rec.ttl_seconds, policy_id=policy.id
                    ),
                    policy,
                )
            except Denied as exc:
                raise type(exc)(
                    f"Request {rec.id} was approved, but the policy no longer allows it: {exc.message}", **exc.details
                ) from None
            issued = self._sign(policy, rec, who, vetted)
        final = sm.mark_issued(rec, who, now, serial=issued.serial, key_id=issued.key_id)
        entry = link(self._issued_audit(who, final, issued, vetted), rec)
        final = with_head(final, entry)
        b.store.record_issuance(final, rec.etag, cert_record(final, issued, vetted), [entry])
        return self._issued(who, final, issued)

    @staticmethod
    def _issued(who: Identity, rec: sm.RequestRecord, issued: IssuedCertificate) -> Outcome:
        """The answer once the issuance is recorded, and its log event."""
        event(
            log,
            "certificate.issued",
            key_id=issued.key_id,
            serial=issued.serial,
            request=rec.id,
            policy=rec.policy_id,
            tenant=who.tid,
        )
        return Outcome("issued", rec, issued)

    def _sign(self, policy: Policy, rec: sm.RequestRecord, who: Identity, key: VettedKey) -> IssuedCertificate:
        ca = policy.current_ca
        if ca is None:
            raise CaKeyNotFound(f"Policy {policy.id!r} has no current CA key.")
        grant = make_grant(policy, rec.id, who, rec.principal, rec.ttl_seconds, self.base.config.backdate_seconds)
        signer = self.base.keys.get_signer(ca.key_ref)
        now = self.base.now()
        # The serial was fixed with the request: its id is that serial in hex (core.serials).
        serial = serials.serial_of_request_id(rec.id)
        if serial is None:
            raise Conflict(f"Request {rec.id} has no serial of its own (an id from an older version); ask again.")
        issued = build_certificate(grant, key, as_private_key(signer), now=now, serial=serial)
        verify_issued(issued, grant, key, signer.public_key(), now=now)
        return issued

    def _issued_audit(
        self, who: Identity, rec: sm.RequestRecord, issued: IssuedCertificate, key: VettedKey
    ) -> AuditEntry:
        return self.base.audit_entry(
            who,
            "certificate.issued",
            request_id=rec.id,
            policy_id=rec.policy_id,
            key_id=issued.key_id,
            serial=str(issued.serial),
            host=rec.host,
            principal=rec.principal,
            chain=f"req:{rec.id}",
            details={
                "valid_after": issued.valid_after,
                "valid_before": issued.valid_before,
                "ca_fingerprint": issued.ca_fingerprint,
                "public_key_fingerprint": key.fingerprint,
                "principals": list(issued.principals),
            },
        )


def issued_from_record(c: CertificateRecord) -> IssuedCertificate:
    """The certificate as first issued, from its record (for a retried request)."""
    parsed = ssh.load_ssh_public_identity(c.certificate.encode())
    if not isinstance(parsed, ssh.SSHCertificate):
        raise IntegrityError(f"the stored certificate {c.serial} is not an OpenSSH certificate")
    return IssuedCertificate(
        certificate=parsed,
        openssh=c.certificate,
        serial=c.serial,
        key_id=c.key_id,
        principals=c.principals,
        valid_after=c.valid_after,
        valid_before=c.valid_before,
        ca_fingerprint=c.ca_fingerprint,
    )


def cert_record(rec: sm.RequestRecord, issued: IssuedCertificate, key: VettedKey) -> CertificateRecord:
    return CertificateRecord(
        tenant_id=rec.tenant_id,
        policy_id=rec.policy_id,
        serial=issued.serial,
        key_id=issued.key_id,
        request_id=rec.id,
        requester_oid=rec.requester_oid,
        requester_upn=rec.requester_upn,
        principals=issued.principals,
        host=rec.host,
        valid_after=issued.valid_after,
        valid_before=issued.valid_before,
        ca_fingerprint=issued.ca_fingerprint,
        public_key_fingerprint=key.fingerprint,
        certificate=issued.openssh,
    )
