"""Key Vault CA backend specifics, through the real azure-keyvault-keys SDK against the HTTPS stand-in.

The shared cases (create/sign/verify, disable, concurrency, ssh-keygen) run on this backend in
test_signer.py; this module checks what only Key Vault has: request counts, the bearer challenge,
throttling, error translation and bring-your-own-key.
"""

from __future__ import annotations

import secrets
import socket
import statistics
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.realparts import needs_tool
from azure.core.credentials import AccessToken
from azure.core.exceptions import ClientAuthenticationError
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.serialization import ssh

from functions.core.errors import CaKeyNotFound, Forbidden, InvalidRequest, SignerUnavailable
from functions.signing.base import as_private_key, ssh_public_key_line
from functions.signing.keyvault import KeyId, KeyVaultKeyStore, key_vault_name
from tests.standins.keyvault import KeyVaultStandIn, StaticTokenCredential


def _verify(pub, sig: bytes, data: bytes, alg=hashes.SHA256()) -> None:
    if isinstance(pub, ec.EllipticCurvePublicKey):
        pub.verify(sig, data, ec.ECDSA(alg))
    else:
        pub.verify(sig, data, padding.PKCS1v15(), alg)


def _name(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(6)}"


@pytest.fixture(scope="module")
def kv() -> Iterator[KeyVaultStandIn]:
    standin = KeyVaultStandIn().start()
    yield standin
    standin.stop()


@pytest.fixture(scope="module")
def cred(kv: KeyVaultStandIn) -> StaticTokenCredential:
    return StaticTokenCredential(kv.token)


@pytest.fixture
def make_store(kv: KeyVaultStandIn, cred: StaticTokenCredential):
    stores: list[KeyVaultKeyStore] = []

    def make(url: str | None = None, credential=None, **kwargs) -> KeyVaultKeyStore:
        kwargs.setdefault("connection_verify", kv.ca_path)
        kwargs.setdefault("verify_challenge_resource", False)
        store = KeyVaultKeyStore(url or kv.url, credential or cred, **kwargs)
        stores.append(store)
        return store

    yield make
    for s in stores:
        s.close()
    kv.allow()  # undo any deny() a test left


@pytest.fixture
def store(make_store) -> KeyVaultKeyStore:
    return make_store()


def _cert(signer, principal: bytes = b"alice") -> ssh.SSHCertificate:
    now = int(time.time())
    return (
        ssh.SSHCertificateBuilder()
        .public_key(ed25519.Ed25519PrivateKey.generate().public_key())
        .serial(secrets.randbits(63) or 1)
        .type(ssh.SSHCertificateType.USER)
        .key_id(b"ezssh/kv/test/" + principal)
        .valid_principals([principal])
        .valid_after(now - 60)
        .valid_before(now + 300)
        .sign(as_private_key(signer))
    )


# ---- request counts and latency -------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["EC-P256", "RSA-3072"])
def test_one_key_vault_request_per_certificate(kv: KeyVaultStandIn, store, make_store, kind: str) -> None:
    created = store.create_key(_name("count"), kind)

    # a fresh store (another worker): finding the key is one GET of that exact version
    other = make_store()
    before = len(kv.requests)
    signer = other.get_signer(created.key_ref)
    assert kv.requests[before:] == [("GET", f"/keys/{created.name}/{created.version}", True)]
    assert other.get_signer(created.key_ref) is signer  # cached: no request
    assert len(kv.requests) == before + 1

    # warm: every certificate is exactly one POST .../sign
    n = 20
    before = len(kv.requests)
    latencies = []
    for i in range(n):
        t = time.perf_counter()
        cert = _cert(signer, f"user{i}".encode())
        latencies.append(time.perf_counter() - t)
        cert.verify_cert_signature()
    sent = kv.requests[before:]
    assert len(sent) == n
    assert set(sent) == {("POST", f"/keys/{created.name}/{created.version}/sign", True)}
    print(f"\n{kind}: {n} certificates, {len(sent)} Key Vault requests; issuance through the stand-in "
          f"median {statistics.median(latencies) * 1000:.1f} ms, max {max(latencies) * 1000:.1f} ms")  # fmt: skip


