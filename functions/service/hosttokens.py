"""Host enrolment tokens and challenges: what a host shows to prove who it is, before hostcerts.py
signs anything for it.

  - an admin mints a one-time, short-lived enrolment token bound to named hosts (`mint_token`); only
    its hash is stored, and every name is checked against the tenant's host namespaces and the
    policy's host patterns;
  - a host asks for a challenge (`challenge`) with its public host keys and, at enrolment, the
    token; for a renewal the keys must hold current, unrevoked certificates of the policy
    (`current_record`). One key set gets one challenge row per CHALLENGE_TTL window;
  - `signed_challenge` checks a challenge signed by each host key (proof of possession), and
    `issued_before` reads back what a used token or challenge got (an idempotent retry).
Hosts have no Entra identity: every host call is rate-limited per claimed key set or token
(`limit`), and a refusal before the host proved anything (a bad token, a wrong signature) is counted
and logged, never written to storage (`refusing_host`); refusals after a real token
(`refusing_token`), or after a proof of possession (`refusing_in`), are the tenant's to read in its
audit log.
A token and a challenge are used once. The same proof presented again (the same challenge, signed
again by the same host keys) within RETRY_WINDOW of its use - a retry after the answer was lost, or
two identical calls at once - gets the certificates that use recorded, read back from their
records: never a second set, never a refusal.
"""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager as ContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..core.audit import AuditFields
from ..core.certificate import IssuedCertificate
from ..core.errors import Conflict, Forbidden, InvalidRequest, NotFound, TooManyRequests
from ..core.hostcert import (
    ProofRefused,
    check_host_names,
    parse_host_keys,
    renew_after,
    verify_sshsig,
)
from ..core.ids import is_guid
from ..core.keys import VettedKey
from ..core.policy import POLICY_ID_RE, Identity
from ..core.records import HostChallenge, HostEnrolmentToken, HostKeyRecord
from ..observability import event
from .base import Base
from .issuance import issued_from_record
from .namespaces import Namespaces
from .policies import Policies

if TYPE_CHECKING:
    from typing_extensions import Unpack

log = logging.getLogger("ezssh.service")

HOST_CERTIFICATE_REFUSED = "host_certificate.refused"
HOST_TOKEN_REFUSED = "host_token.refused"

TOKEN_PREFIX = "ezh_"
TOKEN_RE = re.compile(r"^ezh_[A-Za-z0-9_-]{40,64}$")
DEFAULT_TOKEN_TTL = 3600
MAX_TOKEN_TTL = 7 * 86400
CHALLENGE_TTL = 300
RETRY_WINDOW = 300  # seconds after a token's or challenge's use in which the same proof gets what it got


@dataclass(frozen=True)
class HostIssued:
    """What a host gets: one certificate per host key, all naming the same hosts."""

    policy_id: str
    principals: tuple[str, ...]
    certificates: tuple[tuple[IssuedCertificate, VettedKey], ...]
    proof: str

    @property
    def renew_after(self) -> int:
        return min(renew_after(c.valid_after, c.valid_before) for c, _ in self.certificates)

    def to_dict(self) -> dict[str, Any]:
        return {
            "policy": self.policy_id,
            "principals": list(self.principals),
            "renew_after": self.renew_after,
            "certificates": [
                {
                    "certificate": c.openssh,
                    "serial": str(c.serial),
                    "key_id": c.key_id,
                    "public_key_fingerprint": k.fingerprint,
                    "valid_after": c.valid_after,
                    "valid_before": c.valid_before,
                }
                for c, k in self.certificates
            ],
        }

    def to_text(self) -> str:
        """For the setup script: a renew-after line, then one certificate line per host key."""
        return f"# renew-after {self.renew_after}\n" + "".join(c.openssh + "\n" for c, _ in self.certificates)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _challenge_id(tid: str, pid: str, fingerprints: Sequence[str], window: int, enrol_token: str) -> str:
    """A challenge's id: one per key set (and enrolment token) per CHALLENGE_TTL window."""
    purpose = f"enrol:{enrol_token}" if enrol_token else "renew"
    return hashlib.sha256(f"{tid}|{pid}|{','.join(sorted(fingerprints))}|{window}|{purpose}".encode()).hexdigest()[:32]


