"""Host certificates: vet a host's own host keys and names, turn a HostGrant into an OpenSSH host
certificate, re-read what was signed, and check a host's proof of possession (an SSHSIG signature).

Pure: stdlib + cryptography. The service decides who may ask (an enrolment token, ARM, or possession
of the current host key); this module only checks shapes and signs what the grant says.

    key   = parse_host_key("ssh-ed25519 AAAA...")        # ed25519, ECDSA, RSA >= 3072; never a cert
    names = check_host_names(policy, ["web1.example.com", "10.0.0.4"], namespaces, is_public)
    grant = HostGrant(tenant, policy, names, ttl_seconds=30 * 86400, proof="token:...")
    issued = build_host_certificate(grant, key, ca_private_key, now=now, serial=new_serial(now))
    verify_host_issued(issued, grant, key, ca_public_key, now=now)
    verify_sshsig(armored, message, "ezssh-host-renew", key)   # `ssh-keygen -Y sign -n ezssh-host-renew`
                                                   # (ezssh-host-enrol at enrolment)
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import ipaddress
import re
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.serialization import ssh

from .certificate import DEFAULT_BACKDATE, MAX_SERIAL, IssuedCertificate, issued_principals, read_back, sign_certificate
from .errors import EzsshError, IntegrityError, InvalidPublicKey, InvalidRequest, WeakPublicKey
from .hostmatch import host_matches
from .keys import VettedKey, parse_public_key
from .namespaces import IsPublic, Namespace, inside

MIN_HOST_RSA_BITS = 3072
MAX_HOST_NAMES = 32
DEFAULT_HOST_CERT_TTL = 30 * 86400
MIN_HOST_CERT_TTL = 3600
MAX_HOST_CERT_TTL = 366 * 86400
RENEW_NAMESPACE = "ezssh-host-renew"
ENROL_NAMESPACE = "ezssh-host-enrol"
HOSTNAME_RE = re.compile(
    r"^(?=.{1,253}$)[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*$"
)
WILDCARD_CHARS = set("*?[]!,")


class HostNameRefused(EzsshError):
    """A host name that is no valid principal, or one the policy's host patterns do not cover."""

    status, code = 400, "host_name_refused"


class ProofRefused(EzsshError):
    """The host did not prove possession: a bad, reused or expired token, or a wrong signature."""

    status, code = 403, "host_proof_refused"


# ---- host keys ------------------------------------------------------------------------------


def parse_host_key(text: object) -> VettedKey:
    """A host's own public host key: ed25519, ECDSA, or RSA of at least 3072 bits. A certificate (a
    user certificate sent in place of a host key, say) is refused."""
    if isinstance(text, str) and "-cert-v01@openssh.com" in text.split(" ", 1)[0]:
        raise InvalidPublicKey(
            "That is a certificate, not a host key. Send the host's public host key "
            "(e.g. /etc/ssh/ssh_host_ed25519_key.pub)."
        )
    key = parse_public_key(text)
    if isinstance(key.key, rsa.RSAPublicKey) and key.bits < MIN_HOST_RSA_BITS:
        raise WeakPublicKey(f"RSA host keys must have at least {MIN_HOST_RSA_BITS} bits; this one has {key.bits}.")
    return key


def parse_host_keys(items: Iterable[object]) -> tuple[VettedKey, ...]:
    keys = [parse_host_key(t) for t in items]
    if not keys:
        raise InvalidRequest("Send at least one host public key.")
    if len(keys) > 8:
        raise InvalidRequest("Send at most 8 host public keys.")
    if len({k.fingerprint for k in keys}) != len(keys):
        raise InvalidRequest("The same host key was sent twice.")
    return tuple(keys)


# ---- host names -----------------------------------------------------------------------------


def normalise_host_name(raw: object) -> str:
    """A host name or IP address as it goes into a certificate, or HostNameRefused."""
    if not isinstance(raw, str) or not raw.strip():
        raise HostNameRefused("A host name is empty; a host certificate never has empty principals.")
    name = raw.strip().lower().rstrip(".")
    if WILDCARD_CHARS & set(name):
        raise HostNameRefused(
            f"Host name {raw[:100]!r} has wildcard or list characters; a host certificate names each host exactly."
        )
    try:
        return str(ipaddress.ip_address(name))
    except ValueError:
        pass
    if not HOSTNAME_RE.match(name):
        raise HostNameRefused(f"{raw[:100]!r} is not a valid host name or IP address.")
    return name


def name_patterns(hosts: Iterable[str]) -> tuple[str, ...]:
    """The policy patterns that can cover a host NAME: globs and CIDRs (not tags or resource ids)."""
    return tuple(h for h in hosts if not h.startswith(("tag:", "/subscriptions/")))


class HostPatterns(Protocol):
    """What a host certificate's names are checked against: a policy's id and host patterns (the
    Policy record, which imports this module)."""

    @property
    def id(self) -> str: ...

    @property
    def hosts(self) -> tuple[str, ...]: ...


