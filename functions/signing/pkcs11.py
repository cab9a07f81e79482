"""CA keys in a PKCS#11 token: SoftHSM2 locally, any HSM with a PKCS#11 module in production.

    store = Pkcs11KeyStore("/usr/lib/softhsm/libsofthsm2.so", "ezssh-dev", "1234", sessions=4)
    signer = store.create_key("policy-web", "EC-P256")   # signer.key_ref -> "pkcs11:policy-web:9f.."
    cert = SSHCertificateBuilder()....sign(as_private_key(store.get_signer(key_ref)))

How it works
- The token is found by its LABEL (slot ids are not stable: SoftHSM picks a random one per token).
- Threads: python-pkcs11 always calls C_Initialize(NULL), which tells a module it will never be
  called from two threads at once; SoftHSM then switches its mutexes off and segfaults under
  concurrent signing. `load_library` therefore re-initialises the module once, before any session
  exists, with CKF_OS_LOCKING_OK (ctypes, same loaded module). A module that cannot lock gets every
  call serialised instead.
- One process-wide login per token (PKCS#11 login state belongs to the application, not to a
  session): a dedicated login session is opened with the PIN and kept open; the pool's sessions are
  opened without a PIN, so closing one never logs anybody out.
- A pool of `sessions` read/write sessions, each used by one thread at a time (python-pkcs11 drops
  the GIL around every C call, so N sessions sign in parallel). Each pooled session caches the
  object handles of the private keys it has used.
- A dead session or token (handle invalid, token removed, library finalised, login lost) makes the
  store reopen everything once (find the token by label again, log in, new pool) and retry; if that
  fails too the caller gets SignerUnavailable with one clear sentence, never a PKCS#11 traceback.
- Threads in flight: a leased session holds the module's gate (pkcs11_module.ModuleGate) shared;
  reopening and re-initialising the module (C_Finalize, C_Initialize: the way back from a token that
  went away) hold it exclusively. So nothing is closed or finalised under a call in flight: new
  calls wait while the calls in flight finish, every wait bounded by the API request's deadline
  (functions/deadline.py) and ending in SignerUnavailable.
- Keys: EC P-256/P-384/P-521 (CKM_EC_KEY_PAIR_GEN with the named curve) or RSA 2048/3072/4096
  (CKM_RSA_PKCS_KEY_PAIR_GEN, e=65537), both halves token objects with CKA_LABEL = name and a fresh
  random 16-byte CKA_ID. The private key is CKA_SENSITIVE, not CKA_EXTRACTABLE, CKA_SIGN only (no
  decrypt/unwrap/derive). key_ref = "pkcs11:<label>:<CKA_ID hex>".
- Signing: SoftHSM has no CKM_ECDSA_SHA256, so EC hashes in Python and signs the digest with
  CKM_ECDSA, then turns the raw r||s into DER. RSA uses CKM_SHA{256,384,512}_RSA_PKCS when the token
  lists it (SoftHSM does), else CKM_RSA_PKCS over DigestInfo || digest (same signature bytes).
- disable_key DESTROYS the private key object (irreversible; the public key object stays so the CA
  public key can still be read by tools). Clearing CKA_SIGN would be reversible by anybody holding
  the user PIN, so it does not count as disabled. Disabled keys raise CaKeyNotFound everywhere,
  including through Signer objects handed out earlier and through other store instances.

This module reads no environment: module path, label and PIN come in through the constructor.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import pkcs11
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, encode_dss_signature
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11 import exceptions as px
from pkcs11.types import SignMixin
from pkcs11.util.ec import encode_named_curve_parameters

from functions import deadline
from functions.core.errors import CaKeyNotFound, InvalidRequest, SignerUnavailable
from functions.signing.base import (
    DEFAULT_KIND,
    EC_CURVES,
    RSA_BITS,
    CaPublicKey,
    KeyKind,
    StoreSigner,
    check_kind,
    split_hash,
)
from functions.signing.pkcs11_module import (  # load_library, reinitialize_library: this module's API too
    ModuleGate,
    _call_lock,
    _close_quietly,
    _describe,
    _ensure_login,
    _FairPool,
    _forget_login,
    _is_dead,
    _Lease,
    _rv,
    gate,
    reinitialize_exclusive,
)
from functions.signing.pkcs11_module import (
    load_library as load_library,
)
from functions.signing.pkcs11_module import (
    reinitialize_library as reinitialize_library,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

KEY_REF_PREFIX = "pkcs11:"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_ID_BYTES = 16

_STALE_KEY = (px.ObjectHandleInvalid, px.KeyHandleInvalid)
# After the token went away and came back, SoftHSM keeps a stale view of it: objects look "missing"
# and new sessions fail until C_Finalize + C_Initialize. At most this often, a store renews its
# sessions on a missing key, and reinitialises the module when the token will not open.
RECOVER_INTERVAL = 1.0


class _KeyMissing(CaKeyNotFound):
    """The key object is not found: disabled, or the token's view is stale (recover, then decide)."""


