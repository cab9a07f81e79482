"""Contract test for CA key stores: the same cases on every backend, checked by independent verifiers.

Backends: `pkcs11` (SoftHSM2 token, real) and `keyvault` (the real azure-keyvault-keys SDK against
the HTTPS Key Vault stand-in in tests/standins/keyvault.py). Another backend adds one name to
BACKENDS and one `<name>_backend` fixture returning a `Backend`.

Independent checks: cryptography's public-key verify, and OpenSSH's own `ssh-keygen -L`, which
parses a certificate AND verifies its CA signature (a flipped signature bit makes it exit 1 with
"incorrect signature"). The real sshd login with such a certificate is covered in tests/e2e.
"""

from __future__ import annotations

import base64
import os
import secrets
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.realparts import unavailable
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from cryptography.hazmat.primitives.serialization import ssh

from functions.core.errors import CaKeyNotFound, SignerUnavailable
from functions.signing.base import KeyStore, Signer, as_private_key, ssh_fingerprint, ssh_public_key_line

BACKENDS = ["pkcs11", "keyvault"]
KINDS = ["EC-P256", "EC-P384", "RSA-3072"]
EXPECTED_SIG_ALG = {"EC-P256": "ecdsa-sha2-nistp256", "EC-P384": "ecdsa-sha2-nistp384", "RSA-3072": "rsa-sha2-512"}


_unavailable = unavailable


@dataclass
class Backend:
    name: str
    store: KeyStore
    new_store: Callable[[], KeyStore]  # a fresh instance over the same keys
    unknown_ref: str  # well-formed, names no key
    assert_not_extractable: Callable[[Signer], None]


def verify(public_key, signature: bytes, data: bytes, algorithm=hashes.SHA256()) -> None:
    """Independent check with cryptography (raises InvalidSignature)."""
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        public_key.verify(signature, data, ec.ECDSA(algorithm))
    else:
        assert isinstance(public_key, rsa.RSAPublicKey)
        public_key.verify(signature, data, padding.PKCS1v15(), algorithm)


def unique_name(prefix: str = "ca") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


# ---- backends -----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def hsm_token(request, tmp_path_factory):
    """The SoftHSM token of this test process.

    SoftHSM reads its config once per process, so when the suite provides a session-wide token
    (`softhsm_token` in tests/conftest.py) this module uses that one; run alone, it makes its own.
    """
    try:
        return request.getfixturevalue("softhsm_token")
    except pytest.FixtureLookupError:
        pass
    from devstack.proc import StandInError
    from devstack.softhsm import ensure_token

    try:
        return ensure_token(tmp_path_factory.mktemp("softhsm-state"))
    except StandInError as e:
        _unavailable(str(e))