def fitting_host_names(
    policy: HostPatterns, names: Iterable[object], namespaces: Sequence[Namespace], is_public: IsPublic
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(the names a host certificate of this policy may carry, one sentence for each name it may not).

    A name fits when it is a valid host name or address, no public suffix, inside the tenant's host
    namespaces AND inside the policy's name globs and CIDRs. Tags and resource ids cover VMs for
    access; they vouch for no name."""
    pats = name_patterns(policy.hosts)
    kept: list[str] = []
    outside: list[str] = []
    for raw in names:
        try:
            name = normalise_host_name(raw)
        except HostNameRefused as exc:
            outside.append(exc.message)
            continue
        if name in kept:
            continue
        if not namespaces:
            outside.append(
                f"{name}: the tenant has declared no host namespaces (a tenant admin declares them "
                "with PUT /api/host-namespaces or the EZSSH_HOST_NAMESPACES setting)."
            )
        elif is_public(name):
            outside.append(f"{name} is a public suffix, not a host.")
        elif not inside(namespaces, name):
            outside.append(f"{name} is outside the tenant's host namespaces ({', '.join(str(n) for n in namespaces)}).")
        elif not any(host_matches(p, name, {}) for p in pats):  # the one matcher
            outside.append(f"{name} is outside policy {policy.id!r}'s host patterns.")
        else:
            kept.append(name)
    return tuple(kept), tuple(outside)


def check_host_names(
    policy: HostPatterns, names: Iterable[object], namespaces: Sequence[Namespace], is_public: IsPublic
) -> tuple[str, ...]:
    """Every name must fit (fitting_host_names); else HostNameRefused naming what does not."""
    kept, outside = fitting_host_names(policy, names, namespaces, is_public)
    if outside:
        raise HostNameRefused("Refused for a host certificate: " + " ".join(outside[:4]))
    return _bounded(kept)


def _bounded(names: tuple[str, ...]) -> tuple[str, ...]:
    if not names:
        raise HostNameRefused("No host names: a host certificate never has empty principals.")
    if len(names) > MAX_HOST_NAMES:
        raise HostNameRefused(f"At most {MAX_HOST_NAMES} host names go into one certificate.")
    return names


def kept_host_names(
    policy: HostPatterns, names: Iterable[object], namespaces: Sequence[Namespace], is_public: IsPublic
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """For names a host did not choose (ARM's, or those of the certificate being renewed): the ones
    that fit, and what was dropped; HostNameRefused when none fits."""
    kept, outside = fitting_host_names(policy, names, namespaces, is_public)
    if not kept:
        raise HostNameRefused("No name of this host fits a host certificate: " + " ".join(outside[:4]))
    return _bounded(kept), outside


# ---- the certificate ------------------------------------------------------------------------


@dataclass(frozen=True)
class HostGrant:
    """What a host may get: its names (already checked) for this long. `proof` says how it proved
    who it is: "token:<id>", "arm:<vm id>" or "renewal:<serial>"."""

    tenant_id: str
    policy_id: str
    principals: tuple[str, ...]
    ttl_seconds: int
    proof: str
    backdate_seconds: int = DEFAULT_BACKDATE

    @property
    def key_id(self) -> str:
        return f"ezssh-host/{self.policy_id}/{self.principals[0] if self.principals else '-'}"


def renew_after(valid_after: int, valid_before: int) -> int:
    """When a host should renew: two thirds into the validity (10 days before expiry at 30 days)."""
    return valid_after + (valid_before - valid_after) * 2 // 3


def build_host_certificate(
    grant: HostGrant, host_key: VettedKey, ca_private_key: ssh.SSHCertPrivateKeyTypes, *, now: int, serial: int
) -> IssuedCertificate:
    if not grant.principals:
        raise InvalidRequest("A host certificate must name at least one host.")
    if any(WILDCARD_CHARS & set(p) for p in grant.principals):
        raise InvalidRequest("A host certificate names each host exactly (no wildcards).")
    if not 0 < serial <= MAX_SERIAL:
        raise InvalidRequest("The serial must be a non-zero 63-bit number.")
    if not MIN_HOST_CERT_TTL <= grant.ttl_seconds <= MAX_HOST_CERT_TTL:
        raise InvalidRequest("The host certificate validity is out of range.")
    return sign_certificate(
        ssh.SSHCertificateType.HOST,
        host_key,
        grant.key_id,
        grant.principals,
        now - grant.backdate_seconds,
        now + grant.ttl_seconds,
        ca_private_key,
        serial=serial,
    )


def verify_host_issued(
    issued: IssuedCertificate,
    grant: HostGrant,
    host_key: VettedKey,
    ca_public_key: ssh.SSHCertPublicKeyTypes,
    *,
    now: int,
    verify_signature: Callable[[ssh.SSHCertificate], None] | None = None,
) -> None:
    """Re-read the signed host certificate and check it against the grant. Raises IntegrityError."""
    cert, problems = read_back(
        issued,
        ssh.SSHCertificateType.HOST,
        grant.key_id,
        grant.ttl_seconds,
        host_key,
        ca_public_key,
        now=now,
        verify_signature=verify_signature,
    )
    principals = issued_principals(cert)
    if principals != grant.principals:
        problems.append("principals differ from the grant")
    if any(WILDCARD_CHARS & set(p) for p in principals):
        problems.append("wildcard principal")
    if cert.critical_options or cert.extensions:
        problems.append("host certificates carry no options or extensions")
    if problems:
        raise IntegrityError("issued host certificate failed its final check: " + ", ".join(problems))


# ---- proof of possession: SSHSIG (ssh-keygen -Y sign) ---------------------------------------

SSHSIG_MAGIC = b"SSHSIG"
_ARMOR_BEGIN = "-----BEGIN SSH SIGNATURE-----"
_ARMOR_END = "-----END SSH SIGNATURE-----"


def _read_string(buf: bytes, pos: int) -> tuple[bytes, int]:
    if pos + 4 > len(buf):
        raise ValueError("truncated")
    (n,) = struct.unpack(">I", buf[pos : pos + 4])
    if pos + 4 + n > len(buf):
        raise ValueError("truncated")
    return buf[pos + 4 : pos + 4 + n], pos + 4 + n


def _string(b: bytes) -> bytes:
    return struct.pack(">I", len(b)) + b


def _sshsig_blob(text: object) -> bytes:
    if not isinstance(text, str) or not text.strip() or len(text) > 8192:
        raise ProofRefused("The signature must be the output of `ssh-keygen -Y sign` (armored or its base64).")
    body = text.strip()
    if body.startswith(_ARMOR_BEGIN):
        if _ARMOR_END not in body:
            raise ProofRefused("The signature's armor is not closed.")
        body = body[len(_ARMOR_BEGIN) : body.index(_ARMOR_END)]
    try:
        return base64.b64decode("".join(body.split()), validate=True)
    except (binascii.Error, ValueError):
        raise ProofRefused("The signature's base64 does not decode.") from None


def verify_sshsig(signature: object, message: bytes, namespace: str, key: VettedKey) -> None:
    """Check an SSHSIG signature (OpenSSH PROTOCOL.sshsig) by `key` over `message` in `namespace`.
    Raises ProofRefused naming what is wrong; returns only for a good signature by that key."""
    blob = _sshsig_blob(signature)
    try:
        if not blob.startswith(SSHSIG_MAGIC):
            raise ValueError("not an SSHSIG blob")
        pos = len(SSHSIG_MAGIC)
        (version,) = struct.unpack(">I", blob[pos : pos + 4])
        pos += 4
        pubkey, pos = _read_string(blob, pos)
        ns, pos = _read_string(blob, pos)
        reserved, pos = _read_string(blob, pos)
        hash_alg, pos = _read_string(blob, pos)
        sig, pos = _read_string(blob, pos)
        sig_type, spos = _read_string(sig, 0)
        sig_bytes, _ = _read_string(sig, spos)
    except (ValueError, struct.error):
        raise ProofRefused("The signature is not an SSH signature (ssh-keygen -Y sign).") from None
    if version != 1:
        raise ProofRefused(f"SSH signature version {version} is not supported.")
    if ns.decode(errors="replace") != namespace:
        raise ProofRefused(f"The signature is for namespace {ns.decode(errors='replace')!r}, not {namespace!r}.")
    if pubkey != base64.b64decode(key.openssh.split()[1]):
        raise ProofRefused("The signature was made by another key than the host key it is sent for.")
    algs = {b"sha256": hashes.SHA256(), b"sha512": hashes.SHA512()}
    if hash_alg not in algs:
        raise ProofRefused("The signature's hash algorithm must be sha256 or sha512.")
    h = hashlib.new(hash_alg.decode(), message).digest()
    signed = SSHSIG_MAGIC + _string(ns) + _string(reserved) + _string(hash_alg) + _string(h)
    k = key.key
    try:
        if isinstance(k, ed25519.Ed25519PublicKey):
            if sig_type != b"ssh-ed25519":
                raise InvalidSignature
            k.verify(sig_bytes, signed)
        elif isinstance(k, ec.EllipticCurvePublicKey):
            if sig_type != key.key_type.encode():
                raise InvalidSignature
            r, p2 = _read_string(sig_bytes, 0)
            s, _ = _read_string(sig_bytes, p2)
            curve_hash = {256: hashes.SHA256(), 384: hashes.SHA384(), 521: hashes.SHA512()}[k.curve.key_size]
            k.verify(
                encode_dss_signature(int.from_bytes(r, "big"), int.from_bytes(s, "big")), signed, ec.ECDSA(curve_hash)
            )
        elif isinstance(k, rsa.RSAPublicKey):
            rsa_hash = {b"rsa-sha2-512": hashes.SHA512(), b"rsa-sha2-256": hashes.SHA256()}.get(sig_type)
            if rsa_hash is None:
                raise InvalidSignature
            k.verify(sig_bytes, signed, padding.PKCS1v15(), rsa_hash)
        else:  # pragma: no cover - parse_host_key admits nothing else
            raise InvalidSignature
    except (InvalidSignature, ValueError, KeyError):
        raise ProofRefused("The signature does not verify with the host key it is sent for.") from None


# ---- clients: known_hosts patterns ----------------------------------------------------------