_CKR_KEY_FUNCTION_NOT_PERMITTED = 0x68

_DIGEST_INFO = {  # RFC 8017 section 9.2, note 1
    "sha256": bytes.fromhex("3031300d060960864801650304020105000420"),
    "sha384": bytes.fromhex("3041300d060960864801650304020205000430"),
    "sha512": bytes.fromhex("3051300d060960864801650304020305000440"),
}
_RSA_HASH_MECHS = {
    "sha256": Mechanism.SHA256_RSA_PKCS,
    "sha384": Mechanism.SHA384_RSA_PKCS,
    "sha512": Mechanism.SHA512_RSA_PKCS,
}
_CURVE_NAMES: dict[KeyKind, str] = {"EC-P256": "secp256r1", "EC-P384": "secp384r1", "EC-P521": "secp521r1"}


# ---- key refs -----------------------------------------------------------------------------------


def make_key_ref(label: str, key_id: bytes) -> str:
    return f"{KEY_REF_PREFIX}{label}:{key_id.hex()}"


def parse_key_ref(key_ref: str) -> tuple[str, bytes]:
    """(label, CKA_ID) from "pkcs11:<label>:<id hex>"; CaKeyNotFound if it is not one of ours."""
    if not isinstance(key_ref, str) or not key_ref.startswith(KEY_REF_PREFIX):
        raise CaKeyNotFound("the CA key reference is not a PKCS#11 key reference", key_ref=str(key_ref))
    label, sep, id_hex = key_ref[len(KEY_REF_PREFIX) :].rpartition(":")
    try:
        key_id = bytes.fromhex(id_hex)
    except ValueError:
        key_id = b""
    if not sep or not _NAME_RE.match(label) or not key_id:
        raise CaKeyNotFound("the CA key reference is malformed", key_ref=key_ref)
    return label, key_id


# ---- the signer ---------------------------------------------------------------------------------


class Pkcs11Signer(StoreSigner):
    """One CA key in the token. Thread-safe; every sign borrows a pooled session."""

    def __init__(self, store: Pkcs11KeyStore, key_ref: str, label: str, key_id: bytes, public: CaPublicKey) -> None:
        super().__init__(store, key_ref, public)
        self.label = label
        self.key_id = key_id