@pytest.fixture(scope="session")
def pkcs11_backend(hsm_token) -> Iterator[Backend]:
    from pkcs11 import Attribute, KeyType, ObjectClass
    from pkcs11 import exceptions as px

    from functions.signing.pkcs11 import Pkcs11KeyStore, load_library, parse_key_ref

    tok = hsm_token

    def new_store() -> Pkcs11KeyStore:
        return Pkcs11KeyStore(tok.module_path, tok.label, tok.pin, sessions=4)

    try:
        store = new_store()
    except SignerUnavailable as e:
        _unavailable(f"SoftHSM token cannot be opened: {e.message}")

    def assert_not_extractable(signer: Signer) -> None:
        """Read the key with raw PKCS#11, as an attacker holding the PIN would try."""
        label, key_id = parse_key_ref(signer.key_ref)
        token = load_library(tok.module_path).get_token(token_label=tok.label)
        with token.open(rw=False) as session:  # the process is logged in (login is per application)
            priv = session.get_key(object_class=ObjectClass.PRIVATE_KEY, id=key_id)
            assert priv.label == label
            attrs = priv.get_attributes(
                [Attribute.SENSITIVE, Attribute.EXTRACTABLE, Attribute.ALWAYS_SENSITIVE,
                 Attribute.NEVER_EXTRACTABLE, Attribute.SIGN, Attribute.DECRYPT, Attribute.DERIVE]
            )  # fmt: skip
            assert attrs[Attribute.SENSITIVE] is True
            assert attrs[Attribute.EXTRACTABLE] is False
            assert attrs[Attribute.ALWAYS_SENSITIVE] is True
            assert attrs[Attribute.NEVER_EXTRACTABLE] is True
            assert attrs[Attribute.SIGN] is True
            assert not attrs[Attribute.DECRYPT] and not attrs[Attribute.DERIVE]
            secret_attrs = (
                [Attribute.VALUE]
                if priv.key_type == KeyType.EC
                else [Attribute.PRIVATE_EXPONENT, Attribute.PRIME_1, Attribute.PRIME_2]
            )
            for attr in secret_attrs:
                with pytest.raises(px.AttributeSensitive):
                    priv[attr]
            with pytest.raises((px.AttributeReadOnly, px.AttributeValueInvalid, px.PKCS11Error)):
                priv[Attribute.EXTRACTABLE] = True
            with pytest.raises((px.AttributeReadOnly, px.AttributeValueInvalid, px.PKCS11Error)):
                priv[Attribute.SENSITIVE] = False
            # wrapping (exporting under a key we know) is refused too
            with token.open(rw=True) as rw:
                wrapper = rw.generate_key(KeyType.AES, 256, store=False, template={Attribute.WRAP: True})
                wpriv = rw.get_key(object_class=ObjectClass.PRIVATE_KEY, id=key_id)
                with pytest.raises((px.KeyUnextractable, px.KeyNotWrappable, px.MechanismInvalid)):
                    wrapper.wrap_key(wpriv)
            assert priv[Attribute.EXTRACTABLE] is False

    yield Backend(
        name="pkcs11",
        store=store,
        new_store=new_store,
        unknown_ref=f"pkcs11:no-such-key:{secrets.token_hex(16)}",
        assert_not_extractable=assert_not_extractable,
    )
    store.close()


@pytest.fixture(scope="session")
def keyvault_standin() -> Iterator:
    from tests.standins.keyvault import KeyVaultStandIn

    try:
        kv = KeyVaultStandIn().start()
    except (ImportError, OSError) as e:
        _unavailable(f"Key Vault stand-in cannot start: {e}")
    yield kv
    kv.stop()


@pytest.fixture(scope="session")
def keyvault_backend(keyvault_standin) -> Iterator[Backend]:
    from azure.keyvault.keys import KeyClient

    from functions.signing.keyvault import KeyId, KeyVaultKeyStore
    from tests.standins.keyvault import StaticTokenCredential

    kv = keyvault_standin
    cred = StaticTokenCredential(kv.token)
    stores: list[KeyVaultKeyStore] = []

    def new_store() -> KeyVaultKeyStore:
        store = KeyVaultKeyStore(kv.url, cred, connection_verify=kv.ca_path, verify_challenge_resource=False)
        stores.append(store)
        return store

    admin = KeyClient(kv.url, cred, connection_verify=kv.ca_path, verify_challenge_resource=False)

    def assert_not_extractable(signer: Signer) -> None:
        """Read the key as an administrator of the vault would: public half only, HSM, sign/verify."""
        from azure.core.exceptions import HttpResponseError

        kid = KeyId.parse(signer.key_ref)
        key = admin.get_key(kid.name, kid.version)
        assert str(key.key_type.value if hasattr(key.key_type, "value") else key.key_type).endswith("-HSM")
        assert sorted(str(getattr(o, "value", o)) for o in key.key_operations) == ["sign", "verify"]
        assert key.properties.exportable in (False, None)
        for secret in ("d", "p", "q", "dp", "dq", "qi", "k"):
            assert not getattr(key.key, secret, None), f"the vault returned private member {secret!r}"
        with pytest.raises(HttpResponseError):  # no export route for a non-exportable key
            admin.release_key(kid.name, "attestation-token", version=kid.version)

    store = new_store()
    yield Backend(
        name="keyvault",
        store=store,
        new_store=new_store,
        unknown_ref=f"{kv.url}/keys/no-such-key/{secrets.token_hex(16)}",
        assert_not_extractable=assert_not_extractable,
    )
    admin.close()
    for s in stores:
        s.close()


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request) -> Backend:
    return request.getfixturevalue(f"{request.param}_backend")


