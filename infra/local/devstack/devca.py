"""A dev certificate authority for the local HTTPS stand-ins (the Entra ID stand-in first).

`ensure_dev_ca(state_dir)` creates, once, under `state_dir/tls/`:

    ca.pem / ca.key          self-signed CA, EC P-256, valid 10 years
    server.pem / server.key  TLS leaf for 127.0.0.1, ::1 and localhost, EC P-256, valid 1 year

Existing files are reused; a leaf that is missing, near expiry or not signed by the current CA is
re-issued. Clients trust `ca.pem` only (never the system store, never verify=False).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_DAYS = 3650
LEAF_DAYS = 365
RENEW_BEFORE = dt.timedelta(days=7)
SANS = ("127.0.0.1", "::1", "localhost")


@dataclass(frozen=True)
class DevCA:
    dir: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _write_private(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _write_public(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _make_ca(ca: DevCA) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "ezssh dev"),
            x509.NameAttribute(NameOID.COMMON_NAME, "ezssh local dev CA"),
        ]
    )
    now = _now()
    cert = (
        _builder(name, name, key.public_key(), now, CA_DAYS, ca=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_private(ca.ca_key, _key_pem(key))
    _write_public(ca.ca_cert, cert.public_bytes(serialization.Encoding.PEM))


def _builder(subject: x509.Name, issuer: x509.Name, public_key, now: dt.datetime, days: int, *,  # type: ignore[no-untyped-def]
             ca: bool) -> x509.CertificateBuilder:
    """What the dev CA and its server certificate share: validity, basic constraints, key usage."""
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False, key_cert_sign=ca, crl_sign=ca,
                          encipher_only=False, decipher_only=False),
            critical=True,
        )
    )


def _make_leaf(ca: DevCA) -> None:
    ca_cert = x509.load_pem_x509_certificate(ca.ca_cert.read_bytes())
    ca_key = serialization.load_pem_private_key(ca.ca_key.read_bytes(), password=None)
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = []
    for s in SANS:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(s)))
        except ValueError:
            sans.append(x509.DNSName(s))
    now = _now()
    cert = (
        _builder(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]), ca_cert.subject,
                 key.public_key(), now, LEAF_DAYS, ca=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    _write_private(ca.server_key, _key_pem(key))
    _write_public(ca.server_cert, cert.public_bytes(serialization.Encoding.PEM))


def _leaf_ok(ca: DevCA) -> bool:
    if not (ca.server_cert.exists() and ca.server_key.exists()):
        return False
    try:
        leaf = x509.load_pem_x509_certificate(ca.server_cert.read_bytes())
        ca_cert = x509.load_pem_x509_certificate(ca.ca_cert.read_bytes())
        leaf.verify_directly_issued_by(ca_cert)
    except Exception:  # noqa: BLE001 - any doubt about the leaf means re-issue it
        return False
    return leaf.not_valid_after_utc - _now() > RENEW_BEFORE


def ensure_dev_ca(state_dir: Path) -> DevCA:
    """Create (or reuse) the dev CA and the loopback TLS leaf under `state_dir/tls`."""
    tls = Path(state_dir) / "tls"
    tls.mkdir(parents=True, exist_ok=True)
    os.chmod(tls, 0o700)
    ca = DevCA(
        dir=tls,
        ca_cert=tls / "ca.pem",
        ca_key=tls / "ca.key",
        server_cert=tls / "server.pem",
        server_key=tls / "server.key",
    )
    if not (ca.ca_cert.exists() and ca.ca_key.exists()):
        _make_ca(ca)
        _make_leaf(ca)
    elif not _leaf_ok(ca):
        _make_leaf(ca)
    return ca