def test_bearer_challenge_on_a_fresh_host(tmp_path: Path) -> None:
    """A new host:port (the SDK caches challenges per host:port): 401 + challenge, then the bearer."""
    fresh = KeyVaultStandIn(token="fresh-token").start()
    cred = StaticTokenCredential("fresh-token")
    store = KeyVaultKeyStore(fresh.url, cred, connection_verify=fresh.ca_path, verify_challenge_resource=False)
    try:
        signer = store.create_key(_name("challenge"))
        assert fresh.requests[:2] == [("POST", "/keys/" + signer.name + "/create", False),
                                      ("POST", "/keys/" + signer.name + "/create", True)]  # fmt: skip
        assert fresh.statuses[:2] == [401, 200]
        scopes, kwargs = cred.calls[0]
        assert scopes == ("https://vault.azure.net/.default",)
        assert kwargs.get("tenant_id") == "72f988bf-86f1-41af-91ab-2d7cd011db47"
        # the challenge is remembered: signing goes straight out with the token
        before = len(fresh.requests)
        _verify(signer.public_key(), signer.sign(b"x", hashes.SHA256()), b"x")
        assert fresh.requests[before:] == [("POST", f"/keys/{signer.name}/{signer.version}/sign", True)]
    finally:
        store.close()
        fresh.stop()


def test_a_rejected_token_is_signer_unavailable_not_a_traceback(kv: KeyVaultStandIn, store, make_store) -> None:
    signer = store.create_key(_name("token"))
    wrong = make_store(credential=StaticTokenCredential("not-the-token"))
    with pytest.raises(SignerUnavailable, match="rejected the service's access token"):
        wrong.get_signer(signer.key_ref)

    class Broken:
        def get_token(self, *scopes: str, **kwargs) -> AccessToken:
            raise ClientAuthenticationError("ManagedIdentityCredential: no identity endpoint")

    broken = make_store(credential=Broken())
    with pytest.raises(SignerUnavailable, match="could not get an access token .*no identity endpoint"):
        broken.get_signer(signer.key_ref)


# ---- throttling and outages ------------------------------------------------------------------------


def test_429_retry_after_is_honoured(kv: KeyVaultStandIn, store) -> None:
    signer = store.create_key(_name("throttle"))
    signer.sign(b"warm", hashes.SHA256())
    kv.fail_next_with(429, {"Retry-After": "1"})
    before = len(kv.requests)
    t = time.monotonic()
    sig = signer.sign(b"throttled once", hashes.SHA256())
    elapsed = time.monotonic() - t
    _verify(signer.public_key(), sig, b"throttled once")
    assert elapsed >= 0.95, elapsed
    assert elapsed < 5, elapsed
    sent = kv.requests[before:]
    assert len(sent) == 2 and sent[0] == sent[1]  # the sign, once more after the wait
    assert kv.statuses[-2:] == [429, 200]


def test_429_asking_for_too_long_a_wait_fails_fast(kv: KeyVaultStandIn, make_store) -> None:
    store = make_store(max_retry_after=2)
    signer = store.create_key(_name("throttle-long"))
    kv.fail_next_with(429, {"Retry-After": "30"})
    t = time.monotonic()
    with pytest.raises(SignerUnavailable, match="throttling.*retry after 30 s"):
        signer.sign(b"x", hashes.SHA256())
    assert time.monotonic() - t < 2
    _verify(signer.public_key(), signer.sign(b"y", hashes.SHA256()), b"y")  # and it recovers


def test_5xx_is_retried_then_signer_unavailable(kv: KeyVaultStandIn, make_store) -> None:
    store = make_store(retry_total=2, retry_backoff_factor=0.01)
    signer = store.create_key(_name("outage"))
    kv.fail_next_with(503)  # one blip: retried by the SDK's own policy
    _verify(signer.public_key(), signer.sign(b"blip", hashes.SHA256()), b"blip")
    # longer than the SDK's retries (1 + 2): the store tries once more with a new client, and the
    # vault is back by then
    kv.fail_next_with(503, times=3)
    before = len(kv.requests)
    _verify(signer.public_key(), signer.sign(b"back", hashes.SHA256()), b"back")
    assert _signs(kv.requests[before:]) == 4
    # an outage that outlasts that too is one clear SignerUnavailable: 2 x (1 + 2) tries, no more
    kv.fail_next_with(503, times=100)
    before = len(kv.requests)
    with pytest.raises(SignerUnavailable, match="HTTP 503") as e:
        signer.sign(b"down", hashes.SHA256())
    assert _signs(kv.requests[before:]) == 6
    assert "Traceback" not in e.value.message
    kv.clear_failures()