class Pkcs11KeyStore:
    """KeyStore over one PKCS#11 token, found by label. Safe to share between threads."""

    def __init__(
        self,
        module_path: str,
        token_label: str,
        pin: str,
        *,
        sessions: int = 4,
        acquire_timeout: float = 30.0,
    ) -> None:
        if sessions < 1:
            raise ValueError("sessions must be >= 1")
        if not token_label:
            raise ValueError("token_label is required")
        self.module_path = module_path
        self.token_label = token_label
        self._pin = pin
        self._size = sessions
        self._acquire_timeout = acquire_timeout
        self._lock = threading.RLock()
        self._pool = _FairPool()
        self._generation = 0
        self._broken: str | None = None
        self._lib_path = os.path.realpath(module_path)
        self._token: pkcs11.Token | None = None
        self._mechanisms: frozenset = frozenset()
        self._signers: dict[str, Pkcs11Signer] = {}
        self._closed = False
        self._last_recovery = self._last_refresh = float("-inf")
        load_library(module_path)
        self._gate: ModuleGate = gate(module_path)
        with self._gate.exclusive(self._budget()), self._lock:
            self._open_locked()

    def __repr__(self) -> str:
        return f"<Pkcs11KeyStore token={self.token_label!r} sessions={self._size}>"

    # ---- KeyStore -------------------------------------------------------------------------------

    def create_key(self, name: str, kind: KeyKind = DEFAULT_KIND) -> Pkcs11Signer:
        kind = check_kind(kind)
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise ValueError("key name must be 1-64 characters of A-Z a-z 0-9 . _ - (starting alphanumeric)")

        def create(lease: _Lease) -> Pkcs11Signer:
            s = lease.session
            key_id = s.generate_random(_ID_BYTES * 8)
            common = {Attribute.TOKEN: True, Attribute.LABEL: name, Attribute.ID: key_id}
            public_t = {
                **common,
                Attribute.PRIVATE: False,
                Attribute.VERIFY: True,
                Attribute.ENCRYPT: False,
                Attribute.WRAP: False,
                Attribute.DERIVE: False,
            }
            private_t = {
                **common,
                Attribute.PRIVATE: True,
                Attribute.SENSITIVE: True,
                Attribute.EXTRACTABLE: False,
                Attribute.SIGN: True,
                Attribute.DECRYPT: False,
                Attribute.UNWRAP: False,
                Attribute.DERIVE: False,
            }
            if kind in EC_CURVES:
                public_t[Attribute.EC_PARAMS] = encode_named_curve_parameters(_CURVE_NAMES[kind])
                pub, priv = s.generate_keypair(
                    KeyType.EC, store=True, id=key_id, label=name,
                    mechanism=Mechanism.EC_KEY_PAIR_GEN,
                    public_template=public_t, private_template=private_t,
                )  # fmt: skip
            else:
                pub, priv = s.generate_keypair(
                    KeyType.RSA, RSA_BITS[kind], store=True, id=key_id, label=name,
                    mechanism=Mechanism.RSA_PKCS_KEY_PAIR_GEN,
                    public_template=public_t, private_template=private_t,
                )  # fmt: skip
            attrs = priv.get_attributes([Attribute.SENSITIVE, Attribute.EXTRACTABLE, Attribute.SIGN, Attribute.PRIVATE])
            if not (attrs[Attribute.SENSITIVE] and not attrs[Attribute.EXTRACTABLE] and attrs[Attribute.SIGN]):
                priv.destroy()
                pub.destroy()
                raise SignerUnavailable(f"PKCS#11 token {self.token_label!r} did not honour the key template")
            lease.keys[key_id] = priv
            key_ref = make_key_ref(name, key_id)
            return Pkcs11Signer(self, key_ref, name, key_id, _public_from(pub))

        signer = self._run(create, "create a key")
        with self._lock:
            self._signers[signer.key_ref] = signer
        return signer

    def get_signer(self, key_ref: str) -> Pkcs11Signer:
        label, key_id = parse_key_ref(key_ref)
        with self._lock:
            cached = self._signers.get(key_ref)
        if cached is not None:
            return cached

        def find(lease: _Lease) -> Pkcs11Signer:
            priv = self._find_private(lease, key_id, label)
            # exhaust the search: an unfinished one keeps an operation active on the session
            pubs = [
                o
                for o in lease.session.get_objects({Attribute.CLASS: ObjectClass.PUBLIC_KEY, Attribute.ID: key_id})
                if isinstance(o, pkcs11.PublicKey)
            ]
            public = _public_from(pubs[0]) if pubs else _public_from_private(priv)
            return Pkcs11Signer(self, key_ref, label, key_id, public)

        signer = self._run_refreshing(find, "find a key")
        with self._lock:
            return self._signers.setdefault(key_ref, signer)

    def disable_key(self, key_ref: str) -> None:
        label, key_id = parse_key_ref(key_ref)

        def destroy(lease: _Lease) -> None:
            lease.keys.pop(key_id, None)
            found = list(lease.session.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.ID: key_id}))
            found = [o for o in found if isinstance(o, pkcs11.PrivateKey) and o.label == label]
            if not found:
                raise CaKeyNotFound("the CA key does not exist or is already disabled", key_ref=key_ref)
            for obj in found:
                obj.destroy()

        with self._lock:
            self._signers.pop(key_ref, None)
        self._run(destroy, "disable a key")

    def verify_key(self, key_ref: str) -> Pkcs11Signer:
        raise InvalidRequest(
            "Bring-your-own-key needs the Key Vault signer backend; this deployment signs with a PKCS#11 HSM."
        )

    def health(self) -> None:
        def probe(lease: _Lease) -> None:
            lease.session.generate_random(64)

        self._run(probe, "answer a health check")

    # ---- extras ---------------------------------------------------------------------------------

    @property
    def mechanisms(self) -> frozenset:
        return self._mechanisms

    def close(self) -> None:
        """Close this store's sessions (the process-wide login stays). The store is unusable after."""
        with self._gate.exclusive(self._budget()), self._lock:
            self._closed = True
            self._drain_locked()
        self._pool.wake_waiters()

    def __enter__(self) -> Pkcs11KeyStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- signing --------------------------------------------------------------------------------

    def _sign(self, signer: Pkcs11Signer, data: bytes, algorithm: hashes.HashAlgorithm | Prehashed) -> bytes:
        is_ec = isinstance(signer.public_key(), ec.EllipticCurvePublicKey)
        digest, alg = split_hash(data, algorithm)
        if is_ec:
            mech, payload = Mechanism.ECDSA, digest
        elif _RSA_HASH_MECHS[alg.name] in self._mechanisms and not isinstance(algorithm, Prehashed):
            mech, payload = _RSA_HASH_MECHS[alg.name], data
        else:
            mech, payload = Mechanism.RSA_PKCS, _DIGEST_INFO[alg.name] + digest

        def sign(lease: _Lease) -> bytes:
            for attempt in (0, 1):
                priv = lease.keys.get(signer.key_id)
                if priv is None:
                    priv = self._find_private(lease, signer.key_id, signer.label)
                if not isinstance(priv, SignMixin):  # python-pkcs11 gives a key that may sign this mixin
                    raise CaKeyNotFound(f"CA key {signer.label!r} may not sign", key_ref=signer.key_ref)
                try:
                    return priv.sign(payload, mechanism=mech)
                except _STALE_KEY:
                    # destroyed (disabled) by another session/store, or a handle from before a reopen
                    lease.keys.pop(signer.key_id, None)
                    if attempt:
                        raise
                except px.PKCS11Error as e:
                    if _rv(e) == _CKR_KEY_FUNCTION_NOT_PERMITTED:
                        self._forget_signer(signer.key_ref)
                        raise CaKeyNotFound("the CA key is not allowed to sign", key_ref=signer.key_ref) from None
                    raise
            raise AssertionError("unreachable")

        try:
            raw = self._run_refreshing(sign, "sign")
        except CaKeyNotFound:
            self._forget_signer(signer.key_ref)
            raise
        if not is_ec:
            return raw
        half = len(raw) // 2
        return encode_dss_signature(int.from_bytes(raw[:half], "big"), int.from_bytes(raw[half:], "big"))

    def _forget_signer(self, key_ref: str) -> None:
        with self._lock:
            self._signers.pop(key_ref, None)

    def _find_private(self, lease: _Lease, key_id: bytes, label: str) -> pkcs11.PrivateKey:
        found = [
            o
            for o in lease.session.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.ID: key_id})
            if isinstance(o, pkcs11.PrivateKey) and o.label == label
        ]
        if not found:
            raise _KeyMissing(
                f"CA key {label!r} is not in PKCS#11 token {self.token_label!r} (missing or disabled)",
                key_ref=make_key_ref(label, key_id),
            )
        priv = found[0]
        if not priv[Attribute.SIGN]:
            raise CaKeyNotFound(f"CA key {label!r} may not sign", key_ref=make_key_ref(label, key_id))
        lease.keys[key_id] = priv
        return priv

    # ---- the session pool -----------------------------------------------------------------------
    # Lock order: the module's gate, then self._lock. A thread holding a lease holds the gate shared;
    # a thread holding self._lock never waits for the gate.

    def _budget(self) -> float:
        """Seconds a call may wait: the store's own bound, cut to what is left of the API request."""
        left = deadline.remaining()
        return self._acquire_timeout if left is None else max(0.0, min(self._acquire_timeout, left))

    def _run(self, op: Callable[[_Lease], T], what: str) -> T:
        """Run op(lease) on a pooled session; reopen the token once if the session is dead."""
        last: BaseException | None = None
        for attempt in (0, 1):
            lease = self._acquire()
            dead = False
            try:
                with _call_lock(self._lib_path):
                    return op(lease)
            except px.PKCS11Error as e:
                if not _is_dead(e):
                    raise SignerUnavailable(
                        f"PKCS#11 token {self.token_label!r} failed to {what}: {_describe(e)}"
                    ) from None
                dead, last = True, e
            finally:
                self._release(lease, dead)
            if attempt == 0:
                log.warning("PKCS#11 token %r: %s; reopening sessions", self.token_label, _describe(last))
                self._reopen(lease.generation)
        raise SignerUnavailable(
            f"PKCS#11 token {self.token_label!r} failed to {what} after reopening its sessions: {_describe(last)}"
        )

    def _acquire(self) -> _Lease:
        """A pooled session of the store's current generation, with the module's gate held shared."""
        while True:
            with self._lock:
                if self._closed:
                    raise SignerUnavailable(f"PKCS#11 key store for token {self.token_label!r} is closed")
                broken, generation = self._broken, self._generation
            if broken is not None:
                self._reopen(generation)  # SignerUnavailable while the token stays unreachable
            lease = self._pool.get(self._budget())
            if lease is None:
                with self._lock:
                    broken = self._broken or ("the key store is closed" if self._closed else None)
                if broken is not None:
                    raise SignerUnavailable(f"PKCS#11 token {self.token_label!r} is not available: {broken}")
                raise SignerUnavailable(
                    f"all {self._size} PKCS#11 sessions to token {self.token_label!r} stayed busy "
                    f"for {self._budget():g} s"
                )
            try:
                epoch = self._gate.enter(self._budget())
            except SignerUnavailable:
                self._pool.put(lease)  # not used: whoever takes it next checks it as below
                raise
            with self._lock:
                if lease.generation == self._generation and lease.epoch == epoch:
                    return lease
            # the sessions were renewed, or the module re-initialised, while this one waited
            if lease.epoch == epoch:
                _close_quietly(lease.session, self._lib_path)
            self._gate.leave()
            if lease.epoch != epoch:
                self._reopen(lease.generation)  # re-initialised behind this store's back

    def _release(self, lease: _Lease, dead: bool = False) -> None:
        try:
            if not dead:
                with self._lock:
                    if lease.generation == self._generation and not self._closed:
                        self._pool.put(lease)
                        return
            _close_quietly(lease.session, self._lib_path)
        finally:
            self._gate.leave()

    def _reopen(self, seen_generation: int) -> None:
        """New sessions (find the token by label again, log in); if the token will not open, the
        module re-initialised first (at most once per RECOVER_INTERVAL). Alone in the module while
        it runs; returns at once if another thread renewed the sessions since `seen_generation`.
        SignerUnavailable while the token stays unavailable."""
        with self._gate.exclusive(self._budget()), self._lock:
            if self._closed:
                raise SignerUnavailable(f"PKCS#11 key store for token {self.token_label!r} is closed")
            if self._generation != seen_generation and self._broken is None:
                return
            self._drain_locked()
            _forget_login(self._lib_path, self._token)
            try:
                self._open_locked()
            except SignerUnavailable as e:
                now = time.monotonic()
                if now - self._last_recovery < RECOVER_INTERVAL:
                    raise
                # After the token went away and came back, SoftHSM shows it only to a module
                # initialised again: C_Finalize, C_Initialize (nobody holds a session: see the gate).
                self._last_recovery = now
                log.warning("PKCS#11 token %r: %s; reinitialising the module", self.token_label, e.message)
                self._drain_locked()
                reinitialize_exclusive(self.module_path)
                try:
                    self._open_locked()
                except SignerUnavailable as again:
                    log.warning("PKCS#11 token %r still unavailable: %s", self.token_label, again.message)
                    raise

    def _run_refreshing(self, op: Callable[[_Lease], T], what: str) -> T:
        """_run, and once more after renewing the sessions if a key object looked missing."""
        generation = self._generation
        try:
            return self._run(op, what)
        except _KeyMissing:
            if not self._refresh(generation):
                raise
            return self._run(op, what)

    def _refresh(self, seen_generation: int) -> bool:
        """A key object is missing: new sessions (and, if the token will not open, a reinitialised
        module) show whether it is really gone or the token's view was stale. At most once per
        RECOVER_INTERVAL; True if the sessions were renewed."""
        with self._lock:
            if self._generation != seen_generation:
                return True  # renewed meanwhile: look again
            now = time.monotonic()
            if self._closed or now - self._last_refresh < RECOVER_INTERVAL:
                return False
            self._last_refresh = now
        try:
            self._reopen(seen_generation)
        except SignerUnavailable:
            return False
        return True

    def _drain_locked(self) -> None:
        """Under the exclusive hold: close the pooled sessions (those of the module's current epoch;
        earlier ones died with C_Finalize) and start a new generation."""
        self._generation += 1
        for lease in self._pool.drain():
            if lease.epoch == self._gate.epoch:
                _close_quietly(lease.session, self._lib_path)

    def _open_locked(self) -> None:
        """Find the token by label, log in, fill the pool. SignerUnavailable if impossible."""
        label = self.token_label
        try:
            lib = load_library(self.module_path)
            with _call_lock(self._lib_path):
                try:
                    token = lib.get_token(token_label=label)
                except px.NoSuchToken:
                    raise SignerUnavailable(f"no PKCS#11 token labelled {label!r} in {self.module_path}") from None
                except px.MultipleTokensReturned:
                    raise SignerUnavailable(f"more than one PKCS#11 token is labelled {label!r}") from None
                _ensure_login(self._lib_path, token, self._pin)
                mechanisms = frozenset(token.slot.get_mechanisms())
                if Mechanism.ECDSA not in mechanisms and Mechanism.RSA_PKCS not in mechanisms:
                    raise SignerUnavailable(f"PKCS#11 token {label!r} offers neither CKM_ECDSA nor CKM_RSA_PKCS")
                leases: list[_Lease] = []
                try:
                    for _ in range(self._size):
                        leases.append(_Lease(token.open(rw=True), self._generation, self._gate.epoch))
                except BaseException:
                    for lease in leases:
                        try:
                            lease.session.close()
                        except Exception:
                            pass
                    raise
        except SignerUnavailable as e:
            self._broken = e.message
            self._pool.wake_waiters()
            raise
        except px.PKCS11Error as e:
            self._broken = _describe(e)
            self._pool.wake_waiters()
            raise SignerUnavailable(f"PKCS#11 token {label!r} is not available: {_describe(e)}") from None
        self._token = token
        self._mechanisms = mechanisms
        for lease in leases:
            self._pool.put(lease)
        self._broken = None