class HostTokens:
    """Enrolment tokens (admins), challenges and the checks of a host's proofs (hosts)."""

    def __init__(self, base: Base, policies: Policies, namespaces: Namespaces) -> None:
        self.base = base
        self.policies = policies
        self.namespaces = namespaces

    # ---- admins: enrolment tokens ------------------------------------------------------------
    def mint_token(
        self, who: Identity, policy_id: str, hosts: Sequence[str], ttl_seconds: int | None = None
    ) -> tuple[str, HostEnrolmentToken]:
        """A one-time token for the named hosts (policy admins). Only its hash is stored."""
        b = self.base
        with b.refusing(who, HOST_TOKEN_REFUSED, policy_id=policy_id, details={"hosts": str(hosts)[:300]}):
            policy = b.policies.visible(who, policy_id)
            if not policy.is_admin(who):
                raise Forbidden(f"Only tenant admins and admins of policy {policy_id!r} mint host enrolment tokens.")
            names = check_host_names(policy, hosts, self.namespaces.current(who.tid), self.namespaces.is_public)
            ttl = DEFAULT_TOKEN_TTL if ttl_seconds is None else ttl_seconds
            if isinstance(ttl, bool) or not isinstance(ttl, int) or not 60 <= ttl <= MAX_TOKEN_TTL:
                raise InvalidRequest(
                    f"'ttl_seconds' must be between 60 and {MAX_TOKEN_TTL}.",
                    field="ttl_seconds",
                    min=60,
                    max=MAX_TOKEN_TTL,
                )
            self.policies.ensure_host_ca(policy, who)
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        now = b.now()
        rec = HostEnrolmentToken(
            tenant_id=who.tid,
            policy_id=policy.id,
            token_hash=token_hash(token),
            hosts=names,
            created_at=now,
            expires_at=now + ttl,
            created_by_oid=who.oid,
            created_by_upn=who.upn,
        )
        entry = b.audit_entry(
            who,
            "host_token.created",
            policy_id=policy.id,
            host=",".join(names),
            details={"hosts": list(names), "expires_at": rec.expires_at, "token_id": rec.token_hash[:12]},
        ).sealed()
        saved = b.store.create_host_enrolment_token(rec, entry)
        event(log, "host_token.created", policy=policy.id, tenant=who.tid, actor=who.upn, hosts=",".join(names))
        return token, saved

    def token(self, tid: str, token: str) -> HostEnrolmentToken:
        if not TOKEN_RE.match(token):
            raise ProofRefused("The enrolment token is malformed.")
        self.limit("token", token_hash(token))
        try:
            return self.base.store.get_host_enrolment_token(tid, token_hash(token))
        except NotFound:
            raise ProofRefused("The enrolment token is not valid.") from None

    # ---- hosts: challenges (enrolment and renewal) ---------------------------------------------
    def challenge(
        self, tenant_id: str, policy_id: str, public_keys: Sequence[str], token: str | None = None
    ) -> HostChallenge:
        """A nonce for these host keys to sign. For a renewal (no token) the keys must hold current
        certificates of the policy; for an enrolment, `token` must be a usable enrolment token."""
        b = self.base
        with self.refusing_host(tenant_id, policy_id, "challenge"):
            tid, pid = self.tenant_policy(tenant_id, policy_id)
            tok = self.token(tid, token) if token is not None else None
        with (
            self.refusing_token(tid, pid, tok)
            if tok is not None
            else self.refusing_host(tenant_id, policy_id, "challenge")
        ):
            keys = parse_host_keys(public_keys)
            fps = tuple(k.fingerprint for k in keys)
            now = b.now()
            if tok is None:
                self.limit("keys", ",".join(sorted(fps)))
                for k in keys:
                    self.current_record(tid, pid, k, now)
                bound = ""
            else:
                self.usable(tok, pid, now, "enrolment token", "mint a new one")
                bound = tok.token_hash
            # Only a host that holds certified keys (or a real token) gets a row, and one key set gets
            # one challenge row per CHALLENGE_TTL window: asking again returns that one, so storage
            # can't be filled by repeating the call. The nonce it carries is random.
            window = now // CHALLENGE_TTL
            cid = _challenge_id(tid, pid, fps, window, bound)
            ch = HostChallenge(
                tenant_id=tid,
                policy_id=pid,
                id=cid,
                nonce=secrets.token_urlsafe(32),
                fingerprints=fps,
                created_at=now,
                expires_at=(window + 2) * CHALLENGE_TTL,
            )
            try:
                return b.store.create_host_challenge(ch)
            except Conflict:
                existing = b.store.get_host_challenge(tid, cid)
                if existing.used_at is not None:
                    raise ProofRefused("These host keys renewed a moment ago; ask again in a few minutes.") from None
                return existing

    def signed_challenge(
        self,
        tid: str,
        pid: str,
        challenge_id: str,
        keys: Sequence[VettedKey],
        signed: Sequence[tuple[str, str]],
        namespace: str,
        now: int,
        *,
        enrol_token: str = "",
        retry: bool = False,
    ) -> HostChallenge:
        """The challenge, checked: issued by this service for exactly these keys (and, at enrolment,
        this token), unused and unexpired, and signed by every key in `namespace`. With `retry` it
        may also be one already used (the caller then looks for what that use got)."""
        if not re.match(r"^[0-9a-f]{32}$", challenge_id):
            raise ProofRefused("The challenge id is malformed.")
        try:
            ch = self.base.store.get_host_challenge(tid, challenge_id)
        except NotFound:
            raise ProofRefused("The challenge is not valid.") from None
        if not retry or ch.used_at is None:
            self.usable(ch, pid, now, "challenge", "ask for a new one")
        elif ch.policy_id != pid:
            raise ProofRefused("The challenge is not valid for this policy.")
        if sorted(k.fingerprint for k in keys) != sorted(ch.fingerprints):
            raise ProofRefused("Sign the challenge with exactly the host keys it was issued for.")
        if ch.id != _challenge_id(tid, pid, ch.fingerprints, ch.created_at // CHALLENGE_TTL, enrol_token):
            raise ProofRefused("The challenge was issued for another purpose; ask for a new one.")
        for key, (_, sig) in zip(keys, signed, strict=False):
            verify_sshsig(sig, ch.message, namespace, key)
        return ch

    # ---- helpers: proofs, refusals, limits ----------------------------------------------------
    def refusing_in(
        self, tenant_id: str, who: Identity | None, **fields: Unpack[AuditFields]
    ) -> ContextManager[AuditFields]:
        """Refusals recorded in the policy's tenant, also when the caller is a host that proved it
        belongs there (a real token or challenge of that tenant)."""
        return self.base.refusing(who, HOST_CERTIFICATE_REFUSED, tenant_id=tenant_id, **fields)

    def refusing_token(self, tid: str, pid: str, tok: HostEnrolmentToken) -> ContextManager[AuditFields]:
        """After a real enrolment token of this tenant: refusals are the tenant's to read."""
        return self.refusing_in(
            tid,
            None,
            policy_id=pid,
            details={
                "proof": "token",
                "token_id": tok.token_hash[:12],
                "token_created_by": tok.created_by_upn,
                "hosts": list(tok.hosts),
            },
        )

    def refusing_host(self, tenant_id: str, policy_id: str | None, proof: str) -> ContextManager[AuditFields]:
        """Hosts have no Entra identity: their refusals go to the unauthenticated partition."""
        return self.base.refusing(
            None,
            HOST_CERTIFICATE_REFUSED,
            policy_id=str(policy_id)[:64] if policy_id is not None else None,
            details={"tenant": str(tenant_id)[:64], "proof": proof},
        )

    def limit(self, what: str, key: str) -> None:
        """Hosts have no identity to rate-limit by: limit by the key set, token or challenge they
        claim (this worker, the request rate a minute each)."""
        wait = self.base.rate.take((f"host-{what}", key), self.base.clock())
        if wait > 0:
            raise TooManyRequests(
                f"Too many host certificate calls for these keys; try again in {int(wait) + 1} seconds.",
                retry_after=int(wait) + 1,
            )

    @staticmethod
    def usable(proof: HostEnrolmentToken | HostChallenge, pid: str, now: int, what: str, again: str) -> None:
        """A single-use proof (enrolment token or renewal challenge) that may still be used here."""
        if proof.policy_id != pid:
            raise ProofRefused(f"The {what} is not valid for this policy.")
        if proof.used_at is not None:
            raise ProofRefused(f"The {what} was already used; {again}.")
        if proof.expires_at <= now:
            raise ProofRefused(f"The {what} has expired; {again}.")

    @staticmethod
    def tenant_policy(tenant_id: str, policy_id: str) -> tuple[str, str]:
        if not is_guid(tenant_id):
            raise InvalidRequest("'tenant' must be the tenant id (a GUID).")
        if not POLICY_ID_RE.match(policy_id):
            raise InvalidRequest("'policy' must be a policy id.")
        return tenant_id.lower(), policy_id

    def current_record(self, tid: str, pid: str, key: VettedKey, now: int) -> HostKeyRecord:
        rec = self.base.store.get_host_key(tid, pid, key.fingerprint)
        if rec is None or rec.public_key.split()[:2] != key.openssh.split()[:2]:
            raise ProofRefused(
                f"Host key {key.fingerprint} holds no certificate of this policy; enrol it with a token."
            )
        if rec.valid_before <= now:
            raise ProofRefused(f"The certificate of host key {key.fingerprint} has expired; enrol again with a token.")
        try:
            cert = self.base.store.get_certificate(tid, pid, rec.serial)
        except NotFound:
            raise ProofRefused(f"Host key {key.fingerprint} holds no certificate of this policy.") from None
        if cert.revoked_at is not None:
            raise ProofRefused(f"The certificate of host key {key.fingerprint} was revoked; enrol again with a token.")
        return rec

    def issued_before(
        self,
        tid: str,
        pid: str,
        used_at: int | None,
        keys: Sequence[VettedKey],
        made_by_this_use: Callable[[HostKeyRecord], bool],
    ) -> HostIssued | None:
        """The certificates a used token or challenge got for `keys`, read back from their records, if
        it was used within RETRY_WINDOW and each key's current record was made by that use (and is not
        revoked); None otherwise (the caller then refuses the used proof). Point reads: one host-key
        row and one certificate row per key."""
        if used_at is None or self.base.now() - used_at > RETRY_WINDOW or not keys:
            return None
        out = []
        for k in keys:
            rec = self.base.store.get_host_key(tid, pid, k.fingerprint)
            if rec is None or rec.public_key.split()[:2] != k.openssh.split()[:2] or not made_by_this_use(rec):
                return None
            proof = rec.proof
            try:
                cert = self.base.store.get_certificate(tid, pid, rec.serial)
            except NotFound:
                return None
            if cert.revoked_at is not None:
                return None
            out.append((issued_from_record(cert), k))
        event(
            log,
            "host_certificate.returned_again",
            policy=pid,
            tenant=tid,
            serials=",".join(str(c.serial) for c, _ in out),
        )
        return HostIssued(pid, out[0][0].principals, tuple(out), proof)
