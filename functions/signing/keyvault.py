"""CA keys in Azure Key Vault or Managed HSM, through azure-keyvault-keys.

    store = KeyVaultKeyStore("https://ezssh-ca.vault.azure.net", DefaultAzureCredential(...))
    signer = store.create_key("policy-web", "EC-P256")  # key_ref = the versioned kid
    cert = SSHCertificateBuilder()....sign(as_private_key(store.get_signer(key_ref)))
    signer = store.verify_key("https://contoso.vault.azure.net/keys/ssh-ca/<version>")  # bring your own key

How it works
- key_ref is the key's VERSIONED kid (`https://<vault>/keys/<name>/<version>`), so a policy keeps
  signing with the exact key version it published, even after somebody adds a newer version.
- Names: the project-wide key-name rule (1-64 of A-Z a-z 0-9 . _ -, starting alphanumeric, the same
  as the PKCS#11 store) is checked, then '.' and '_' become '-' (Key Vault allows only
  ^[0-9a-zA-Z-]+$). Creating a name that exists adds a new VERSION of that Key Vault key; the older
  versions (and their key_refs) are untouched.
- Keys: EC P-256/P-384/P-521 or RSA 2048/3072/4096, `hardware_protected` (EC-HSM/RSA-HSM: Premium
  vault or Managed HSM), key_ops ["sign", "verify"] only. Key Vault never exports them.
- get_signer makes one `get_key` (name + version from the kid) and keeps a Signer per key_ref. The
  Signer holds the public key (built from the JWK) and a CryptographyClient made from the
  KeyVaultKey object itself, so the client needs no GET of its own: a sign is exactly ONE request
  (POST .../sign with the digest). Hashing is local.
- EC: Key Vault's ES256/ES384/ES512 each belong to one curve (P-256/P-384/P-521) and one digest
  length. The algorithm therefore follows the curve, and the digest is fitted to it the way ECDSA
  itself does (FIPS 186-4 6.4: only the leftmost bits of the hash up to the order's length count):
  a longer digest is cut to its leftmost bytes, a shorter one is left-padded with zero bytes (same
  integer). The signature is the same ECDSA signature over hash(data) either way. Key Vault answers
  raw r||s, which becomes DER. RSA: RS256/RS384/RS512 by hash, PKCS#1 v1.5.
- HTTP: one requests.Session per store shared by all its clients (connection reuse; proxy settings
  from the environment read once), TLS verified
  (`connection_verify` may name a CA bundle), connect/read timeouts, and azure-core's RetryPolicy
  with few retries and short backoff. A 429 (or 503) with Retry-After is retried after that many
  seconds, unless it asks for more than `max_retry_after` (then the caller gets SignerUnavailable
  at once rather than a request hanging). A 429 on a POST is retried too: throttled requests were
  not processed, and sign has no side effect.
- Auth: any TokenCredential (wiring passes DefaultAzureCredential(managed_identity_client_id=...)).
  Key Vault's bearer challenge is handled by the SDK; `verify_challenge_resource=False` is only for
  stand-ins on 127.0.0.1.
- Errors (never an SDK traceback out of the store):
    404 KeyNotFound, a disabled key (403 Forbidden on a disabled key), a key whose key_ops do not
    allow sign, a key outside its nbf/exp            -> CaKeyNotFound (and the cached Signer is dropped)
    403 otherwise, 401                               -> SignerUnavailable naming the missing permission
    connection errors, timeouts, 5xx, 429 left over  -> SignerUnavailable
  verify_key/adopt_key (bring your own key, an admin action) raise the client-side errors instead:
  Forbidden naming the missing permission (get: 'Key Vault Reader' / keys/get; sign: 'Key Vault
  Crypto User' / keys/sign), InvalidRequest for a missing or disabled key or one that cannot sign.
- Key ids on other vaults are accepted (a customer's own vault), but only on Azure Key Vault /
  Managed HSM hosts or this store's own vault, and only over https: the service never sends its
  identity's token to a host somebody typed into a policy.

This module reads no environment; vault URL, credential and TLS trust come in through the constructor.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from functools import partial
from typing import Any, TypeVar
from urllib.parse import urlsplit

import requests
from azure.core.pipeline.policies import RetryPolicy
from azure.core.pipeline.transport import RequestsTransport
from azure.keyvault.keys import KeyClient, KeyVaultKey
from azure.keyvault.keys.crypto import CryptographyClient, SignatureAlgorithm
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, encode_dss_signature

from functions.core.errors import CaKeyNotFound, InvalidRequest, SignerUnavailable
from functions.deadline import deadline_hook
from functions.signing.base import (
    DEFAULT_KIND,
    RSA_BITS,
    CaPublicKey,
    KeyKind,
    StoreSigner,
    check_kind,
    kind_of,
    split_hash,
)
from functions.signing.keyvault_errors import _one_line, _translate

log = logging.getLogger(__name__)

KEY_OPERATIONS = ["sign", "verify"]
ANSWERED_RECENTLY = 30.0  # seconds a successful call to the vault stands for its health
AZURE_KEY_VAULT_SUFFIXES = (
    ".vault.azure.net",
    ".managedhsm.azure.net",
    ".vault.azure.cn",
    ".managedhsm.azure.cn",
    ".vault.usgovcloudapi.net",
    ".managedhsm.usgovcloudapi.net",
    ".vault.microsoftazure.de",
)

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")  # the project-wide CA key name rule
_KV_NAME_RE = re.compile(r"^[0-9A-Za-z-]{1,127}$")
_VERSION_RE = re.compile(r"^[0-9A-Za-z]{1,64}$")
_CURVE_OF_KIND = {"EC-P256": "P-256", "EC-P384": "P-384", "EC-P521": "P-521"}
# Key Vault's EC algorithms: one per curve, with the digest length it takes
_EC_ALG = {
    "secp256r1": (SignatureAlgorithm.es256, 32),
    "secp384r1": (SignatureAlgorithm.es384, 48),
    "secp521r1": (SignatureAlgorithm.es512, 64),
}
_CURVE_OF_CRV = {"P-256": ec.SECP256R1(), "P-384": ec.SECP384R1(), "P-521": ec.SECP521R1()}
_RSA_ALG = {"sha256": SignatureAlgorithm.rs256, "sha384": SignatureAlgorithm.rs384, "sha512": SignatureAlgorithm.rs512}
_PROBE_HASH = {"EC-P256": hashes.SHA256(), "EC-P384": hashes.SHA384(), "EC-P521": hashes.SHA512()}

T = TypeVar("T")


# ---- key names and ids ----------------------------------------------------------------------------


def key_vault_name(name: str) -> str:
    """The Key Vault key name for a CA key name (deterministic; ValueError for a bad name)."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError("key name must be 1-64 characters of A-Z a-z 0-9 . _ - (starting alphanumeric)")
    mapped = re.sub(r"[^0-9A-Za-z-]", "-", name)
    assert _KV_NAME_RE.match(mapped)
    return mapped


