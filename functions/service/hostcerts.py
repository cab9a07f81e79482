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
token is no proof here. Tokens, challenges, the checks of a host's proofs, rate limits, where
refusals go and the answer to a retry are hosttokens.py's (HostTokens, composed here: `mint_token`
and `challenge` are its own).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from ..core.certificate import IssuedCertificate
from ..core.errors import CaKeyNotFound, Conflict, EzsshError
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
)
from ..core.keys import VettedKey
from ..core.policy import Identity, Policy
from ..core.records import CertificateRecord, HostChallenge, HostEnrolmentToken, HostKeyRecord
from ..core.serials import new_serial
from ..observability import event
from ..signing.base import as_private_key
from .base import Base
from .hosts import Hosts
from .hosttokens import RETRY_WINDOW, HostIssued, HostTokens
from .namespaces import Namespaces
from .policies import Policies

log = logging.getLogger("ezssh.service")


def _dropped(outside: Sequence[str]) -> dict[str, Any]:
    """Audit details for names that no longer fit and were left out of a certificate."""
    return {"dropped_names": list(outside)} if outside else {}


class HostCerts:
    def __init__(self, base: Base, policies: Policies, hosts: Hosts, namespaces: Namespaces) -> None:
        self.base = base
        self.policies = policies
        self.hosts = hosts
        self.namespaces = namespaces
        self.tokens = HostTokens(base, policies, namespaces)
        # the admins' and hosts' calls that sign nothing, as HostCerts always offered them
        self.mint_token = self.tokens.mint_token
        self.challenge = self.tokens.challenge

    # ---- hosts: enrolment with a token and proof of possession -----------------------------------
    def issue_with_token(
        self, tenant_id: str, policy_id: str, token: str, challenge_id: str, signed: Sequence[tuple[str, str]]
    ) -> HostIssued:
        """First enrolment: the token an admin minted for named hosts, and each host key's signature
        (namespace ezssh-host-enrol) over the challenge issued for that token and those keys."""
        b = self.base
        with self.tokens.refusing_host(tenant_id, policy_id, "token"):
            tid, pid = self.tokens.tenant_policy(tenant_id, policy_id)
            tok = self.tokens.token(tid, token)
        with self.tokens.refusing_token(tid, pid, tok):
            now = b.now()
            keys = parse_host_keys([pk for pk, _ in signed])
            proof = f"token:{tok.token_hash[:12]}"

            def got(tok: HostEnrolmentToken) -> HostIssued | None:
                """What this token already got, if it was used for exactly these keys."""
                if tok.policy_id != pid or sorted((tok.used_by or "").split(",")) != sorted(
                    k.fingerprint for k in keys
                ):
                    return None
                return self.tokens.issued_before(tid, pid, tok.used_at, keys, lambda r: r.proof == proof)

            if tok.used_at is not None:  # a retry of that use, with the same signed challenge?
                self.tokens.signed_challenge(
                    tid, pid, challenge_id, keys, signed, ENROL_NAMESPACE, now, enrol_token=tok.token_hash, retry=True
                )
                again = got(tok)
                if again is not None:
                    return again
            self.tokens.usable(tok, pid, now, "enrolment token", "mint a new one")
            ch = self.tokens.signed_challenge(
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

    # ---- hosts: renewal by possession of the current host key ---------------------------------
    def renew(self, tenant_id: str, policy_id: str, challenge_id: str, signed: Sequence[tuple[str, str]]) -> HostIssued:
        b = self.base
        with self.tokens.refusing_host(tenant_id, policy_id, "renewal"):
            tid, pid = self.tokens.tenant_policy(tenant_id, policy_id)
            self.tokens.limit("challenge", str(challenge_id)[:64])
            now = b.now()
            keys = parse_host_keys([pk for pk, _ in signed])
            ch = self.tokens.signed_challenge(tid, pid, challenge_id, keys, signed, RENEW_NAMESPACE, now, retry=True)

            def got(ch: HostChallenge) -> HostIssued | None:
                """What this challenge already got: the certificates its use recorded for these keys."""
                used_at = ch.used_at
                return (
                    None
                    if used_at is None
                    else self.tokens.issued_before(
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
            records = [self.tokens.current_record(tid, pid, key, now) for key in keys]
        # The host proved it holds keys with current certificates of this tenant's policy: a refusal
        # from here on (names that no longer fit, say) is the tenant's to read.
        with self.tokens.refusing_in(
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
        with self.tokens.refusing_in(
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
    def _policy(self, tid: str, pid: str) -> Policy:
        p = self.base.policies.get_or_none(tid, pid)
        if p is None or p.deleted:
            raise ProofRefused("The policy does not exist.")
        return self.policies.ensure_host_ca(p)

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