def test_an_outage_under_16_signers_swaps_the_client_once(kv: KeyVaultStandIn, make_store) -> None:
    """16 threads whose signs fail at once: one new client (one challenge, one token) for all of
    them, not one each; after the outage they all sign on it."""
    import threading

    cred = StaticTokenCredential(kv.token)  # its own: counts the token requests of this store's clients
    store = make_store(retry_total=0, credential=cred)
    signer = store.create_key(_name("herd"))
    _verify(signer.public_key(), signer.sign(b"warm", hashes.SHA256()), b"warm")
    gate = threading.Barrier(16)
    errors: list[BaseException] = []

    def sign(data: bytes) -> None:
        gate.wait(10)
        try:
            _verify(signer.public_key(), signer.sign(data, hashes.SHA256()), data)
        except Exception as e:  # noqa: BLE001 - collected for the assertion
            errors.append(e)

    def sixteen(data: bytes) -> None:
        threads = [threading.Thread(target=sign, args=(data + bytes([n]),)) for n in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)

    kv.fail_next_with(503, times=1000)
    before = len(cred.calls)
    sixteen(b"down")
    assert len(errors) == 16 and all(isinstance(e, SignerUnavailable) for e in errors)
    new_clients = len(cred.calls) - before  # each new client asks for a token once
    assert 1 <= new_clients <= 2, f"{new_clients} new clients for one outage"
    kv.clear_failures()
    errors.clear()
    before = len(cred.calls)
    sixteen(b"back")
    assert not errors
    assert len(cred.calls) == before  # all on the client that already has its token


def _signs(requests: list) -> int:
    """Signing attempts that reached the vault with a token (a new client first makes one
    unauthenticated request to learn the challenge)."""
    return sum(1 for r in requests if r.path.endswith("/sign") and r.has_auth)


def test_unreachable_vault_is_signer_unavailable(make_store, kv: KeyVaultStandIn) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nobody listens there
    store = make_store(f"https://127.0.0.1:{port}", retry_total=1, retry_backoff_factor=0.01)
    t = time.monotonic()
    with pytest.raises(SignerUnavailable, match=f"cannot reach https://127.0.0.1:{port}"):
        store.health()
    with pytest.raises(SignerUnavailable):
        store.get_signer(f"https://127.0.0.1:{port}/keys/k/{secrets.token_hex(16)}")
    assert time.monotonic() - t < 5


def test_health_is_one_cheap_request_unless_a_call_just_reached_the_vault(kv: KeyVaultStandIn, store,
                                                                            make_store) -> None:
    before = len(kv.requests)
    make_store().health()  # a worker that has not reached the vault yet asks it once
    assert [(r.method, r.path) for r in kv.requests[before:]] == [("GET", "/keys")]
    signer = store.create_key(_name("health"))
    signer.sign(b"probe", hashes.SHA256())
    before = len(kv.requests)
    store.health()  # the signature a moment ago showed the vault answers: no operation spent
    assert kv.requests[before:] == []
    kv.deny("sign")
    with pytest.raises(SignerUnavailable):
        signer.sign(b"again", hashes.SHA256())
    kv.deny("list")
    with pytest.raises(SignerUnavailable, match="lacks 'Key Vault Reader'"):
        store.health()  # a failure since: health asks the vault itself


# ---- disable, missing keys, missing permissions ------------------------------------------------------