@pytest.fixture(scope="module", params=KINDS)
def kind(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def signer(backend: Backend, kind: str) -> Signer:
    return backend.store.create_key(unique_name(kind.lower()), kind)


# ---- contract cases -----------------------------------------------------------------------------


def test_health(backend: Backend) -> None:
    backend.store.health()


def test_create_sign_verify(signer: Signer, kind: str) -> None:
    pub = signer.public_key()
    assert pub is signer.public_key()  # cached
    if kind.startswith("EC"):
        assert isinstance(pub, ec.EllipticCurvePublicKey)
        assert pub.curve.name == {"EC-P256": "secp256r1", "EC-P384": "secp384r1"}[kind]
    else:
        assert isinstance(pub, rsa.RSAPublicKey) and pub.key_size == 3072
    data = b"ezssh contract " + secrets.token_bytes(64)
    for alg in (hashes.SHA256(), hashes.SHA384(), hashes.SHA512()):
        sig = signer.sign(data, alg)
        verify(pub, sig, data, alg)
        with pytest.raises(InvalidSignature):
            verify(pub, sig, data + b"!", alg)
    # a prehashed digest gives a signature over the same message
    digest = hashes.Hash(hashes.SHA256())
    digest.update(data)
    verify(pub, signer.sign(digest.finalize(), Prehashed(hashes.SHA256())), data)


def test_as_private_key_adapter(signer: Signer) -> None:
    key = as_private_key(signer)
    assert isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey))
    assert key.public_key() == signer.public_key()
    data = b"adapter"
    if isinstance(key, ec.EllipticCurvePrivateKey):
        verify(signer.public_key(), key.sign(data, ec.ECDSA(hashes.SHA384())), data, hashes.SHA384())
        with pytest.raises((TypeError, NotImplementedError)):
            key.exchange(ec.ECDH(), ec.generate_private_key(key.curve).public_key())
    else:
        verify(signer.public_key(), key.sign(data, padding.PKCS1v15(), hashes.SHA512()), data, hashes.SHA512())
        with pytest.raises(TypeError):
            key.sign(data, padding.PSS(padding.MGF1(hashes.SHA256()), 32), hashes.SHA256())
        with pytest.raises((TypeError, NotImplementedError)):
            key.decrypt(b"x" * 384, padding.PKCS1v15())
    with pytest.raises((TypeError, NotImplementedError)):
        key.private_numbers()
    with pytest.raises((TypeError, NotImplementedError)):
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )


def _keygen(*args: str) -> subprocess.CompletedProcess:
    if shutil.which("ssh-keygen") is None:
        _unavailable("ssh-keygen is not installed: apt-get install openssh-client")
    return subprocess.run(["ssh-keygen", *args], capture_output=True, text=True, timeout=30)


def _user_cert(signer: Signer) -> ssh.SSHCertificate:
    user = ed25519.Ed25519PrivateKey.generate().public_key()
    now = int(time.time())
    return (
        ssh.SSHCertificateBuilder()
        .public_key(user)
        .serial(secrets.randbits(63) or 1)
        .type(ssh.SSHCertificateType.USER)
        .key_id(b"ezssh/contract/test/alice@example.com")
        .valid_principals([b"alice"])
        .valid_after(now - 60)
        .valid_before(now + 300)
        .add_extension(b"permit-pty", b"")
        .sign(as_private_key(signer))
    )