class KeyId:
    """A parsed Key Vault key id: https://<host>[:port]/keys/<name>[/<version>]."""

    __slots__ = ("vault_url", "name", "version")

    def __init__(self, vault_url: str, name: str, version: str | None) -> None:
        self.vault_url = vault_url
        self.name = name
        self.version = version

    @property
    def kid(self) -> str:
        return f"{self.vault_url}/keys/{self.name}" + (f"/{self.version}" if self.version else "")

    @property
    def host(self) -> str:
        return urlsplit(self.vault_url).hostname or ""

    @classmethod
    def parse(cls, kid: object) -> KeyId:
        """ValueError unless `kid` is a well-formed https key id."""
        if not isinstance(kid, str) or not kid or len(kid) > 2048:
            raise ValueError("not a Key Vault key id")
        try:
            u = urlsplit(kid.strip())
            port = u.port
        except ValueError:
            raise ValueError("not a Key Vault key id") from None
        if u.scheme != "https" or not u.hostname or u.query or u.fragment or u.username or u.password:
            raise ValueError("a Key Vault key id is https://<vault>/keys/<name>/<version>")
        parts = u.path.strip("/").split("/")
        if len(parts) not in (2, 3) or parts[0] != "keys" or not _KV_NAME_RE.match(parts[1]):
            raise ValueError("a Key Vault key id is https://<vault>/keys/<name>/<version>")
        version = parts[2] if len(parts) == 3 else None
        if version is not None and not _VERSION_RE.match(version):
            raise ValueError("bad key version in Key Vault key id")
        vault = f"https://{u.hostname.lower()}" + (f":{port}" if port else "")
        return cls(vault, parts[1], version)


