"""CA keys behind one small interface.

A `Signer` is a CA private key that lives somewhere we cannot read it (an HSM over PKCS#11, Azure
Key Vault / Managed HSM). It offers only its public key and a `sign()`; a `KeyStore` creates, finds
and disables such keys. `as_private_key()` wraps a Signer in a `CaKey` adapter that looks like a
`cryptography` private key, so `SSHCertificateBuilder().sign(as_private_key(signer))` signs an
OpenSSH certificate through the backend without the key ever leaving it.

Signature conventions (every backend, checked by tests/contract/test_signer.py):
- EC keys: `sign(data, hash)` hashes `data` with `hash` and returns a DER-encoded ECDSA signature
  (the shape `cryptography` returns and `SSHCertificateBuilder` decodes).
- RSA keys: `sign(data, hash)` returns an RSASSA-PKCS1-v1_5 signature over `hash(data)`.
- `hash` may be `cryptography`'s `Prehashed(alg)`: then `data` is already the digest.

This module imports only the standard library, `cryptography` and `functions.core`.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Literal, NoReturn, Protocol, TypeGuard, TypeVar, get_args, runtime_checkable

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

if TYPE_CHECKING:
    from typing_extensions import Self

KeyKind = Literal["EC-P256", "EC-P384", "EC-P521", "RSA-2048", "RSA-3072", "RSA-4096"]
"""Kinds of CA key. EC-P256 is the default; RSA-3072 is the RSA size we recommend."""

KEY_KINDS: tuple[str, ...] = get_args(KeyKind)
DEFAULT_KIND: KeyKind = "EC-P256"

EC_CURVES: dict[KeyKind, ec.EllipticCurve] = {
    "EC-P256": ec.SECP256R1(),
    "EC-P384": ec.SECP384R1(),
    "EC-P521": ec.SECP521R1(),
}
RSA_BITS: dict[KeyKind, int] = {"RSA-2048": 2048, "RSA-3072": 3072, "RSA-4096": 4096}

CaPublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey
CaPrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


@runtime_checkable
class Signer(Protocol):
    """One CA private key held by a backend. Safe to use from many threads at once."""

    key_ref: str
    """Stable backend reference (stored in the policy row); `KeyStore.get_signer(key_ref)` finds it."""

    def public_key(self) -> CaPublicKey:
        """The CA public key. Cached: no backend round trip after the first call."""
        ...

    def sign(self, data: bytes, algorithm: hashes.HashAlgorithm | Prehashed) -> bytes:
        """EC: DER ECDSA signature over hash(data) (over data itself with Prehashed). RSA: PKCS#1
        v1.5 signature over hash(data).

        Raises CaKeyNotFound if the key is gone or disabled, SignerUnavailable if the backend
        cannot be reached.
        """
        ...


@runtime_checkable
class KeyStore(Protocol):
    """Creates and finds CA keys in one backend (one HSM token, one Key Vault)."""

    def create_key(self, name: str, kind: KeyKind = "EC-P256") -> Signer:
        """A new non-extractable, sign-only key pair named `name`."""
        ...

    def get_signer(self, key_ref: str) -> Signer:
        """The key `key_ref` names. Raises CaKeyNotFound if there is none (or it was disabled)."""
        ...

    def disable_key(self, key_ref: str) -> None:
        """Afterwards the key signs nothing: get_signer and sign raise CaKeyNotFound."""
        ...

    def verify_key(self, key_ref: str) -> Signer:
        """A customer's own existing key (bring your own key), proved to be readable and to sign.
        Raises a client error (4xx) naming what is missing; backends that can't do this say so."""
        ...

    def health(self) -> None:
        """Returns if the backend answers; raises SignerUnavailable otherwise."""
        ...


def _is_kind(kind: str) -> TypeGuard[KeyKind]:
    return kind in KEY_KINDS


def check_kind(kind: str) -> KeyKind:
    if not _is_kind(kind):
        raise ValueError(f"unsupported CA key kind {kind!r}; expected one of {', '.join(KEY_KINDS)}")
    return kind


def kind_of(public_key: CaPublicKey) -> KeyKind:
    """The KeyKind of a public key (raises ValueError for anything else)."""
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        for kind, curve in EC_CURVES.items():
            if curve.name == public_key.curve.name:
                return kind
    elif isinstance(public_key, rsa.RSAPublicKey):
        for kind, bits in RSA_BITS.items():
            if bits == public_key.key_size:
                return kind
    raise ValueError(f"not a supported CA public key: {type(public_key).__name__}")


