"""A fresh ed25519 key pair per certificate, and a check of the certificate the service returns.

Stdlib only: the key comes from OpenSSH's own `ssh-keygen` (a few milliseconds, where importing
cryptography costs ~20), and the certificate is read with the wire format of OpenSSH's PROTOCOL.certkeys.
cryptography is the fallback where ssh-keygen is missing.
"""

from __future__ import annotations

import base64
import os
import struct

from .errors import EzsshError

CERT_SUFFIX = "-cert-v01@openssh.com"
USER_CERT = 1


def new_keypair(comment: str = "ezssh", workdir: str | None = None) -> tuple[bytes, str]:
    """(private key in OpenSSH format, unencrypted; public key line)."""
    from .spawn import run

    base = workdir or os.environ.get("TMPDIR") or "/tmp"
    d = os.path.join(base, f".ezssh-keygen-{os.getpid()}-{os.urandom(6).hex()}")
    os.mkdir(d, 0o700)
    path = os.path.join(d, "id_ed25519")
    try:
        try:
            rc, _ = run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", path], capture=True)
        except OSError:
            rc = -1
        if rc != 0:
            return _keypair_with_cryptography(comment)
        with open(path, "rb") as f:
            private = f.read()
        with open(path + ".pub") as f:
            public = f.read().strip()
        return private, public
    finally:
        for name in ("id_ed25519", "id_ed25519.pub"):
            try:
                os.unlink(os.path.join(d, name))
            except OSError:
                pass
        os.rmdir(d)


def _keypair_with_cryptography(comment: str) -> tuple[bytes, str]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    key = ed25519.Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return private, f"{public.decode()} {comment}"


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise ValueError("truncated")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def string(self) -> bytes:
        (n,) = struct.unpack(">I", self.take(4))
        return self.take(n)

    def u32(self) -> int:
        return struct.unpack(">I", self.take(4))[0]

    def u64(self) -> int:
        return struct.unpack(">Q", self.take(8))[0]


def _blob(line: str) -> tuple[str, bytes]:
    parts = line.strip().split()
    if len(parts) < 2:
        raise ValueError("not an OpenSSH key line")
    blob = base64.b64decode(parts[1], validate=True)
    kind = _Reader(blob).string().decode()
    if kind != parts[0]:
        raise ValueError(f"the key type {parts[0]!r} does not match its data ({kind!r})")
    return kind, blob


def inspect_certificate(cert_line: str, public_line: str, principal: str) -> dict:
    """Read the certificate back: it must certify OUR key, be a user certificate and name `principal`."""
    try:
        kind, blob = _blob(cert_line)
    except (ValueError, TypeError) as exc:
        raise EzsshError(f"The service returned something that is not an OpenSSH certificate: {exc}") from None
    if not kind.endswith(CERT_SUFFIX):
        raise EzsshError("The service returned a plain public key instead of a certificate.")
    our_kind, our_blob = _blob(public_line)
    if kind != our_kind + CERT_SUFFIX:
        raise EzsshError("The certificate the service returned is not for the key this client made.")
    try:
        r = _Reader(blob)
        r.string()  # type
        r.string()  # nonce
        pk = r.string()
        serial = r.u64()
        cert_type = r.u32()
        key_id = r.string()
        plist = _Reader(r.string())
        principals = []
        while plist.pos < len(plist.data):
            principals.append(plist.string().decode())
        valid_after, valid_before = r.u64(), r.u64()
    except ValueError as exc:
        raise EzsshError(f"The service returned a malformed certificate: {exc}") from None
    ours = _Reader(our_blob)
    ours.string()
    if pk != ours.string():
        raise EzsshError("The certificate the service returned is not for the key this client made.")
    if cert_type != USER_CERT:
        raise EzsshError("The service returned a host certificate instead of a user certificate.")
    if principal not in principals:
        raise EzsshError(f"The certificate does not name the login {principal!r} (it names {principals}).")
    return {
        "serial": str(serial),
        "key_id": key_id.decode(errors="replace"),
        "principals": principals,
        "valid_after": int(valid_after),
        "valid_before": int(valid_before),
    }