# ---- public keys out of PKCS#11 objects -------------------------------------------------------------


def _public_from(obj: pkcs11.PublicKey) -> CaPublicKey:
    if obj.key_type == KeyType.EC:
        from asn1crypto.core import OctetString

        params = obj[Attribute.EC_PARAMS]
        point = obj[Attribute.EC_POINT]
        try:  # CKA_EC_POINT is a DER OCTET STRING holding the point (some tokens give it raw)
            point = bytes(OctetString.load(point).native)
        except Exception:
            pass
        curve = _curve_from_params(params)
        return ec.EllipticCurvePublicKey.from_encoded_point(curve, point)
    if obj.key_type == KeyType.RSA:
        n = int.from_bytes(obj[Attribute.MODULUS], "big")
        e = int.from_bytes(obj[Attribute.PUBLIC_EXPONENT], "big")
        return rsa.RSAPublicNumbers(e, n).public_key()
    raise SignerUnavailable(f"unsupported PKCS#11 key type {obj.key_type!r}")


def _public_from_private(priv: pkcs11.PrivateKey) -> CaPublicKey:
    if priv.key_type == KeyType.RSA:
        n = int.from_bytes(priv[Attribute.MODULUS], "big")
        e = int.from_bytes(priv[Attribute.PUBLIC_EXPONENT], "big")
        return rsa.RSAPublicNumbers(e, n).public_key()
    raise CaKeyNotFound(f"the public half of EC key {priv.label!r} is missing from the token")


def _curve_from_params(params: bytes) -> ec.EllipticCurve:
    from asn1crypto.keys import ECDomainParameters

    dp = ECDomainParameters.load(params)
    if dp.name != "named":
        raise SignerUnavailable("EC key with explicit (unnamed) curve parameters")
    name = dp.chosen.native  # e.g. "secp256r1"
    for kind, cname in _CURVE_NAMES.items():
        if cname == name:
            return EC_CURVES[kind]
    raise SignerUnavailable(f"unsupported EC curve {name}")
