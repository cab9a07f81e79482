"""A fresh ed25519 key pair per certificate, and a check of the certificate the service returns.

Imported only on the slow path (cryptography is a heavy import).
"""

from __future__ import annotations

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from .errors import EzsshError


def new_keypair(comment: str = "ezssh") -> tuple[bytes, str]:
    """(private key in OpenSSH format, unencrypted; public key line)."""
    key = ed25519.Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return private, f"{public.decode()} {comment}"


def inspect_certificate(cert_line: str, public_line: str, principal: str) -> dict:
    """Read the certificate back: it must certify OUR key, be a user certificate and name `principal`."""
    try:
        cert = serialization.load_ssh_public_identity(cert_line.strip().encode())
    except (ValueError, TypeError) as exc:
        raise EzsshError(f"The service returned something that is not an OpenSSH certificate: {exc}") from None
    if not isinstance(cert, serialization.SSHCertificate):
        raise EzsshError("The service returned a plain public key instead of a certificate.")
    ours = serialization.load_ssh_public_key(" ".join(public_line.split()[:2]).encode())
    raw = serialization.Encoding.Raw, serialization.PublicFormat.Raw
    if cert.public_key().public_bytes(*raw) != ours.public_bytes(*raw):
        raise EzsshError("The certificate the service returned is not for the key this client made.")
    if cert.type != serialization.SSHCertificateType.USER:
        raise EzsshError("The service returned a host certificate instead of a user certificate.")
    principals = [p.decode() for p in cert.valid_principals]
    if principal not in principals:
        raise EzsshError(f"The certificate does not name the login {principal!r} (it names {principals}).")
    return {
        "serial": str(cert.serial),
        "key_id": cert.key_id.decode(errors="replace"),
        "principals": principals,
        "valid_after": int(cert.valid_after),
        "valid_before": int(cert.valid_before),
    }