# ---- the signer ----------------------------------------------------------------------------------------


class KeyVaultSigner(StoreSigner):
    """One CA key version in Key Vault. Thread-safe; every sign is one Key Vault request."""

    def __init__(
        self, store: KeyVaultKeyStore, key: KeyVaultKey, public: CaPublicKey, client: CryptographyClient
    ) -> None:
        kid = KeyId.parse(key.id)
        super().__init__(store, kid.kid, public)
        self.vault_url = kid.vault_url
        self.name = kid.name
        self.version = kid.version or ""
        self.key_type = str(getattr(key.key_type, "value", key.key_type))
        self._client = client


# ---- HTTP policy --------------------------------------------------------------------------------------


class _RetryPolicy(RetryPolicy):
    """azure-core's RetryPolicy, plus: a POST answered 429 is retried (a throttled request was not
    processed), and a Retry-After longer than `max_retry_after` is not waited for."""

    def __init__(self, *, max_retry_after: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._max_retry_after = max_retry_after

    def is_retry(self, settings: dict[str, Any], response: Any) -> bool:
        retry_after = self.get_retry_after(response)
        if retry_after is not None and retry_after > self._max_retry_after:
            return False
        if (
            response.http_response.status_code == 429
            and response.http_request.method.upper() == "POST"
            and settings["total"]
        ):
            return True
        return super().is_retry(settings, response)


# ---- the store -----------------------------------------------------------------------------------------


class KeyVaultKeyStore:
    """CA keys in one Azure Key Vault (or Managed HSM); also signs with keys in customers' vaults."""

    def __init__(
        self,
        vault_url: str,
        credential: Any,
        *,
        connection_verify: str | bool | None = None,
        verify_challenge_resource: bool = True,
        api_version: str | None = None,
        hardware_protected: bool = True,
        retry_total: int = 3,
        retry_backoff_factor: float = 0.5,
        retry_backoff_max: float = 8.0,
        max_retry_after: float = 10.0,
        connection_timeout: float = 5.0,
        read_timeout: float = 30.0,
        pool_size: int = 32,
    ) -> None:
        u = urlsplit((vault_url or "").strip().rstrip("/"))
        if u.scheme != "https" or not u.hostname or u.path or u.query:
            raise ValueError(f"vault_url must be https://<vault host>, not {vault_url!r}")
        if credential is None or not hasattr(credential, "get_token"):
            raise ValueError("credential must be an azure-core TokenCredential")
        self.vault_url = f"https://{u.hostname.lower()}" + (f":{u.port}" if u.port else "")
        self._answered_at = float("-inf")  # when a call to this vault last succeeded (health)
        self.hardware_protected = hardware_protected
        self._credential = credential
        self._verify_challenge = verify_challenge_resource
        self._api_version = api_version
        self._retry = {
            "retry_total": retry_total,
            "retry_backoff_factor": retry_backoff_factor,
            "retry_backoff_max": retry_backoff_max,
            "max_retry_after": max_retry_after,
        }
        self._session = requests.Session()
        # Proxy settings read from the environment once, not on every sign (requests walks the whole
        # environment per call when trust_env is on); no ~/.netrc.
        self._session.trust_env = False
        self._session.proxies.update(requests.utils.get_environ_proxies(self.vault_url))
        adapter = requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=pool_size, max_retries=0)
        self._session.mount("https://", adapter)
        transport_kwargs: dict[str, Any] = {
            "session": self._session,
            "session_owner": False,
            "connection_timeout": connection_timeout,
            "read_timeout": read_timeout,
        }
        if connection_verify is None:  # what requests would take from the environment, read once
            connection_verify = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or None
        if connection_verify is not None:
            transport_kwargs["connection_verify"] = connection_verify
        self._transport = RequestsTransport(**transport_kwargs)
        self._lock = threading.Lock()
        self._key_clients: dict[str, KeyClient] = {}
        self._signers: dict[str, KeyVaultSigner] = {}
        self._closed = False

    def __repr__(self) -> str:
        return f"<KeyVaultKeyStore {self.vault_url}>"

    # ---- KeyStore -------------------------------------------------------------------------------

    def create_key(self, name: str, kind: KeyKind = DEFAULT_KIND) -> KeyVaultSigner:
        kind = check_kind(kind)
        kv_name = key_vault_name(name)
        client = self._key_client(self.vault_url)

        def create() -> KeyVaultKey:
            if kind in _CURVE_OF_KIND:
                return client.create_ec_key(
                    kv_name, curve=_CURVE_OF_KIND[kind], hardware_protected=self.hardware_protected,
                    key_operations=list(KEY_OPERATIONS),
                )  # fmt: skip
            return client.create_rsa_key(
                kv_name, size=RSA_BITS[kind], hardware_protected=self.hardware_protected,
                key_operations=list(KEY_OPERATIONS),
            )  # fmt: skip

        key = self._call(create, op="create", vault=self.vault_url, name=kv_name, key_ref="")
        signer = self._signer_from(key, key_ref=key.id or "", byok=False)
        if kind_of(signer.public_key()) != kind:
            raise SignerUnavailable(f"{self.vault_url} created a {signer.kind} key when asked for {kind}")
        with self._lock:
            self._signers[signer.key_ref] = signer
        return signer

    def get_signer(self, key_ref: str) -> KeyVaultSigner:
        with self._lock:
            cached = self._signers.get(key_ref)
        if cached is not None:
            return cached
        kid = self._parse(key_ref, byok=False)
        if not kid.version:
            raise CaKeyNotFound("a CA key_ref must be a versioned Key Vault key id", key_ref=key_ref)
        with self._lock:
            cached = self._signers.get(kid.kid)  # the same key spelt differently (host case, slashes)
        if cached is not None:
            return cached
        key = self._get_key(kid, key_ref=key_ref, byok=False)
        signer = self._signer_from(key, key_ref=key_ref, byok=False)
        with self._lock:
            return self._signers.setdefault(signer.key_ref, signer)

    def disable_key(self, key_ref: str) -> None:
        kid = self._parse(key_ref, byok=False)
        if not kid.version:
            raise CaKeyNotFound("a CA key_ref must be a versioned Key Vault key id", key_ref=key_ref)
        self._forget(key_ref)
        self._forget(kid.kid)
        key = self._get_key(kid, key_ref=key_ref, byok=False)  # CaKeyNotFound if missing or already disabled
        if key.properties.enabled is False:
            raise CaKeyNotFound(f"the CA key {kid.name!r} in {kid.vault_url} is already disabled", key_ref=key_ref)
        client = self._key_client(kid.vault_url)
        self._call(
            lambda: client.update_key_properties(kid.name, kid.version, enabled=False),
            op="update", vault=kid.vault_url, name=kid.name, key_ref=key_ref,
        )  # fmt: skip
        self._forget(key_ref)
        self._forget(kid.kid)

    def health(self) -> None:
        """The vault answers: one list request, unless a call of the service's own reached it within
        ANSWERED_RECENTLY seconds and none failed since (health spends no Key Vault operation that
        signing just showed unnecessary)."""
        if time.monotonic() - self._answered_at < ANSWERED_RECENTLY:
            return
        client = self._key_client(self.vault_url)

        def probe() -> None:
            pages = client.list_properties_of_keys(max_page_size=1).by_page()
            next(pages, None)  # one request: the first page

        self._call(probe, op="list", vault=self.vault_url, name="", key_ref="")

    # ---- bring your own key ---------------------------------------------------------------------

    def verify_key(self, kid: str) -> KeyVaultSigner:
        """Prove the service can read AND sign with an existing key (e.g. in a customer's vault).

        Reads the key (get), checks that it is enabled, valid now, an EC P-256/384/521 or RSA
        2048/3072/4096 key, HSM-protected when this store requires it, and that its key_ops allow
        sign; then signs a random digest and verifies the signature locally with the public key.
        Returns the Signer (key_ref = the versioned kid; an unversioned kid is resolved to the
        current version). Raises Forbidden naming the missing permission, InvalidRequest for a
        missing, disabled or unsuitable key, SignerUnavailable if the vault cannot be reached.
        """
        parsed = self._parse(kid, byok=True)
        self._check_host(parsed)
        key = self._get_key(parsed, key_ref=kid, byok=True)
        signer = self._signer_from(key, key_ref=kid, byok=True)
        if self.hardware_protected and not signer.key_type.endswith("-HSM"):
            raise InvalidRequest(
                f"key {parsed.name!r} in {parsed.vault_url} is software-protected ({signer.key_type}); "
                "CA keys must be HSM-protected (EC-HSM or RSA-HSM: a Premium vault or a Managed HSM)",
                key_ref=kid,
            )
        probe = secrets.token_bytes(32)
        alg = _PROBE_HASH.get(signer.kind, hashes.SHA256())
        signature = self._sign(signer, probe, alg, byok=True)
        try:
            _verify(signer.public_key(), signature, probe, alg)
        except InvalidSignature:
            raise InvalidRequest(
                f"key {parsed.name!r} in {parsed.vault_url} signed, but the signature does not verify "
                "with the key's own public key",
                key_ref=kid,
            ) from None
        with self._lock:
            return self._signers.setdefault(signer.key_ref, signer)

    def adopt_key(self, kid: str) -> KeyVaultSigner:
        """Same as verify_key: the Signer to store in a policy, after proving it works."""
        return self.verify_key(kid)

    # ---- extras ---------------------------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            self._closed = True
            clients = list(self._key_clients.values())
            self._key_clients.clear()
            self._signers.clear()
        for c in clients:
            try:
                c.close()
            except Exception:
                pass
        self._session.close()

    def __enter__(self) -> KeyVaultKeyStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- signing --------------------------------------------------------------------------------

    def _sign(
        self, signer: KeyVaultSigner, data: bytes, algorithm: hashes.HashAlgorithm | Prehashed, *, byok: bool = False
    ) -> bytes:
        digest, alg = split_hash(data, algorithm)
        pub = signer.public_key()
        if isinstance(pub, ec.EllipticCurvePublicKey):
            kv_alg, size = _EC_ALG[pub.curve.name]
            # ECDSA uses only the leftmost order-length bits of the hash: cut or zero-pad to what the
            # curve's one Key Vault algorithm takes; the integer ECDSA signs stays the same
            digest = digest[:size] if len(digest) >= size else bytes(size - len(digest)) + digest
        else:
            kv_alg = _RSA_ALG[alg.name]
        if self._closed:
            raise SignerUnavailable(f"the Key Vault key store for {self.vault_url} is closed", key_ref=signer.key_ref)
        for attempt in (0, 1):
            client = signer._client
            try:
                result = self._call(
                    partial(client.sign, kv_alg, digest),
                    op="sign", vault=signer.vault_url, name=signer.name, key_ref=signer.key_ref, byok=byok,
                )  # fmt: skip
                break
            except CaKeyNotFound:
                self._forget(signer.key_ref)
                raise
            except SignerUnavailable as e:
                # A transient failure (connection, 5xx, token): a new client - new connections, a new
                # token - and one more try. Throttling (429) is not retried here: its Retry-After goes
                # back to the caller.
                if attempt or e.details.get("retry_after") is not None or self._closed:
                    raise
                self._renew_client(signer, client, e.message)
        raw = result.signature
        if isinstance(pub, rsa.RSAPublicKey):
            if len(raw) != (pub.key_size + 7) // 8:
                raise SignerUnavailable(
                    f"{signer.vault_url} returned a malformed RSA signature", key_ref=signer.key_ref
                )
            return raw
        width = (pub.curve.key_size + 7) // 8
        if len(raw) != 2 * width:
            raise SignerUnavailable(f"{signer.vault_url} returned a malformed ECDSA signature", key_ref=signer.key_ref)
        return encode_dss_signature(int.from_bytes(raw[:width], "big"), int.from_bytes(raw[width:], "big"))

    def _renew_client(self, signer: KeyVaultSigner, failed: CryptographyClient, why: str) -> None:
        """One new client per failed client, however many threads saw it fail: the first swaps it,
        the others retry on that one (16 callers during an outage make one new pipeline and one
        token request, not 16). The failed client is not closed: calls still in flight on it finish
        on the store's transport, which stays open."""
        with self._lock:
            if signer._client is not failed:
                return
            log.warning("Key Vault %s: %s; retrying the sign once with a new client", signer.vault_url, why)
            signer._client = CryptographyClient(signer.key_ref, self._credential, **self._client_kwargs())

    # ---- helpers --------------------------------------------------------------------------------

    def _call(self, fn: Callable[[], T], *, op: str, vault: str, name: str, key_ref: str, byok: bool = False) -> T:
        try:
            out = fn()
        except Exception as e:  # translated into one clear error below
            err = _translate(e, op=op, vault=vault, name=name, key_ref=key_ref, byok=byok)
        else:
            if vault == self.vault_url:
                self._answered_at = time.monotonic()
            return out
        if vault == self.vault_url and isinstance(err, SignerUnavailable):
            self._answered_at = float("-inf")
        raise err

    def _parse(self, key_ref: object, *, byok: bool) -> KeyId:
        try:
            return KeyId.parse(key_ref)
        except ValueError as e:
            if byok:
                raise InvalidRequest(f"{e}: {_one_line(str(key_ref), 80)!r}") from None
            raise CaKeyNotFound(f"{e}: {_one_line(str(key_ref), 80)!r}", key_ref=key_ref) from None

    def _check_host(self, kid: KeyId) -> None:
        if kid.vault_url == self.vault_url:
            return
        host = kid.host
        if urlsplit(kid.vault_url).port is None and any(
            host.endswith(s) and host != s[1:] for s in AZURE_KEY_VAULT_SUFFIXES
        ):
            return
        raise InvalidRequest(
            f"{kid.vault_url} is not an Azure Key Vault or Managed HSM host (*.vault.azure.net, "
            "*.managedhsm.azure.net or a sovereign cloud's equivalent)",
            key_ref=kid.kid,
        )

    def _key_client(self, vault_url: str) -> KeyClient:
        with self._lock:
            if self._closed:
                raise SignerUnavailable(f"the Key Vault key store for {self.vault_url} is closed")
            client = self._key_clients.get(vault_url)
            if client is None:
                client = KeyClient(vault_url, self._credential, **self._client_kwargs())
                self._key_clients[vault_url] = client
            return client

    def _client_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "transport": self._transport,
            "retry_policy": _RetryPolicy(**self._retry),  # one per client: a pipeline links its policies
            "verify_challenge_resource": self._verify_challenge,
            "raw_request_hook": deadline_hook,  # the API request's deadline bounds every attempt
        }
        if self._api_version:
            kwargs["api_version"] = self._api_version
        return kwargs

    def _get_key(self, kid: KeyId, *, key_ref: str, byok: bool) -> KeyVaultKey:
        if not byok and kid.vault_url != self.vault_url:
            self._check_host_quietly(kid, key_ref)
        client = self._key_client(kid.vault_url)
        return self._call(
            lambda: client.get_key(kid.name, kid.version or None),
            op="get", vault=kid.vault_url, name=kid.name, key_ref=key_ref, byok=byok,
        )  # fmt: skip

    def _check_host_quietly(self, kid: KeyId, key_ref: str) -> None:
        try:
            self._check_host(kid)
        except InvalidRequest as e:
            raise CaKeyNotFound(e.message, key_ref=key_ref) from None

    def _signer_from(self, key: KeyVaultKey, *, key_ref: str, byok: bool) -> KeyVaultSigner:
        """A Signer for a key Key Vault just returned; CaKeyNotFound (byok: InvalidRequest) if unusable."""
        unusable = InvalidRequest if byok else CaKeyNotFound
        try:
            kid = KeyId.parse(key.id)
        except ValueError:
            raise SignerUnavailable(f"Key Vault returned a malformed key id {_one_line(str(key.id), 80)!r}") from None
        if not kid.version:
            raise SignerUnavailable(f"Key Vault returned key {kid.name!r} without a version")
        where = f"key {kid.name!r} in {kid.vault_url}"
        props = key.properties
        if props.enabled is False:
            raise unusable(f"the {where} is disabled" + ("; enable it first" if byok else ""), key_ref=key_ref)
        now = datetime.now(timezone.utc)
        if props.not_before is not None and now < props.not_before:
            raise unusable(f"the {where} is not valid before {props.not_before:%Y-%m-%d %H:%M} UTC", key_ref=key_ref)
        if props.expires_on is not None and now >= props.expires_on:
            raise unusable(f"the {where} expired at {props.expires_on:%Y-%m-%d %H:%M} UTC", key_ref=key_ref)
        ops = [str(getattr(o, "value", o)) for o in (key.key_operations or [])]
        if "sign" not in ops:
            raise unusable(
                f"the {where} may not sign: its key_ops are {ops or 'empty'}; they must include 'sign'", key_ref=key_ref
            )
        try:
            public = _public_from_jwk(key)
        except ValueError as e:
            raise unusable(f"the {where} cannot be an SSH CA key: {e}", key_ref=key_ref) from None
        client = CryptographyClient(key, self._credential, **self._client_kwargs())
        return KeyVaultSigner(self, key, public, client)

    def _forget(self, key_ref: str) -> None:
        with self._lock:
            self._signers.pop(key_ref, None)


