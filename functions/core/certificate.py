"""Turn a Grant into an OpenSSH user certificate, then check what was signed.

The builder does no policy thinking: everything it writes comes from the Grant (smallstep's
"modifiers then validators"). After signing, `verify_issued` re-reads the certificate and checks it
against the grant before anything is stored or returned.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import ssh

from .errors import IntegrityError, InvalidRequest
from .keys import VettedKey, fingerprint

DEFAULT_BACKDATE = 60
KNOWN_EXTENSIONS = frozenset(
    {
        "permit-X11-forwarding",
        "permit-agent-forwarding",
        "permit-port-forwarding",
        "permit-pty",
        "permit-user-rc",
        "no-touch-required",
    }
)
KNOWN_CRITICAL_OPTIONS = frozenset({"force-command", "source-address", "verify-required"})
MAX_SERIAL = 2**63 - 1


@dataclass(frozen=True)
class Grant:
    """What the policy allows for one request. Built only by core.evaluation (make_grant); read only by the builder."""

    tenant_id: str
    policy_id: str
    request_id: str
    upn: str
    principals: tuple[str, ...]
    ttl_seconds: int
    extensions: tuple[str, ...] = ()
    critical_options: tuple[tuple[str, str], ...] = ()
    backdate_seconds: int = DEFAULT_BACKDATE

    @property
    def key_id(self) -> str:
        return f"ezssh/{self.policy_id}/{self.request_id}/{self.upn}"


@dataclass(frozen=True)
class IssuedCertificate:
    certificate: ssh.SSHCertificate
    openssh: str  # one line, "<type>-cert-v01@openssh.com <base64> <comment>"
    serial: int
    key_id: str
    principals: tuple[str, ...]
    valid_after: int
    valid_before: int
    ca_fingerprint: str
    extensions: tuple[str, ...] = field(default=())
    critical_options: tuple[tuple[str, str], ...] = field(default=())


def build_certificate(
    grant: Grant,
    user_key: VettedKey,
    ca_private_key: ssh.SSHCertPrivateKeyTypes,
    *,
    now: int,
    serial: int,
) -> IssuedCertificate:
    if not grant.principals:
        raise InvalidRequest("A certificate must name at least one principal.")
    if not 0 < serial <= MAX_SERIAL:
        raise InvalidRequest("The serial must be a non-zero 63-bit number.")
    return sign_certificate(
        ssh.SSHCertificateType.USER,
        user_key,
        grant.key_id,
        grant.principals,
        now - grant.backdate_seconds,
        now + grant.ttl_seconds,
        ca_private_key,
        serial=serial,
        critical_options=grant.critical_options,
        extensions=grant.extensions,
    )


def sign_certificate(
    cert_type: ssh.SSHCertificateType,
    key: VettedKey,
    key_id: str,
    principals: tuple[str, ...],
    valid_after: int,
    valid_before: int,
    ca_private_key: ssh.SSHCertPrivateKeyTypes,
    *,
    serial: int,
    critical_options: tuple[tuple[str, str], ...] = (),
    extensions: tuple[str, ...] = (),
) -> IssuedCertificate:
    """The one place a certificate (user or host) is built and signed by SSHCertificateBuilder."""
    builder = (
        ssh.SSHCertificateBuilder()
        .public_key(key.key)
        .serial(serial)
        .type(cert_type)
        .key_id(key_id.encode())
        .valid_principals([p.encode() for p in principals])
        .valid_after(valid_after)
        .valid_before(valid_before)
    )
    for name, value in critical_options:
        builder = builder.add_critical_option(name.encode(), value.encode())
    for name in extensions:
        builder = builder.add_extension(name.encode(), b"")
    cert = builder.sign(ca_private_key)
    return IssuedCertificate(
        certificate=cert,
        openssh=cert.public_bytes().decode() + f" {key_id}",
        serial=serial,
        key_id=key_id,
        principals=principals,
        valid_after=valid_after,
        valid_before=valid_before,
        ca_fingerprint=fingerprint(ca_private_key.public_key()),
        extensions=tuple(sorted(extensions)),
        critical_options=tuple(sorted(critical_options)),
    )


def verify_issued(
    issued: IssuedCertificate,
    grant: Grant,
    user_key: VettedKey,
    ca_public_key: ssh.SSHCertPublicKeyTypes,
    *,
    now: int,
    verify_signature: Callable[[ssh.SSHCertificate], None] | None = None,
) -> None:
    """Re-read the signed certificate and check it against the grant. Raises IntegrityError."""
    cert, problems = read_back(
        issued,
        ssh.SSHCertificateType.USER,
        grant.key_id,
        grant.ttl_seconds,
        user_key,
        ca_public_key,
        now=now,
        verify_signature=verify_signature,
    )
    if not set(issued_principals(cert)) <= set(grant.principals):
        problems.append("principals outside the grant")
    crit = {k.decode(): v.decode() for k, v in cert.critical_options.items()}
    if crit != dict(grant.critical_options):
        problems.append("critical options differ from the grant")
    if set(e.decode() for e in cert.extensions) - set(grant.extensions):
        problems.append("extensions outside the grant")
    if problems:
        raise IntegrityError("issued certificate failed its final check: " + ", ".join(problems))


def issued_principals(cert: ssh.SSHCertificate) -> tuple[str, ...]:
    return tuple(p.decode() for p in cert.valid_principals)


def read_back(
    issued: IssuedCertificate,
    cert_type: ssh.SSHCertificateType,
    key_id: str,
    ttl_seconds: int,
    key: VettedKey,
    ca_public_key: ssh.SSHCertPublicKeyTypes,
    *,
    now: int,
    verify_signature: Callable[[ssh.SSHCertificate], None] | None = None,
) -> tuple[ssh.SSHCertificate, list[str]]:
    """Parse a signed certificate back and list what is wrong with it that every certificate shares:
    type, principals present, serial and validity as recorded, validity ordered and within the TTL,
    key id, certified key, signing CA and signature. The callers add their own kind's checks."""
    raw = ssh.load_ssh_public_identity(issued.openssh.encode())
    if not isinstance(raw, ssh.SSHCertificate):
        raise IntegrityError("issued certificate does not parse as a certificate")
    cert = raw
    problems = []
    if cert.type != cert_type:
        problems.append(f"not a {'user' if cert_type == ssh.SSHCertificateType.USER else 'host'} certificate")
    if not cert.valid_principals:
        problems.append("no principals")
    if cert.serial == 0:
        problems.append("zero serial")
    if (cert.serial, cert.valid_after, cert.valid_before) != (issued.serial, issued.valid_after, issued.valid_before):
        problems.append("serial or validity differs from what will be recorded")
    if not cert.valid_after < cert.valid_before:
        problems.append("validity not ordered")
    if cert.valid_before - now > ttl_seconds:
        problems.append("validity longer than the grant")
    if cert.key_id.decode() != key_id:
        problems.append("key id differs from the grant")
    pub = cert.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    if pub.split()[:2] != key.openssh.encode().split()[:2]:
        problems.append(
            f"certified key is not the {'user' if cert_type == ssh.SSHCertificateType.USER else 'host'}'s key"
        )
    sig_key = cert.signature_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    ca_pub = ca_public_key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    if sig_key != ca_pub:
        problems.append("signed by an unexpected CA")
    try:
        (verify_signature or (lambda c: c.verify_cert_signature()))(cert)
    except InvalidSignature:
        problems.append("signature does not verify")
    return cert, problems