def test_disable_then_sign_is_ca_key_not_found(kv: KeyVaultStandIn, store, make_store) -> None:
    signer = store.create_key(_name("disable"), "EC-P384")
    elsewhere = make_store().get_signer(signer.key_ref)
    store.disable_key(signer.key_ref)
    assert kv.requests[-1] == ("PATCH", f"/keys/{signer.name}/{signer.version}", True)
    with pytest.raises(CaKeyNotFound, match="disabled"):
        signer.sign(b"after", hashes.SHA256())
    with pytest.raises(CaKeyNotFound, match="disabled"):
        elsewhere.sign(b"after", hashes.SHA256())
    before = len(kv.requests)
    with pytest.raises(CaKeyNotFound):
        store.get_signer(signer.key_ref)  # the cached signer was dropped: Key Vault is asked again
    assert len(kv.requests) == before + 1


def test_missing_key_and_bad_refs(kv: KeyVaultStandIn, store) -> None:
    with pytest.raises(CaKeyNotFound, match="does not exist"):
        store.get_signer(f"{kv.url}/keys/nope/{secrets.token_hex(16)}")
    for bad in ("", "pkcs11:x:00", f"{kv.url}/keys/nope", "http://127.0.0.1/keys/a/b", f"{kv.url}/secrets/a/b"):
        with pytest.raises(CaKeyNotFound):
            store.get_signer(bad)
    with pytest.raises(CaKeyNotFound, match="not an Azure Key Vault"):
        store.get_signer(f"https://attacker.example/keys/a/{secrets.token_hex(16)}")


def test_missing_permissions_name_the_role(kv: KeyVaultStandIn, store, make_store) -> None:
    signer = store.create_key(_name("perm"))
    kv.deny("sign", signer.name)
    with pytest.raises(SignerUnavailable) as e:
        signer.sign(b"x", hashes.SHA256())
    assert e.value.message.startswith(f"the service's identity lacks 'Key Vault Crypto User' (sign) on {kv.url}")
    assert "keys/sign" in e.value.message and "ForbiddenByRbac" in e.value.message
    kv.deny("get", signer.name)
    with pytest.raises(SignerUnavailable, match=r"lacks 'Key Vault Reader' \(get\)"):
        make_store().get_signer(signer.key_ref)
    kv.deny("create")
    with pytest.raises(SignerUnavailable, match=r"lacks 'Key Vault Crypto Officer' \(create\)"):
        store.create_key(_name("perm"))


def test_names_are_mapped_to_key_vault_names(store) -> None:
    assert key_vault_name("policy.web_1") == "policy-web-1"
    signer = store.create_key(f"ca.{secrets.token_hex(4)}_x", "RSA-2048")
    assert KeyId.parse(signer.key_ref).name == signer.name and "." not in signer.name and "_" not in signer.name
    assert len(signer.version) == 32
    for bad in ("has space", "", "-leading", "x" * 65, "ü"):
        with pytest.raises(ValueError):
            store.create_key(bad)


# ---- bring your own key ------------------------------------------------------------------------------


@pytest.mark.parametrize(("kty", "crv", "size"), [("EC-HSM", "P-256", 0), ("EC-HSM", "P-521", 0), ("RSA-HSM", "", 3072)])
def test_verify_key_good(kv: KeyVaultStandIn, store, kty: str, crv: str, size: int) -> None:
    name = _name("byok")
    kid = kv.add_key(name, kty, crv=crv or "P-256", size=size or 3072, key_ops=["sign", "verify"])
    before = len(kv.requests)
    signer = store.verify_key(kid)
    assert [(r.method, r.path) for r in kv.requests[before:]] == [
        ("GET", f"/keys/{name}/{signer.version}"),
        ("POST", f"/keys/{name}/{signer.version}/sign"),
    ]
    assert signer.key_ref == kid
    _verify(signer.public_key(), signer.sign(b"adopted", hashes.SHA256()), b"adopted")
    assert store.get_signer(kid) is signer
    assert store.adopt_key(kid).key_ref == kid


def test_verify_key_resolves_an_unversioned_kid(kv: KeyVaultStandIn, store) -> None:
    name = _name("byok-latest")
    kv.add_key(name)
    latest = kv.add_key(name)
    assert store.verify_key(f"{kv.url}/keys/{name}").key_ref == latest


