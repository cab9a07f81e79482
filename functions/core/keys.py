"""Parse and vet the user public keys that clients send.

Accepted: ssh-ed25519, ecdsa-sha2-nistp256/384/521, ssh-rsa with a modulus of 2048 to 16384 bits.
Refused, each with its own clear message: DSA, RSA under 2048 bits, certificates sent in place of a
key, FIDO (sk-) keys, anything that does not parse.

The key blob is read field by field first, as OpenSSH's sshkey_from_blob and Go's x/crypto/ssh
ParsePublicKey do: every field present, nothing after the last one, the ECDSA curve name agreeing
with the key type, an uncompressed point of the curve's size, a 32-byte ed25519 key, RSA integers in
canonical positive mpint form. Then RSA's numbers are vetted: the modulus odd, without a prime factor
under 2000, of 2048 to 16384 bits; the exponent odd, at least 3 and below 2^32 and the modulus.
cryptography then checks that an ECDSA point lies on its curve.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import math
import struct
from dataclasses import dataclass

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from .errors import InvalidPublicKey, WeakPublicKey

MAX_KEY_TEXT = 16 * 1024
MIN_RSA_BITS = 2048
MAX_RSA_BITS = 16384
MAX_RSA_EXPONENT = 2**32


def _primes_below(n: int) -> tuple[int, ...]:
    sieve = bytearray([1]) * n
    sieve[0:2] = b"\x00\x00"
    for i in range(2, int(n**0.5) + 1):
        if sieve[i]:
            sieve[i * i :: i] = bytearray(len(sieve[i * i :: i]))
    return tuple(i for i in range(n) if sieve[i])


SMALL_PRIMES = _primes_below(2000)
_SMALL_PRIMORIAL = 1
for _p in SMALL_PRIMES:
    _SMALL_PRIMORIAL *= _p
EC_CURVES = {  # key type -> (curve name in the blob, coordinate bytes)
    "ecdsa-sha2-nistp256": ("nistp256", 32),
    "ecdsa-sha2-nistp384": ("nistp384", 48),
    "ecdsa-sha2-nistp521": ("nistp521", 66),
}

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


class _Reader:
    def __init__(self, blob: bytes) -> None:
        self.blob, self.off = blob, 0

    def string(self, what: str) -> bytes:
        if len(self.blob) - self.off < 4:
            raise InvalidPublicKey(f"The public key is truncated (no {what}).")
        (n,) = struct.unpack(">I", self.blob[self.off : self.off + 4])
        if n > len(self.blob) - self.off - 4:
            raise InvalidPublicKey(f"The public key is truncated (its {what} is cut short).")
        out = self.blob[self.off + 4 : self.off + 4 + n]
        self.off += 4 + n
        return out

    def mpint(self, what: str) -> int:
        raw = self.string(what)
        if not raw:
            return 0
        if raw[0] & 0x80:
            raise InvalidPublicKey(f"The RSA {what} is negative.")
        if raw[0] == 0 and (len(raw) == 1 or not raw[1] & 0x80):
            raise InvalidPublicKey(f"The RSA {what} is not in canonical form (a needless leading zero byte).")
        return int.from_bytes(raw, "big")

    def end(self) -> None:
        if self.off != len(self.blob):
            raise InvalidPublicKey(f"The public key has {len(self.blob) - self.off} bytes of trailing data.")


def check_blob_structure(declared: str, blob: bytes) -> None:
    """Field-by-field structure of a public key blob (see the module docstring)."""
    r = _Reader(blob)
    r.string("key type")
    if declared == "ssh-ed25519":
        pk = r.string("ed25519 key")
        if len(pk) != 32:
            raise InvalidPublicKey(f"An ed25519 public key is 32 bytes; this one is {len(pk)}.")
    elif declared in EC_CURVES:
        curve, size = EC_CURVES[declared]
        name = r.string("curve name")
        if name != curve.encode():
            raise InvalidPublicKey(
                f"The key says it is {declared!r} but names the curve {name.decode('ascii', 'replace')!r}."
            )
        point = r.string("curve point")
        if len(point) != 1 + 2 * size or point[0] != 4:
            raise InvalidPublicKey(f"The ECDSA point must be uncompressed and {1 + 2 * size} bytes for {curve}.")
    elif declared == "ssh-rsa":
        e = r.mpint("exponent")
        n = r.mpint("modulus")
        check_rsa_numbers(e, n)
    r.end()


def check_rsa_numbers(e: int, n: int) -> None:
    bits = n.bit_length()
    if bits < MIN_RSA_BITS:
        raise WeakPublicKey(f"RSA keys must have at least {MIN_RSA_BITS} bits; this one has {bits}.")
    if bits > MAX_RSA_BITS:
        raise InvalidPublicKey(f"RSA keys over {MAX_RSA_BITS} bits are not accepted.")
    if n % 2 == 0:
        raise InvalidPublicKey("The RSA modulus is even, so it is not a product of two large primes.")
    if math.gcd(n, _SMALL_PRIMORIAL) != 1:
        p = next(p for p in SMALL_PRIMES if n % p == 0)
        raise InvalidPublicKey(f"The RSA modulus is divisible by {p}, so it is not a product of two large primes.")
    if e < 3 or e % 2 == 0:
        raise WeakPublicKey("The RSA public exponent must be odd and at least 3.")
    if e >= MAX_RSA_EXPONENT or e >= n:
        raise InvalidPublicKey("The RSA public exponent is too large (it must be below 2^32).")


def parse_public_key(text: object) -> VettedKey:
    """Parse one OpenSSH public key line and vet it. Raises InvalidPublicKey or WeakPublicKey."""
    if not isinstance(text, str) or not text.strip():
        raise InvalidPublicKey(
            "public_key must be one OpenSSH public key line, e.g. 'ssh-ed25519 AAAA...'.", field="public_key"
        )
    if len(text) > MAX_KEY_TEXT:
        raise InvalidPublicKey("The public key is too long.")
    line = text.strip()
    # PEM is multi-line, so look for it before refusing several lines: a pasted private key must
    # get the private-key message.
    if line.startswith("-----BEGIN"):
        if "PRIVATE" in line:
            raise InvalidPublicKey(
                "That is a private key. Send the public key; the private key never leaves your machine."
            )
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
    check_blob_structure(declared, blob)
    try:
        key = serialization.load_ssh_public_key(f"{declared} {b64}".encode())
    except (ValueError, TypeError) as exc:
        raise InvalidPublicKey(f"The public key does not parse: {exc}.") from None
    except Exception:  # any parser failure is a client error here
        raise InvalidPublicKey("The public key does not parse.") from None

    if isinstance(key, rsa.RSAPublicKey):
        bits = key.key_size
        check_rsa_numbers(key.public_numbers().e, key.public_numbers().n)
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