def _public_from_jwk(key: KeyVaultKey) -> CaPublicKey:
    jwk = vars(key.key)  # JsonWebKey sets its fields (kty, crv, x, y, n, e, ...) as attributes
    kty = str(getattr(jwk["kty"], "value", jwk["kty"]))
    if kty in ("EC", "EC-HSM"):
        crv = str(getattr(jwk["crv"], "value", jwk["crv"]))
        curve = _CURVE_OF_CRV.get(crv)
        if curve is None or not jwk["x"] or not jwk["y"]:
            raise ValueError(f"EC curve {crv} is not supported (use P-256, P-384 or P-521)")
        pub: CaPublicKey = ec.EllipticCurvePublicNumbers(
            int.from_bytes(jwk["x"], "big"), int.from_bytes(jwk["y"], "big"), curve
        ).public_key()
    elif kty in ("RSA", "RSA-HSM"):
        if not jwk["n"] or not jwk["e"]:
            raise ValueError("the RSA key has no modulus/exponent")
        pub = rsa.RSAPublicNumbers(int.from_bytes(jwk["e"], "big"), int.from_bytes(jwk["n"], "big")).public_key()
    else:
        raise ValueError(f"key type {kty} cannot sign SSH certificates (use EC or RSA)")
    kind_of(pub)  # ValueError for sizes we do not support (e.g. RSA 1024)
    return pub


def _verify(public_key: CaPublicKey, signature: bytes, data: bytes, algorithm: hashes.HashAlgorithm) -> None:
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        public_key.verify(signature, data, ec.ECDSA(algorithm))
    else:
        public_key.verify(signature, data, padding.PKCS1v15(), algorithm)


__all__ = ["AZURE_KEY_VAULT_SUFFIXES", "KeyId", "KeyVaultKeyStore", "KeyVaultSigner", "key_vault_name"]