def test_verify_key_without_get_names_the_permission(kv: KeyVaultStandIn, store) -> None:
    name = _name("byok-noget")
    kid = kv.add_key(name)
    kv.deny("get", name)
    with pytest.raises(Forbidden) as e:
        store.verify_key(kid)
    msg = e.value.message
    assert "'Key Vault Reader' (get)" in msg and "keys/get" in msg and kv.url in msg


def test_verify_key_without_sign_names_the_permission(kv: KeyVaultStandIn, store) -> None:
    name = _name("byok-nosign")
    kid = kv.add_key(name, "RSA-HSM")
    kv.deny("sign", name)
    with pytest.raises(Forbidden) as e:
        store.verify_key(kid)
    msg = e.value.message
    assert "'Key Vault Crypto User' (sign)" in msg and "keys/sign" in msg and kv.url in msg
    with pytest.raises(KeyError):
        store._signers[kid]  # nothing was adopted


def test_verify_key_refuses_unusable_keys(kv: KeyVaultStandIn, store) -> None:
    disabled = kv.add_key(_name("byok-off"), enabled=False)
    with pytest.raises(InvalidRequest, match="disabled"):
        store.verify_key(disabled)
    no_sign = kv.add_key(_name("byok-ops"), "RSA-HSM", key_ops=["encrypt", "decrypt"])
    with pytest.raises(InvalidRequest, match=r"may not sign: its key_ops are \['encrypt', 'decrypt'\]"):
        store.verify_key(no_sign)
    software = kv.add_key(_name("byok-sw"), "EC")
    with pytest.raises(InvalidRequest, match="software-protected"):
        store.verify_key(software)
    with pytest.raises(InvalidRequest, match="there is no key"):
        store.verify_key(f"{kv.url}/keys/{_name('byok-none')}/{secrets.token_hex(16)}")
    for bad in ("not a url", "https://contoso.vault.azure.net/certificates/x/y", ""):
        with pytest.raises(InvalidRequest):
            store.verify_key(bad)
    # the service's token never goes to a host that is not Key Vault
    before = len(kv.requests)
    with pytest.raises(InvalidRequest, match="not an Azure Key Vault"):
        store.verify_key(f"https://evil.example/keys/k/{secrets.token_hex(16)}")
    assert len(kv.requests) == before


def test_software_keys_are_accepted_when_the_store_allows_them(kv: KeyVaultStandIn, make_store) -> None:
    store = make_store(hardware_protected=False)
    kid = kv.add_key(_name("byok-sw-ok"), "EC", crv="P-384")
    assert store.verify_key(kid).kind == "EC-P384"
    created = store.create_key(_name("sw"))
    assert created.key_type == "EC"


# ---- OpenSSH reads what the vault signed ----------------------------------------------------------------


@needs_tool("ssh-keygen")
@pytest.mark.parametrize("kind", ["EC-P256", "RSA-3072"])
def test_ssh_keygen_checks_a_certificate_signed_in_the_vault(store, make_store, kind: str, tmp_path: Path) -> None:
    key_ref = store.create_key(_name("sshcert"), kind).key_ref
    signer = make_store().get_signer(key_ref)
    cert = _cert(signer)
    (tmp_path / "id-cert.pub").write_bytes(cert.public_bytes() + b"\n")
    (tmp_path / "ca.pub").write_text(ssh_public_key_line(signer, "kv-ca") + "\n")
    fp = subprocess.run(["ssh-keygen", "-lf", str(tmp_path / "ca.pub")], capture_output=True, text=True, timeout=30)
    assert fp.returncode == 0, fp.stderr
    out = subprocess.run(["ssh-keygen", "-L", "-f", str(tmp_path / "id-cert.pub")],
                         capture_output=True, text=True, timeout=30)  # fmt: skip
    assert out.returncode == 0, out.stderr
    alg = "ecdsa-sha2-nistp256" if kind == "EC-P256" else "rsa-sha2-512"
    assert f"Signing CA: {'ECDSA' if kind.startswith('EC') else 'RSA'} {fp.stdout.split()[1]} (using {alg})" in out.stdout
    pub = signer.public_key()
    assert isinstance(pub, ec.EllipticCurvePublicKey if kind.startswith("EC") else rsa.RSAPublicKey)