_SignerT = TypeVar("_SignerT", bound="StoreSigner", contravariant=True)


class SigningStore(Protocol[_SignerT]):
    """The key store that made a StoreSigner, and signs for it."""

    def _sign(self, signer: _SignerT, data: bytes, algorithm: hashes.HashAlgorithm | Prehashed) -> bytes: ...


class StoreSigner:
    """The common part of backend signers: the public key is held, and signing is done by the key
    store that made the signer (`store._sign(signer, data, algorithm)`)."""

    key_ref: str

    def __init__(self, store: SigningStore[Self], key_ref: str, public: CaPublicKey) -> None:
        self.key_ref = key_ref
        self._store = store
        self._public = public

    @property
    def kind(self) -> KeyKind:
        return kind_of(self._public)

    def public_key(self) -> CaPublicKey:
        return self._public

    def sign(self: Self, data: bytes, algorithm: hashes.HashAlgorithm | Prehashed) -> bytes:
        return self._store._sign(self, bytes(data), algorithm)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.key_ref}>"


def split_hash(data: bytes, algorithm: hashes.HashAlgorithm | Prehashed) -> tuple[bytes, hashes.HashAlgorithm]:
    """(digest, hash algorithm) for `sign(data, algorithm)`; accepts Prehashed (data is the digest)."""
    if isinstance(algorithm, Prehashed):
        alg = algorithm._algorithm  # cryptography keeps the wrapped algorithm here
        if len(data) != alg.digest_size:
            raise ValueError(f"prehashed digest has {len(data)} bytes, {alg.name} needs {alg.digest_size}")
        return data, alg
    if not isinstance(algorithm, (hashes.SHA256, hashes.SHA384, hashes.SHA512)):
        raise ValueError(f"CA signatures use SHA-256/384/512, not {getattr(algorithm, 'name', algorithm)!r}")
    h = hashes.Hash(algorithm)
    h.update(data)
    return h.finalize(), algorithm


# ---- the cryptography adapter -------------------------------------------------------------------


def _no_secret(what: str) -> NoReturn:
    raise TypeError(f"{what} is not available: this CA key lives in a key store and cannot be read")


def _hash_from(algorithm: object) -> hashes.HashAlgorithm | Prehashed:
    if isinstance(algorithm, (hashes.HashAlgorithm, Prehashed)):
        return algorithm
    raise TypeError(f"expected a hash algorithm, got {type(algorithm).__name__}")


class _CaKeyBase:
    """What both adapters share: the signer, its cached public key, and no way to the secret."""

    _signer: Signer
    _public: CaPublicKey

    @property
    def signer(self) -> Signer:
        return self._signer

    @property
    def key_size(self) -> int:
        return self._public.key_size

    def private_numbers(self) -> NoReturn:
        _no_secret("private_numbers()")

    def private_bytes(self, *args: object, **kwargs: object) -> bytes:
        _no_secret("private_bytes()")

    def __copy__(self) -> Self:
        return self

    def __deepcopy__(self, memo: dict[int, object]) -> Self:
        return self


class CaKeyEC(_CaKeyBase, ec.EllipticCurvePrivateKey):
    """A Signer seen as a cryptography EC private key. Only public_key(), curve, key_size, sign()."""

    _public: ec.EllipticCurvePublicKey

    def __init__(self, signer: Signer) -> None:
        pub = signer.public_key()
        if not isinstance(pub, ec.EllipticCurvePublicKey):
            raise TypeError("CaKeyEC needs an EC signer")
        self._signer = signer
        self._public = pub

    @property
    def curve(self) -> ec.EllipticCurve:
        return self._public.curve

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._public

    def sign(
        self, data: bytes | bytearray | memoryview, signature_algorithm: ec.EllipticCurveSignatureAlgorithm
    ) -> bytes:
        if not isinstance(signature_algorithm, ec.ECDSA):
            raise TypeError("only ECDSA signatures are supported")
        if getattr(signature_algorithm, "deterministic_signing", False):
            raise TypeError("deterministic ECDSA (RFC 6979) is not supported by key store signers")
        return self._signer.sign(bytes(data), _hash_from(signature_algorithm.algorithm))

    def exchange(self, algorithm: ec.ECDH, peer_public_key: ec.EllipticCurvePublicKey) -> bytes:
        raise NotImplementedError("a CA key only signs; ECDH is not supported")

    def __repr__(self) -> str:
        return f"<CaKeyEC {self._public.curve.name} {self._signer.key_ref}>"