def test_ssh_certificate_verified_by_openssh(signer: Signer, kind: str, tmp_path: Path) -> None:
    cert = _user_cert(signer)
    ca_pub = tmp_path / "ca.pub"
    ca_pub.write_text(ssh_public_key_line(signer, "ezssh-contract") + "\n")
    cert_path = tmp_path / "id-cert.pub"
    cert_path.write_bytes(cert.public_bytes() + b"\n")

    # the CA fingerprint as OpenSSH computes it, and ours
    lf = _keygen("-lf", str(ca_pub))
    assert lf.returncode == 0, lf.stderr
    ca_fp = lf.stdout.split()[1]
    assert ca_fp == ssh_fingerprint(signer.public_key())

    # ssh-keygen -L parses the certificate and checks its signature
    out = _keygen("-L", "-f", str(cert_path))
    assert out.returncode == 0, out.stderr
    assert f"Signing CA: {'RSA' if kind.startswith('RSA') else 'ECDSA'} {ca_fp} (using {EXPECTED_SIG_ALG[kind]})" in out.stdout
    assert "alice" in out.stdout and "ezssh/contract/test/alice@example.com" in out.stdout

    # a second independent verifier: cryptography
    loaded = ssh.load_ssh_public_identity(cert.public_bytes())
    assert isinstance(loaded, ssh.SSHCertificate)
    loaded.verify_cert_signature()
    assert loaded.signature_key() == signer.public_key()

    # one flipped bit in the signature: both verifiers refuse it
    cert_type, b64 = cert.public_bytes().split()[:2]
    blob = bytearray(base64.b64decode(b64))
    blob[-1] ^= 0x01  # last byte of the signature blob
    bad = cert_type + b" " + base64.b64encode(bytes(blob))
    bad_path = tmp_path / "bad-cert.pub"
    bad_path.write_bytes(bad + b"\n")
    out = _keygen("-L", "-f", str(bad_path))
    assert out.returncode != 0
    # OpenSSH 9.2 says "incorrect signature" for ECDSA and "error in libcrypto" for RSA
    assert "invalid key" in out.stderr
    with pytest.raises(InvalidSignature):
        ssh.load_ssh_public_identity(bad).verify_cert_signature()


def test_key_is_not_extractable(backend: Backend, signer: Signer) -> None:
    backend.assert_not_extractable(signer)


def test_found_again_by_a_fresh_store(backend: Backend, signer: Signer) -> None:
    other = backend.new_store()
    try:
        again = other.get_signer(signer.key_ref)
        assert again.key_ref == signer.key_ref
        assert again.public_key() == signer.public_key()
        data = b"fresh instance"
        verify(signer.public_key(), again.sign(data, hashes.SHA256()), data)
    finally:
        getattr(other, "close", lambda: None)()


def test_unknown_key_ref(backend: Backend) -> None:
    with pytest.raises(CaKeyNotFound):
        backend.store.get_signer(backend.unknown_ref)
    with pytest.raises(CaKeyNotFound):
        backend.store.get_signer("not-a-key-ref")
    with pytest.raises(CaKeyNotFound):
        backend.store.get_signer("")


def test_disabled_key_signs_nothing(backend: Backend, kind: str) -> None:
    store = backend.store
    signer = store.create_key(unique_name("disable"), kind)
    other = backend.new_store()
    try:
        seen_elsewhere = other.get_signer(signer.key_ref)  # handed out before the disable
        verify(signer.public_key(), seen_elsewhere.sign(b"before", hashes.SHA256()), b"before")

        store.disable_key(signer.key_ref)

        with pytest.raises(CaKeyNotFound):
            store.get_signer(signer.key_ref)
        with pytest.raises(CaKeyNotFound):
            signer.sign(b"after", hashes.SHA256())
        with pytest.raises(CaKeyNotFound):
            seen_elsewhere.sign(b"after", hashes.SHA256())
        with pytest.raises(CaKeyNotFound):
            other.get_signer(signer.key_ref)
        with pytest.raises(CaKeyNotFound):
            backend.new_store().get_signer(signer.key_ref)
        with pytest.raises(CaKeyNotFound):
            store.disable_key(signer.key_ref)  # already disabled
    finally:
        getattr(other, "close", lambda: None)()


