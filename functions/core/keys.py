"""Parse and vet the user public keys that clients send.

Accepted: ssh-ed25519, ecdsa-sha2-nistp256/384/521, ssh-rsa with a modulus of 2048 to 16384 bits.
Refused, each with its own clear message: DSA, RSA under 2048 bits, certificates sent in place of a
key, FIDO (sk-) keys, anything that does not parse.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import struct
from dataclasses import dataclass

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from .errors import InvalidPublicKey, WeakPublicKey

MAX_KEY_TEXT = 16 * 1024
MIN_RSA_BITS = 2048
MAX_RSA_BITS = 16384

UserPublicKey = ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey | rsa.RSAPublicKey


@dataclass(frozen=True)
class VettedKey:
    key: UserPublicKey
    key_type: str  # the OpenSSH name, e.g. "ssh-ed25519"
    bits: int
    fingerprint: str  # "SHA256:..." as ssh-keygen -l prints it
    openssh: str  # "<type> <base64>" without comment


def fingerprint_of_blob(blob: bytes) -> str:
    digest = hashlib.sha256(blob).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def fingerprint(key: UserPublicKey) -> str:
    blob = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return fingerprint_of_blob(base64.b64decode(blob.split()[1]))


def _blob_type(blob: bytes) -> str:
    if len(blob) < 4:
        raise InvalidPublicKey("The public key is truncated.")
    (n,) = struct.unpack(">I", blob[:4])
    if n > 64 or len(blob) < 4 + n:
        raise InvalidPublicKey("The public key is malformed.")
    return blob[4 : 4 + n].decode("ascii", "replace")


def parse_public_key(text: object) -> VettedKey:
    """Parse one OpenSSH public key line and vet it. Raises InvalidPublicKey or WeakPublicKey."""
    if not isinstance(text, str) or not text.strip():
        raise InvalidPublicKey("public_key must be one OpenSSH public key line, e.g. 'ssh-ed25519 AAAA...'.")
    if len(text) > MAX_KEY_TEXT:
        raise InvalidPublicKey("The public key is too long.")
    line = text.strip()
    # PEM is multi-line, so look for it before refusing several lines: a pasted private key must
    # get the private-key message.
    if line.startswith("-----BEGIN"):
        if "PRIVATE" in line:
            raise InvalidPublicKey("That is a private key. Send the public key; the private key never leaves your machine.")
        raise InvalidPublicKey("PEM keys are not accepted; send the OpenSSH public key line.")
    if "\n" in line or "\r" in line:
        raise InvalidPublicKey("Send exactly one public key line.")
    parts = line.split()
    if len(parts) < 2:
        raise InvalidPublicKey("The public key must look like '<type> <base64> [comment]'.")
    declared, b64 = parts[0], parts[1]
    try:
        blob = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidPublicKey("The public key's base64 part does not decode.") from None
    inner = _blob_type(blob)
    if inner != declared:
        raise InvalidPublicKey(f"The key says it is {declared!r} but its data is {inner!r}.")
    if "-cert-v01@openssh.com" in declared:
        raise InvalidPublicKey("That is a certificate, not a public key. Send the key the certificate is for.")
    if declared == "ssh-dss":
        raise WeakPublicKey("DSA keys are not accepted. Use ed25519 (recommended), ECDSA, or RSA of 2048 bits or more.")
    if declared.startswith("sk-"):
        raise InvalidPublicKey("FIDO security-key (sk-) keys are not supported yet. Use ed25519, ECDSA or RSA.")
    if declared not in (
        "ssh-ed25519",
        "ecdsa-sha2-nistp256",
        "ecdsa-sha2-nistp384",
        "ecdsa-sha2-nistp521",
        "ssh-rsa",
    ):
        raise InvalidPublicKey(f"Key type {declared!r} is not supported. Use ed25519, ECDSA or RSA.")
    try:
        key = serialization.load_ssh_public_key(f"{declared} {b64}".encode())
    except (ValueError, TypeError) as exc:
        raise InvalidPublicKey(f"The public key does not parse: {exc}.") from None
    except Exception:  # noqa: BLE001 - any parser failure is a client error here
        raise InvalidPublicKey("The public key does not parse.") from None

    if isinstance(key, rsa.RSAPublicKey):
        bits = key.key_size
        if bits < MIN_RSA_BITS:
            raise WeakPublicKey(f"RSA keys must have at least {MIN_RSA_BITS} bits; this one has {bits}.")
        if bits > MAX_RSA_BITS:
            raise InvalidPublicKey(f"RSA keys over {MAX_RSA_BITS} bits are not accepted.")
        if key.public_numbers().e < 3 or key.public_numbers().e % 2 == 0:
            raise WeakPublicKey("The RSA public exponent is not valid.")
    elif isinstance(key, ec.EllipticCurvePublicKey):
        bits = key.curve.key_size
    elif isinstance(key, ed25519.Ed25519PublicKey):
        bits = 256
    else:  # pragma: no cover - load_ssh_public_key returned something we did not ask for
        raise InvalidPublicKey("Unsupported key type.")
    return VettedKey(
        key=key,
        key_type=declared,
        bits=bits,
        fingerprint=fingerprint_of_blob(blob),
        # Re-encode: base64 with non-zero padding bits decodes to the same key but would not
        # compare equal to what the certificate carries.
        openssh=f"{declared} {base64.b64encode(blob).decode()}",
    )