class CaKeyRSA(_CaKeyBase, rsa.RSAPrivateKey):
    """A Signer seen as a cryptography RSA private key. Only public_key(), key_size, sign()."""

    _public: rsa.RSAPublicKey

    def __init__(self, signer: Signer) -> None:
        pub = signer.public_key()
        if not isinstance(pub, rsa.RSAPublicKey):
            raise TypeError("CaKeyRSA needs an RSA signer")
        self._signer = signer
        self._public = pub

    def public_key(self) -> rsa.RSAPublicKey:
        return self._public

    def sign(self, data: bytes, padding_: padding.AsymmetricPadding, algorithm: object) -> bytes:
        if not isinstance(padding_, padding.PKCS1v15):
            raise TypeError("only PKCS#1 v1.5 RSA signatures are supported")
        return self._signer.sign(bytes(data), _hash_from(algorithm))

    def decrypt(self, ciphertext: bytes, padding: padding.AsymmetricPadding) -> bytes:
        raise NotImplementedError("a CA key only signs; decryption is not supported")

    def __repr__(self) -> str:
        return f"<CaKeyRSA {self._public.key_size} {self._signer.key_ref}>"


CaKey = CaKeyEC | CaKeyRSA


def as_private_key(signer: Signer) -> CaPrivateKey:
    """A cryptography private key whose sign() calls `signer` (for SSHCertificateBuilder.sign)."""
    pub = signer.public_key()
    if isinstance(pub, ec.EllipticCurvePublicKey):
        return CaKeyEC(signer)
    if isinstance(pub, rsa.RSAPublicKey):
        return CaKeyRSA(signer)
    raise TypeError(f"unsupported CA public key type {type(pub).__name__}")


# ---- OpenSSH renderings -------------------------------------------------------------------------


def ssh_public_key_line(signer: Signer | CaPublicKey, comment: str = "") -> str:
    """The CA public key as one OpenSSH authorized_keys / TrustedUserCAKeys line."""
    pub = signer if isinstance(signer, (ec.EllipticCurvePublicKey, rsa.RSAPublicKey)) else signer.public_key()
    line = pub.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    comment = comment.strip()
    if "\n" in comment or "\r" in comment:
        raise ValueError("comment must be one line")
    return f"{line} {comment}" if comment else line


def ssh_fingerprint(public_key: CaPublicKey | Signer) -> str:
    """ "SHA256:<base64, no padding>", exactly as `ssh-keygen -lf` prints it."""
    pub = (
        public_key if isinstance(public_key, (ec.EllipticCurvePublicKey, rsa.RSAPublicKey)) else public_key.public_key()
    )
    line = pub.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    blob = base64.b64decode(line.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


# ---- a key store that comes up late -------------------------------------------------------------


class LateKeyStore:
    """A KeyStore built on first use and again after a failed build (at most every `retry_seconds`).

    A worker whose HSM login fails at start still starts: its storage, audit and refusals work,
    every signing call answers SignerUnavailable (recorded as a failed request), and the backend
    is tried again a moment later instead of on every request or never."""

    def __init__(self, build: Callable[[], KeyStore], retry_seconds: float = 2.0) -> None:
        import threading

        self._build = build
        self._retry = retry_seconds
        self._store: KeyStore | None = None
        self._failed_at = float("-inf")
        self._error: Exception | None = None
        self._lock = threading.Lock()

    def _get(self) -> KeyStore:
        import time

        store = self._store
        if store is not None:
            return store
        with self._lock:
            if self._store is not None:
                return self._store
            if self._error is not None and time.monotonic() - self._failed_at < self._retry:
                raise self._error
            try:
                self._store = self._build()
            except Exception as exc:
                self._failed_at, self._error = time.monotonic(), exc
                raise
            self._error = None
            return self._store

    def create_key(self, name: str, kind: KeyKind = "EC-P256") -> Signer:
        return self._get().create_key(name, kind)

    def get_signer(self, key_ref: str) -> Signer:
        return self._get().get_signer(key_ref)

    def disable_key(self, key_ref: str) -> None:
        self._get().disable_key(key_ref)

    def verify_key(self, key_ref: str) -> Signer:
        return self._get().verify_key(key_ref)

    def health(self) -> None:
        self._get().health()