def test_concurrent_signing(signer: Signer) -> None:
    pub = signer.public_key()
    n, threads = 200, 16
    messages = [f"concurrent {i} ".encode() + secrets.token_bytes(16) for i in range(n)]
    active = 0
    peak = 0
    lock = threading.Lock()

    def one(msg: bytes) -> bytes:
        nonlocal active, peak
        with lock:
            active += 1
            peak = max(peak, active)
        try:
            return signer.sign(msg, hashes.SHA256())
        finally:
            with lock:
                active -= 1

    with ThreadPoolExecutor(max_workers=threads) as pool:
        sigs = list(pool.map(one, messages))
    assert len(sigs) == n
    for msg, sig in zip(messages, sigs, strict=True):
        verify(pub, sig, msg)
    assert peak > 1  # the threads really overlapped


def test_concurrent_certificates(signer: Signer) -> None:
    """The path the API takes: many threads each building a certificate through the adapter."""
    with ThreadPoolExecutor(max_workers=16) as pool:
        certs = list(pool.map(lambda _: _user_cert(signer), range(32)))
    for cert in certs:
        cert.verify_cert_signature()
        assert cert.signature_key() == signer.public_key()


def test_create_key_refuses_bad_input(backend: Backend) -> None:
    with pytest.raises(ValueError):
        backend.store.create_key(unique_name(), "DSA-1024")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        backend.store.create_key("bad name with spaces")


# ---- PKCS#11 specifics -----------------------------------------------------------------------------


def test_pkcs11_key_ref_format(pkcs11_backend: Backend) -> None:
    name = unique_name("ref")
    s = pkcs11_backend.store.create_key(name)
    prefix, label, id_hex = s.key_ref.split(":")
    assert (prefix, label) == ("pkcs11", name)
    assert len(bytes.fromhex(id_hex)) == 16
    assert isinstance(s.public_key(), ec.EllipticCurvePublicKey)  # EC-P256 is the default
    assert s.public_key().curve.name == "secp256r1"


def test_pkcs11_missing_token_or_module_is_signer_unavailable(hsm_token) -> None:
    from functions.signing.pkcs11 import Pkcs11KeyStore

    with pytest.raises(SignerUnavailable, match="no PKCS#11 token labelled 'no-such-token'"):
        Pkcs11KeyStore(hsm_token.module_path, "no-such-token", hsm_token.pin)
    with pytest.raises(SignerUnavailable, match="does not exist"):
        Pkcs11KeyStore("/nonexistent/libpkcs11.so", hsm_token.label, hsm_token.pin)


# python-pkcs11 reports a failed C_FindObjectsFinal on a dead session as an "unraisable" exception
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_pkcs11_recovers_from_dead_sessions(pkcs11_backend: Backend) -> None:
    """Every pooled session closed behind the store's back: the next sign reopens and works."""
    from functions.signing.pkcs11 import Pkcs11KeyStore

    store = pkcs11_backend.new_store()
    assert isinstance(store, Pkcs11KeyStore)
    try:
        s = store.create_key(unique_name("recover"))
        verify(s.public_key(), s.sign(b"one", hashes.SHA256()), b"one")
        leases = store._pool.drain()
        assert leases
        for lease in leases:
            lease.session.close()  # C_CloseSession: the handles are dead now
            store._pool.put(lease)
        verify(s.public_key(), s.sign(b"two", hashes.SHA256()), b"two")
        store.health()
    finally:
        store.close()


