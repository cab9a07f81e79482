"""Host certificates: a host's own host keys signed by its policy's host CA, so users never trust a
host key on first use.

How a host proves who it is, and what it gets:
  - an admin mints a one-time, short-lived enrolment token bound to named hosts (`mint_token`); the
    host asks for a challenge with the token and its public host keys (`challenge`), signs it with
    each key (`ssh-keygen -Y sign -n ezssh-host-enrol`: proof it holds them) and presents the token
    with the signatures (`issue_with_token`); names = the token's names;
  - an Azure VM: the enrolment service reads its names and host keys through ARM and Run Command and
    calls `issue_for_vm` (proof: ARM itself);
  - renewal: the host asks for a challenge (`challenge`) and signs it with each current host key
    (`ssh-keygen -Y sign -n ezssh-host-renew`); `renew` checks every signature against a host key
    that holds a current, unrevoked certificate of this policy, and issues for the same names.
Every name is checked at each issuance against the tenant's host namespaces and the policy's host
patterns (core.hostcert.fitting_host_names): a token's names must all fit; of the names ARM gives or
a renewal carries over, what no longer fits is dropped and the drop audited. The per-policy KRL host
token is no proof here. Hosts have no Entra identity: every host call is rate-limited per claimed
key set or token, and a refusal before the host proved anything (a bad token, a wrong signature) is
counted and logged, never written to storage, as for any caller without an identity. Refusals after
a real token, or after a proof of possession, are the tenant's to read in its audit log.
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
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from ..core.audit import AuditFields
from ..core.certificate import IssuedCertificate
from ..core.errors import CaKeyNotFound, Conflict, EzsshError, Forbidden, InvalidRequest, NotFound, TooManyRequests
from ..core.hostcert import (
    ENROL_NAMESPACE,
    RENEW_NAMESPACE,
    HostGrant,
    ProofRefused,
    build_host_certificate,
    check_host_names,
    kept_host_names,
    parse_host_key,
    parse_host_keys,
    renew_after,
    verify_host_issued,
    verify_sshsig,
)
from ..core.ids import is_guid
from ..core.keys import VettedKey
from ..core.policy import POLICY_ID_RE, Identity, Policy
from ..core.records import CertificateRecord, HostChallenge, HostEnrolmentToken, HostKeyRecord
from ..core.serials import new_serial
from ..observability import event
from ..signing.base import as_private_key
from .base import Base
from .hosts import Hosts
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


def _dropped(outside: Sequence[str]) -> dict[str, Any]:
    """Audit details for names that no longer fit and were left out of a certificate."""
    return {"dropped_names": list(outside)} if outside else {}


class HostCerts:
    def __init__(self, base: Base, policies: Policies, hosts: Hosts, namespaces: Namespaces) -> None:
        self.base = base
        self.policies = policies
        self.hosts = hosts
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

    # ---- hosts: enrolment with a token and proof of possession -----------------------------------
    def issue_with_token(
        self, tenant_id: str, policy_id: str, token: str, challenge_id: str, signed: Sequence[tuple[str, str]]
    ) -> HostIssued:
        """First enrolment: the token an admin minted for named hosts, and each host key's signature
        (namespace ezssh-host-enrol) over the challenge issued for that token and those keys."""
        b = self.base
        with self._refusing_host(tenant_id, policy_id, "token"):
            tid, pid = self._tenant_policy(tenant_id, policy_id)
            tok = self._token(tid, token)
        with self._refusing_token(tid, pid, tok):
            now = b.now()
            keys = parse_host_keys([pk for pk, _ in signed])
            proof = f"token:{tok.token_hash[:12]}"

            def got(tok: HostEnrolmentToken) -> HostIssued | None:
                """What this token already got, if it was used for exactly these keys."""
                if tok.policy_id != pid or sorted((tok.used_by or "").split(",")) != sorted(
                    k.fingerprint for k in keys
                ):
                    return None
                return self._issued_before(tid, pid, tok.used_at, keys, lambda r: r.proof == proof)

            if tok.used_at is not None:  # a retry of that use, with the same signed challenge?
                self._signed_challenge(
                    tid, pid, challenge_id, keys, signed, ENROL_NAMESPACE, now, enrol_token=tok.token_hash, retry=True
                )
                again = got(tok)
                if again is not None:
                    return again
            self._usable(tok, pid, now, "enrolment token", "mint a new one")
            ch = self._signed_challenge(
                tid, pid, challenge_id, keys, signed, ENROL_NAMESPACE, now, enrol_token=tok.token_hash
            )
            policy = self._policy(tid, pid)
            names = check_host_names(policy, tok.hosts, self.namespaces.current(tid), self.namespaces.is_public)
            issued = self._sign(policy, names, keys, proof)
            used = replace(tok, used_at=now, used_by=",".join(k.fingerprint for k in keys))
            try:
                self._record(
                    policy,
                    issued,
                    subject=names[0],
                    used=used,
                    details={
                        "token_created_by": tok.created_by_upn,
                        "token_id": tok.token_hash[:12],
                        "challenge": ch.id,
                    },
                )
            except Conflict:  # used at the same moment, perhaps by this very call's earlier attempt
                again = got(b.store.get_host_enrolment_token(tid, tok.token_hash))
                if again is None:
                    raise
                return again
        return issued

    def _token(self, tid: str, token: str) -> HostEnrolmentToken:
        if not TOKEN_RE.match(token):
            raise ProofRefused("The enrolment token is malformed.")
        self._limit("token", token_hash(token))
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
        with self._refusing_host(tenant_id, policy_id, "challenge"):
            tid, pid = self._tenant_policy(tenant_id, policy_id)
            tok = self._token(tid, token) if token is not None else None
        with (
            self._refusing_token(tid, pid, tok)
            if tok is not None
            else self._refusing_host(tenant_id, policy_id, "challenge")
        ):
            keys = parse_host_keys(public_keys)
            fps = tuple(k.fingerprint for k in keys)
            now = b.now()
            if tok is None:
                self._limit("keys", ",".join(sorted(fps)))
                for k in keys:
                    self._current_record(tid, pid, k, now)
                bound = ""
            else:
                self._usable(tok, pid, now, "enrolment token", "mint a new one")
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

    def _signed_challenge(
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
            self._usable(ch, pid, now, "challenge", "ask for a new one")
        elif ch.policy_id != pid:
            raise ProofRefused("The challenge is not valid for this policy.")
        if sorted(k.fingerprint for k in keys) != sorted(ch.fingerprints):
            raise ProofRefused("Sign the challenge with exactly the host keys it was issued for.")
        if ch.id != _challenge_id(tid, pid, ch.fingerprints, ch.created_at // CHALLENGE_TTL, enrol_token):
            raise ProofRefused("The challenge was issued for another purpose; ask for a new one.")
        for key, (_, sig) in zip(keys, signed, strict=False):
            verify_sshsig(sig, ch.message, namespace, key)
        return ch

    # ---- hosts: renewal by possession of the current host key ---------------------------------
    def renew(self, tenant_id: str, policy_id: str, challenge_id: str, signed: Sequence[tuple[str, str]]) -> HostIssued:
        b = self.base
        with self._refusing_host(tenant_id, policy_id, "renewal"):
            tid, pid = self._tenant_policy(tenant_id, policy_id)
            self._limit("challenge", str(challenge_id)[:64])
            now = b.now()
            keys = parse_host_keys([pk for pk, _ in signed])
            ch = self._signed_challenge(tid, pid, challenge_id, keys, signed, RENEW_NAMESPACE, now, retry=True)

            def got(ch: HostChallenge) -> HostIssued | None:
                """What this challenge already got: the certificates its use recorded for these keys."""
                used_at = ch.used_at
                return (
                    None
                    if used_at is None
                    else self._issued_before(
                        tid,
                        pid,
                        used_at,
                        keys,
                        lambda r: r.proof.startswith("renewal:") and used_at <= r.updated_at <= used_at + RETRY_WINDOW,
                    )
                )

            if ch.used_at is not None:
                again = got(ch)
                if again is None:
                    raise ProofRefused("The challenge was already used; ask for a new one.")
                return again
            records = [self._current_record(tid, pid, key, now) for key in keys]
        # The host proved it holds keys with current certificates of this tenant's policy: a refusal
        # from here on (names that no longer fit, say) is the tenant's to read.
        with self._refusing_in(
            tid,
            None,
            policy_id=pid,
            details={"proof": "renewal", "challenge": ch.id, "fingerprints": list(ch.fingerprints)},
        ):
            names_sets = {r.principals for r in records}
            if len(names_sets) != 1:
                raise ProofRefused("The host keys hold certificates for different names; renew them separately.")
            policy = self._policy(tid, pid)
            names, dropped = kept_host_names(
                policy, records[0].principals, self.namespaces.current(tid), self.namespaces.is_public
            )
            issued = self._sign(policy, names, keys, f"renewal:{','.join(str(r.serial) for r in records)}")
            try:
                self._record(
                    policy,
                    issued,
                    subject=records[0].subject,
                    used=replace(ch, used_at=now),
                    details={
                        "renewal_of": [str(r.serial) for r in records],
                        "first_proof": records[0].proof,
                        **_dropped(dropped),
                    },
                )
            except Conflict:  # used at the same moment, perhaps by this very call's earlier attempt
                again = got(b.store.get_host_challenge(tid, ch.id))
                if again is None:
                    raise
                return again
        return issued

    # ---- Azure VMs: names and keys read through ARM -------------------------------------------
    def issue_for_vm(
        self,
        policy: Policy,
        vm_id: str,
        names: Sequence[str],
        read_keys: Callable[[], Sequence[str]],
        *,
        who: Identity | None = None,
    ) -> HostIssued:
        """Sign a VM's host keys (`read_keys`: Run Command, only once some name fits) for those of the
        names ARM gave that fit (the tenant's namespaces and the policy's name patterns, like any
        other names); what does not fit is dropped and the drop audited, none fitting is refused.
        Keys that are not acceptable host keys (RSA under 3072 bits, DSA) are left out; none at all
        is refused."""
        with self._refusing_in(
            policy.tenant_id,
            who,
            details={"proof": "arm", "vm_id": vm_id[:300], "arm_names": list(names)[:32]},
            policy_id=policy.id,
        ):
            policy = self.policies.ensure_host_ca(policy, who)
            checked, dropped = kept_host_names(
                policy, names, self.namespaces.current(policy.tenant_id), self.namespaces.is_public
            )
            good: list[VettedKey] = []
            for raw in read_keys():
                try:
                    good.append(parse_host_key(raw))
                except EzsshError:
                    continue
            keys = parse_host_keys([k.openssh for k in good])
            issued = self._sign(policy, checked, keys, f"arm:{vm_id}")
            self._record(policy, issued, subject=vm_id, actor=who, details={"vm_id": vm_id, **_dropped(dropped)})
        return issued

    def vm_renewal_due(self, policy: Policy, vm_id: str, *, first: bool = True) -> bool:
        """Does this VM need (new) host certificates: one past its renewal time, or (with `first`)
        none yet?"""
        if policy.deleted:
            return False
        recs = self.base.store.list_host_keys(policy.tenant_id, policy.id, vm_id)
        now = self.base.now()
        return (first and not recs) or any(renew_after(r.valid_after, r.valid_before) <= now for r in recs)

    def vms_due_for_renewal(self, policy: Policy) -> frozenset[str]:
        """The subjects (lower-cased) holding host certificates of this policy past their renewal
        time: vm_renewal_due(first=False) for all of them, in one range read of the policy's host keys."""
        if policy.deleted:
            return frozenset()
        now = self.base.now()
        return frozenset(
            r.subject.lower()
            for r in self.base.store.list_host_keys(policy.tenant_id, policy.id)
            if renew_after(r.valid_after, r.valid_before) <= now
        )

    # ---- helpers ------------------------------------------------------------------------------
    def _refusing_in(
        self, tenant_id: str, who: Identity | None, **fields: Unpack[AuditFields]
    ) -> ContextManager[AuditFields]:
        """Refusals recorded in the policy's tenant, also when the caller is a host that proved it
        belongs there (a real token or challenge of that tenant)."""
        return self.base.refusing(who, HOST_CERTIFICATE_REFUSED, tenant_id=tenant_id, **fields)

    def _refusing_token(self, tid: str, pid: str, tok: HostEnrolmentToken) -> ContextManager[AuditFields]:
        """After a real enrolment token of this tenant: refusals are the tenant's to read."""
        return self._refusing_in(
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

    def _refusing_host(self, tenant_id: str, policy_id: str | None, proof: str) -> ContextManager[AuditFields]:
        """Hosts have no Entra identity: their refusals go to the unauthenticated partition."""
        return self.base.refusing(
            None,
            HOST_CERTIFICATE_REFUSED,
            policy_id=str(policy_id)[:64] if policy_id is not None else None,
            details={"tenant": str(tenant_id)[:64], "proof": proof},
        )

    def _limit(self, what: str, key: str) -> None:
        """Hosts have no identity to rate-limit by: limit by the key set, token or challenge they
        claim (this worker, the request rate a minute each)."""
        wait = self.base.rate.take((f"host-{what}", key), self.base.clock())
        if wait > 0:
            raise TooManyRequests(
                f"Too many host certificate calls for these keys; try again in {int(wait) + 1} seconds.",
                retry_after=int(wait) + 1,
            )

    @staticmethod
    def _usable(proof: HostEnrolmentToken | HostChallenge, pid: str, now: int, what: str, again: str) -> None:
        """A single-use proof (enrolment token or renewal challenge) that may still be used here."""
        if proof.policy_id != pid:
            raise ProofRefused(f"The {what} is not valid for this policy.")
        if proof.used_at is not None:
            raise ProofRefused(f"The {what} was already used; {again}.")
        if proof.expires_at <= now:
            raise ProofRefused(f"The {what} has expired; {again}.")

    @staticmethod
    def _tenant_policy(tenant_id: str, policy_id: str) -> tuple[str, str]:
        if not is_guid(tenant_id):
            raise InvalidRequest("'tenant' must be the tenant id (a GUID).")
        if not POLICY_ID_RE.match(policy_id):
            raise InvalidRequest("'policy' must be a policy id.")
        return tenant_id.lower(), policy_id

    def _policy(self, tid: str, pid: str) -> Policy:
        p = self.base.policies.get_or_none(tid, pid)
        if p is None or p.deleted:
            raise ProofRefused("The policy does not exist.")
        return self.policies.ensure_host_ca(p)

    def _current_record(self, tid: str, pid: str, key: VettedKey, now: int) -> HostKeyRecord:
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

    def _issued_before(
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

    def _sign(self, policy: Policy, names: tuple[str, ...], keys: Sequence[VettedKey], proof: str) -> HostIssued:
        ca = policy.current_host_ca
        if ca is None:
            raise CaKeyNotFound(f"Policy {policy.id!r} has no host CA key.")
        signer = self.base.keys.get_signer(ca.key_ref)
        ca_key = as_private_key(signer)
        grant = HostGrant(
            tenant_id=policy.tenant_id,
            policy_id=policy.id,
            principals=names,
            ttl_seconds=policy.host_cert_ttl,
            proof=proof,
            backdate_seconds=self.base.config.backdate_seconds,
        )
        clock = self.base.clock()
        now = int(clock)
        out: list[tuple[IssuedCertificate, VettedKey]] = []
        serials: set[int] = set()
        for k in keys:
            serial = new_serial(clock)
            while serial in serials:  # one serial per certificate of the call (a clash is stored as a 409)
                serial = new_serial(clock)
            serials.add(serial)
            issued = build_host_certificate(grant, k, ca_key, now=now, serial=serial)
            verify_host_issued(issued, grant, k, signer.public_key(), now=now)
            out.append((issued, k))
        return HostIssued(policy.id, names, tuple(out), proof)

    def _record(
        self,
        policy: Policy,
        issued: HostIssued,
        *,
        subject: str,
        used: HostEnrolmentToken | HostChallenge | None = None,
        actor: Identity | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        b = self.base
        now = b.now()
        certs, keys, entries = [], [], []
        for c, k in issued.certificates:
            certs.append(
                CertificateRecord(
                    tenant_id=policy.tenant_id,
                    policy_id=policy.id,
                    serial=c.serial,
                    key_id=c.key_id,
                    request_id="",
                    requester_oid=actor.oid if actor else "",
                    requester_upn=actor.upn if actor else f"host:{subject}"[:200],
                    principals=c.principals,
                    host=",".join(c.principals),
                    valid_after=c.valid_after,
                    valid_before=c.valid_before,
                    ca_fingerprint=c.ca_fingerprint,
                    public_key_fingerprint=k.fingerprint,
                    certificate=c.openssh,
                )
            )
            keys.append(
                HostKeyRecord(
                    tenant_id=policy.tenant_id,
                    policy_id=policy.id,
                    fingerprint=k.fingerprint,
                    public_key=k.openssh,
                    principals=c.principals,
                    serial=c.serial,
                    valid_after=c.valid_after,
                    valid_before=c.valid_before,
                    proof=issued.proof,
                    subject=subject,
                    updated_at=now,
                )
            )
            entry = b.audit_entry(
                actor,
                "host_certificate.issued",
                policy_id=policy.id,
                key_id=c.key_id,
                serial=str(c.serial),
                host=",".join(c.principals),
                details={
                    "principals": list(c.principals),
                    "public_key_fingerprint": k.fingerprint,
                    "key_type": k.key_type,
                    "proof": issued.proof,
                    "renewal": issued.proof.startswith("renewal:"),
                    "ca_fingerprint": c.ca_fingerprint,
                    "valid_after": c.valid_after,
                    "valid_before": c.valid_before,
                    **(details or {}),
                },
            )
            entries.append(replace(entry, tenant_id=policy.tenant_id).sealed())
        b.store.record_host_issuance(certs, keys, entries, used)
        for c, k in issued.certificates:
            event(
                log,
                "host_certificate.issued",
                key_id=c.key_id,
                serial=c.serial,
                policy=policy.id,
                tenant=policy.tenant_id,
                proof=issued.proof,
                fingerprint=k.fingerprint,
            )