def test_pkcs11_recovers_after_library_reinitialised(pkcs11_backend: Backend) -> None:
    """C_Finalize + C_Initialize kills every session and the login: stores re-login and go on."""
    from functions.signing.pkcs11 import reinitialize_library

    store = pkcs11_backend.store
    s = store.create_key(unique_name("reinit"), "EC-P384")
    reinitialize_library(store.module_path)
    verify(s.public_key(), s.sign(b"after reinit", hashes.SHA256()), b"after reinit")
    again = pkcs11_backend.new_store().get_signer(s.key_ref)
    verify(s.public_key(), again.sign(b"fresh", hashes.SHA256()), b"fresh")


def test_pkcs11_module_is_not_finalised_under_a_call_in_flight(pkcs11_backend: Backend) -> None:
    """C_Finalize frees every session: while one thread is inside a call on its session, a thread
    that re-initialises the module waits for it, and calls that come meanwhile wait too, bounded
    by their request's deadline (SignerUnavailable, never a crash or a PKCS#11 traceback)."""
    from functions import deadline
    from functions.signing.pkcs11 import reinitialize_library

    store = pkcs11_backend.new_store()
    s = store.create_key(unique_name("inflight"))
    inside, go_on, finalised = threading.Event(), threading.Event(), threading.Event()
    got: list = []

    def in_flight(lease):  # type: ignore[no-untyped-def]
        inside.set()
        go_on.wait(10)
        return lease.session.generate_random(64)  # the session it held all along still works

    holder = threading.Thread(target=lambda: got.append(store._run(in_flight, "hold a session")))
    holder.start()
    assert inside.wait(10)
    finaliser = threading.Thread(target=lambda: (reinitialize_library(store.module_path), finalised.set()))
    finaliser.start()
    try:
        assert not finalised.wait(0.5), "the module was finalised under a call in flight"
        t = time.monotonic()
        with deadline.within(0.3), pytest.raises(SignerUnavailable):
            s.sign(b"meanwhile", hashes.SHA256())  # a new call waits for the finaliser, not forever
        assert time.monotonic() - t < 2
    finally:
        go_on.set()
        holder.join(10)
        finaliser.join(10)
    assert finalised.is_set() and len(got) == 1 and len(got[0]) == 8
    verify(s.public_key(), s.sign(b"after", hashes.SHA256()), b"after")
    store.close()


def test_pkcs11_closed_store_is_unavailable(pkcs11_backend: Backend) -> None:
    store = pkcs11_backend.new_store()
    s = store.create_key(unique_name("closed"))
    store.close()
    with pytest.raises(SignerUnavailable, match="closed"):
        s.sign(b"x", hashes.SHA256())
    # closing one store logs nobody out: the shared store still signs
    verify(s.public_key(), pkcs11_backend.store.get_signer(s.key_ref).sign(b"y", hashes.SHA256()), b"y")


def test_ssh_fingerprint_matches_ssh_keygen_for_generated_key(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    p = tmp_path / "k.pub"
    p.write_text(ssh_public_key_line(key) + "\n")
    out = _keygen("-lf", str(p))
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[1] == ssh_fingerprint(key)


def test_pkcs11_wrong_pin_is_signer_unavailable(hsm_token) -> None:
    """In a fresh process (login is per process, so this one is already logged in)."""
    import sys

    code = (
        "from functions.signing.pkcs11 import Pkcs11KeyStore\n"
        "from functions.core.errors import SignerUnavailable\n"
        "try:\n"
        f"    Pkcs11KeyStore({hsm_token.module_path!r}, {hsm_token.label!r}, '0000')\n"
        "except SignerUnavailable as e:\n"
        "    print('unavailable:', e.message)\n"
    )
    env = {**os.environ, **hsm_token.env(), "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"unavailable: PKCS#11 token {hsm_token.label!r} rejected the PIN (PinIncorrect)"
    assert "Traceback" not in out.stderr
