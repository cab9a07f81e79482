"""An HTTPS stand-in of the Azure Key Vault keys data plane, for the real azure-keyvault-keys SDK.

    kv = KeyVaultStandIn().start()          # https://127.0.0.1:<free port>, TLS leaf from trustme
    cred = StaticTokenCredential(kv.token)
    client = KeyClient(kv.url, cred, connection_verify=kv.ca_path, verify_challenge_resource=False)
    ...
    kv.stop()

What it speaks (the shapes of /work/shared/reference/AZURE-REST.md section 1, which cites the docs
and recorded traffic):
- The bearer challenge: a request without `Authorization: Bearer <kv.token>` gets 401 with the
  real `WWW-Authenticate: Bearer authorization=..., resource="https://vault.azure.net"` header,
  answered before the body is looked at (the SDK's first request is body-less).
- `POST /keys/{name}/create`, `GET /keys/{name}/` (latest) and `/keys/{name}/{version}`,
  `POST /keys/{name}/{version}/sign`, `PATCH /keys/{name}/{version}` (enable/disable, key_ops, tags),
  `GET /keys` (list, paged with maxresults + nextLink). `api-version` is ignored.
- `kid` = the scheme://host:port the client used + `/keys/{name}/{version}`, version 32 lowercase hex.
- Errors in the documented body shape `{"error": {"code", "message", "innererror"?}}`: 404
  KeyNotFound, 403 Forbidden / KeyDisabled for get or sign on a disabled key, 403 Forbidden /
  ForbiddenByRbac for an operation `deny()`ed, 400 BadParameter for a malformed request.
- Sign takes the digest (base64url) and answers EC as raw r||s (fixed width), RSA as PKCS#1 v1.5
  (RS*) or PSS (PS*) over the given digest. The algorithm must fit the key (ES256 needs P-256 and a
  32-byte digest, and so on).

Not verified against the real service (see AZURE-REST.md section 7), so tests must not lean on the
exact wording: the disabled-key message and inner code, 403 on GET of a disabled key, the RBAC
inner code, the answer to an alg/curve mismatch.

Keys are generated and held in software (cryptography) inside this process; private keys never
leave it: no route returns or exports them.

Test knobs: `.requests` (a log of (method, path, has_auth)), `.statuses` (the status answered to
each), `fail_next_with(status, headers, body, times=1)`, `deny(op, key_name)` / `allow(...)`,
`add_key(...)` (a key made "out of band", e.g. a customer's own key for bring-your-own-key tests),
`latency` / `sign_latency` (seconds added before every authenticated answer / before a sign answer,
as a real vault's round trip would be: each connection has its own thread, so delayed answers
overlap the way they do against the real service). `KeyVaultStandIn(latency=..., sign_latency=...)`.
"""

from __future__ import annotations

import base64
import json
import secrets
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any, NamedTuple
from urllib.parse import parse_qs, urlsplit

from azure.core.credentials import AccessToken
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, decode_dss_signature

from .tls import TlsStandIn

TENANT_ID = "72f988bf-86f1-41af-91ab-2d7cd011db47"
CHALLENGE = f'Bearer authorization="https://login.windows.net/{TENANT_ID}", resource="https://vault.azure.net"'
UNAUTHORIZED_BODY = {"error": {"code": "Unauthorized", "message": "AKV10000: Request is missing a Bearer or PoP token."}}

CURVES: dict[str, tuple[ec.EllipticCurve, int]] = {
    "P-256": (ec.SECP256R1(), 32),
    "P-384": (ec.SECP384R1(), 48),
    "P-521": (ec.SECP521R1(), 66),
}
_EC_ALGS = {"ES256": ("P-256", hashes.SHA256()), "ES384": ("P-384", hashes.SHA384()), "ES512": ("P-521", hashes.SHA512())}
_RSA_HASHES = {"256": hashes.SHA256(), "384": hashes.SHA384(), "512": hashes.SHA512()}
_DEFAULT_OPS = {"EC": ["sign", "verify"], "RSA": ["encrypt", "decrypt", "sign", "verify", "wrapKey", "unwrapKey"]}
OPS = ("get", "list", "create", "sign", "update")
_RBAC_ACTION = {
    "get": "Microsoft.KeyVault/vaults/keys/read",
    "list": "Microsoft.KeyVault/vaults/keys/read",
    "create": "Microsoft.KeyVault/vaults/keys/create/action",
    "sign": "Microsoft.KeyVault/vaults/keys/sign/action",
    "update": "Microsoft.KeyVault/vaults/keys/update/action",
}


def b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64u(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class StaticTokenCredential:
    """A TokenCredential that always returns one token, and remembers what it was asked for."""

    def __init__(self, token: str = "standin-token", lifetime: int = 3600) -> None:
        self.token = token
        self.lifetime = lifetime
        self.calls: list[tuple[tuple[str, ...], dict[str, Any]]] = []
        self._lock = threading.Lock()

    def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken:
        with self._lock:
            self.calls.append((scopes, kwargs))
        return AccessToken(self.token, int(time.time()) + self.lifetime)


class Request(NamedTuple):
    method: str
    path: str  # without the query string
    has_auth: bool


@dataclass
class _Version:
    name: str
    version: str
    kty: str  # as requested: EC, EC-HSM, RSA, RSA-HSM
    private: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
    key_ops: list[str]
    enabled: bool = True
    created: int = field(default_factory=lambda: int(time.time()))
    updated: int = 0
    nbf: int | None = None
    exp: int | None = None
    tags: dict[str, str] | None = None

    @property
    def is_ec(self) -> bool:
        return self.kty.startswith("EC")

    def jwk(self, vault: str) -> dict[str, Any]:
        key: dict[str, Any] = {"kid": f"{vault}/keys/{self.name}/{self.version}", "kty": self.kty, "key_ops": self.key_ops}
        pub = self.private.public_key()
        if isinstance(pub, ec.EllipticCurvePublicKey):
            crv = next(c for c, (curve, _) in CURVES.items() if curve.name == pub.curve.name)
            width = CURVES[crv][1]
            nums = pub.public_numbers()
            key.update(crv=crv, x=b64u(nums.x.to_bytes(width, "big")), y=b64u(nums.y.to_bytes(width, "big")))
        else:
            nums = pub.public_numbers()
            key.update(n=b64u(nums.n.to_bytes((nums.n.bit_length() + 7) // 8, "big")),
                       e=b64u(nums.e.to_bytes((nums.e.bit_length() + 7) // 8, "big")))  # fmt: skip
        return key

    def attributes(self) -> dict[str, Any]:
        attrs: dict[str, Any] = {
            "enabled": self.enabled,
            "created": self.created,
            "updated": self.updated or self.created,
            "recoveryLevel": "CustomizedRecoverable+Purgeable",
            "recoverableDays": 7,
            "exportable": False,
        }
        if self.nbf is not None:
            attrs["nbf"] = self.nbf
        if self.exp is not None:
            attrs["exp"] = self.exp
        return attrs

    def bundle(self, vault: str) -> dict[str, Any]:
        out: dict[str, Any] = {"key": self.jwk(vault), "attributes": self.attributes()}
        if self.tags:
            out["tags"] = self.tags
        return out


class _HttpError(Exception):
    def __init__(self, status: int, code: str, message: str, inner: str | None = None,
                 headers: dict[str, str] | None = None) -> None:  # fmt: skip
        super().__init__(message)
        self.status = status
        self.body: dict[str, Any] = {"error": {"code": code, "message": message}}
        if inner:
            self.body["error"]["innererror"] = {"code": inner}
        self.headers = headers or {}


def _not_found(name: str) -> _HttpError:
    return _HttpError(
        404,
        "KeyNotFound",
        f"A key with (name/id) {name} was not found in this key vault. If you recently deleted this key you "
        "may be able to recover it using the correct recovery command. For help resolving this issue, "
        "please see https://go.microsoft.com/fwlink/?linkid=2125182",
    )


def _disabled(op: str) -> _HttpError:
    return _HttpError(403, "Forbidden", f"Operation {op} is not allowed on a disabled key.", "KeyDisabled")


class KeyVaultStandIn(TlsStandIn):
    """A threaded HTTPS server on 127.0.0.1 that answers like Key Vault's keys API."""

    def __init__(self, token: str = "standin-token", vault_name: str = "ezssh-standin", *,
                 latency: float = 0.0, sign_latency: float = 0.0) -> None:
        self.token = token
        self.latency = latency
        self.sign_latency = sign_latency
        self.vault_name = vault_name
        self.requests: list[Request] = []
        self.statuses: list[int] = []
        self._keys: dict[str, list[_Version]] = {}
        self._denied: set[tuple[str, str]] = set()
        self._failures: list[tuple[int, dict[str, str], bytes]] = []
        self._lock = threading.RLock()
        super().__init__()

    # ---- lifecycle --------------------------------------------------------------------------

    name = "kv-standin"

    def start(self) -> KeyVaultStandIn:
        self.handler = _Handler
        return super().start()

    def __enter__(self) -> KeyVaultStandIn:
        return self.start() if self._server is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- knobs ------------------------------------------------------------------------------

    def fail_next_with(self, status: int, headers: dict[str, str] | None = None,
                       body: dict | str | bytes | None = None, times: int = 1) -> None:  # fmt: skip
        """The next `times` authenticated requests get this answer instead of being served."""
        if body is None:
            body = {"error": {"code": "Throttled" if status == 429 else "InternalError",
                              "message": "Request was not processed because too many requests were received. "
                                         "Reason: VaultRequestTypeLimitReached" if status == 429 else
                                         "The service encountered an internal error."}}  # fmt: skip
        raw = body if isinstance(body, bytes) else (body if isinstance(body, str) else json.dumps(body)).encode()
        with self._lock:
            self._failures.extend([(status, dict(headers or {}), raw)] * times)

    def clear_failures(self) -> None:
        with self._lock:
            self._failures.clear()

    def deny(self, op: str, key_name: str = "*") -> None:
        """Refuse `op` (get, list, create, sign, update) on `key_name` ("*": every key) with 403."""
        if op not in OPS:
            raise ValueError(f"op must be one of {OPS}")
        with self._lock:
            self._denied.add((op, key_name))

    def allow(self, op: str | None = None, key_name: str = "*") -> None:
        """Undo deny(op, key_name); allow() with no op undoes every deny."""
        with self._lock:
            if op is None:
                self._denied.clear()
            else:
                self._denied.discard((op, key_name))

    def add_key(self, name: str, kty: str = "EC-HSM", *, crv: str = "P-256", size: int = 3072,
                key_ops: list[str] | None = None, enabled: bool = True) -> str:  # fmt: skip
        """A key created out of band (not through the API). Returns its kid."""
        version = self._create(name, {"kty": kty, "crv": crv, "key_size": size,
                                      **({"key_ops": key_ops} if key_ops is not None else {})})  # fmt: skip
        version.enabled = enabled
        return f"{self.url}/keys/{name}/{version.version}"

    def key_names(self) -> list[str]:
        with self._lock:
            return list(self._keys)

    def count(self, method: str | None = None, path_suffix: str = "") -> int:
        with self._lock:
            return sum(
                1 for r in self.requests if (method is None or r.method == method) and r.path.endswith(path_suffix)
            )

    # ---- the service ------------------------------------------------------------------------

    def _create(self, name: str, body: dict[str, Any]) -> _Version:
        kty = body.get("kty")
        if kty in ("EC", "EC-HSM"):
            crv = body.get("crv") or "P-256"
            if crv not in CURVES:
                raise _HttpError(400, "BadParameter", f"Unsupported curve {crv!r}.")
            private: Any = ec.generate_private_key(CURVES[crv][0])
        elif kty in ("RSA", "RSA-HSM"):
            size = body.get("key_size") or 2048
            if size not in (2048, 3072, 4096):
                raise _HttpError(400, "BadParameter", f"Invalid key size {size}.")
            private = rsa.generate_private_key(int(body.get("public_exponent") or 65537), size)
        else:
            raise _HttpError(400, "BadParameter", f"Unsupported key type {kty!r}.")
        ops = body.get("key_ops")
        if ops is None:
            ops = list(_DEFAULT_OPS[kty.split("-")[0]])
        attrs = body.get("attributes") or {}
        v = _Version(name=name, version=secrets.token_hex(16), kty=kty, private=private, key_ops=list(ops),
                     enabled=attrs.get("enabled", True), nbf=attrs.get("nbf"), exp=attrs.get("exp"),
                     tags=body.get("tags"))  # fmt: skip
        with self._lock:
            self._keys.setdefault(name, []).append(v)
        return v

    def _find(self, name: str, version: str) -> _Version:
        with self._lock:
            versions = self._keys.get(name, [])
            if not version:
                if versions:
                    return versions[-1]
            else:
                for v in versions:
                    if v.version == version:
                        return v
        raise _not_found(name)

    def _check_allowed(self, op: str, name: str) -> None:
        with self._lock:
            denied = (op, name) in self._denied or (op, "*") in self._denied
        if denied:
            resource = (f"/subscriptions/00000000-0000-0000-0000-000000000000/resourcegroups/ezssh/providers/"
                        f"microsoft.keyvault/vaults/{self.vault_name}" + (f"/keys/{name}" if name else ""))  # fmt: skip
            raise _HttpError(
                403,
                "Forbidden",
                "Caller is not authorized to perform action on resource.\r\nIf role assignments, deny assignments "
                "or role definitions were changed recently, please observe propagation time.\r\n"
                f"Caller: appid=11111111-1111-1111-1111-111111111111;oid=22222222-2222-2222-2222-222222222222;"
                f"iss=https://sts.windows.net/{TENANT_ID}/\r\n"
                f"Action: '{_RBAC_ACTION[op]}'\r\nResource: '{resource}'\r\nAssignment: (not found)\r\n"
                f"DenyAssignmentId: null\r\nDecisionReason: null \r\nVault: {self.vault_name};location=westeurope\r\n",
                "ForbiddenByRbac",
            )

    def handle(self, method: str, path: str, query: dict[str, list[str]], body: bytes, vault: str) -> tuple[int, Any]:
        parts = path.split("/")  # "/keys/name/version/op" -> ["", "keys", "name", "version", "op"]
        if len(parts) < 2 or parts[1] != "keys":
            raise _HttpError(404, "NotFound", f"The requested path {path} was not found.")
        if len(parts) == 2 or (len(parts) == 3 and parts[2] == ""):
            if method != "GET":
                raise _HttpError(405, "MethodNotAllowed", f"{method} is not allowed on {path}.")
            self._check_allowed("list", "")
            return 200, self._list(query, vault)
        name = parts[2]
        rest = parts[3:]
        payload = self._json(body) if method in ("POST", "PATCH", "PUT") else {}
        if method == "POST" and rest == ["create"]:
            self._check_allowed("create", name)
            if not name.replace("-", "").isalnum() or len(name) > 127:
                raise _HttpError(400, "BadParameter", "The key name must match ^[0-9a-zA-Z-]+$.")
            return 200, self._create(name, payload).bundle(vault)
        if method == "GET" and len(rest) <= 1:
            self._check_allowed("get", name)
            v = self._find(name, rest[0] if rest else "")
            if not v.enabled:
                raise _disabled("get")
            return 200, v.bundle(vault)
        if method == "PATCH" and len(rest) <= 1:
            self._check_allowed("update", name)
            v = self._find(name, rest[0] if rest else "")
            with self._lock:
                attrs = payload.get("attributes") or {}
                if "enabled" in attrs:
                    v.enabled = bool(attrs["enabled"])
                for k in ("nbf", "exp"):
                    if k in attrs:
                        setattr(v, k, attrs[k])
                if "key_ops" in payload:
                    v.key_ops = list(payload["key_ops"])
                if "tags" in payload:
                    v.tags = payload["tags"]
                v.updated = int(time.time())
            return 200, v.bundle(vault)
        if method == "POST" and len(rest) == 2 and rest[1] == "sign":
            self._check_allowed("sign", name)
            v = self._find(name, rest[0])
            if not v.enabled:
                raise _disabled("sign")
            if "sign" not in v.key_ops:
                raise _HttpError(403, "Forbidden", "Operation sign is not permitted on this key.", "KeyOperationForbidden")
            now = time.time()
            if (v.nbf is not None and now < v.nbf) or (v.exp is not None and now > v.exp):
                raise _HttpError(403, "Forbidden", "Operation sign is not allowed on an expired or not yet valid key.")
            sig = self._sign(v, str(payload.get("alg", "")), unb64u(str(payload.get("value", ""))))
            return 200, {"kid": f"{vault}/keys/{name}/{v.version}", "value": b64u(sig)}
        raise _HttpError(405 if rest else 404, "BadParameter", f"{method} {path} is not supported by this stand-in.")

    @staticmethod
    def _json(body: bytes) -> dict[str, Any]:
        try:
            payload = json.loads(body or b"{}")
        except ValueError:
            raise _HttpError(400, "BadParameter", "The request body is not valid JSON.") from None
        if not isinstance(payload, dict):
            raise _HttpError(400, "BadParameter", "The request body must be a JSON object.")
        return payload

    @staticmethod
    def _sign(v: _Version, alg: str, digest: bytes) -> bytes:
        priv = v.private
        if isinstance(priv, ec.EllipticCurvePrivateKey):
            if alg not in _EC_ALGS:
                raise _HttpError(400, "BadParameter", f"Algorithm {alg!r} is not valid for an EC key.")
            crv, h = _EC_ALGS[alg]
            curve, width = CURVES[crv]
            if curve.name != priv.curve.name:
                raise _HttpError(400, "BadParameter", f"Algorithm {alg} does not match the key's curve.")
            if len(digest) != h.digest_size:
                raise _HttpError(400, "BadParameter", f"Algorithm {alg} needs a {h.digest_size}-byte digest.")
            r, s = decode_dss_signature(priv.sign(digest, ec.ECDSA(Prehashed(h))))
            return r.to_bytes(width, "big") + s.to_bytes(width, "big")
        if alg[:2] not in ("RS", "PS") or alg[2:] not in _RSA_HASHES:
            raise _HttpError(400, "BadParameter", f"Algorithm {alg!r} is not valid for an RSA key.")
        h = _RSA_HASHES[alg[2:]]
        if len(digest) != h.digest_size:
            raise _HttpError(400, "BadParameter", f"Algorithm {alg} needs a {h.digest_size}-byte digest.")
        pad = padding.PKCS1v15() if alg.startswith("RS") else padding.PSS(padding.MGF1(h), h.digest_size)
        return priv.sign(digest, pad, Prehashed(h))

    def _list(self, query: dict[str, list[str]], vault: str) -> dict[str, Any]:
        top = int((query.get("maxresults") or ["25"])[0])
        skip = int((query.get("$skiptoken") or ["0"])[0])
        with self._lock:
            latest = [(n, vs[-1]) for n, vs in sorted(self._keys.items()) if vs]
        page = latest[skip : skip + top]
        value = [{"kid": f"{vault}/keys/{n}", "attributes": v.attributes(), **({"tags": v.tags} if v.tags else {})}
                 for n, v in page]  # fmt: skip
        nxt = f"{vault}/keys?maxresults={top}&$skiptoken={skip + top}" if skip + top < len(latest) else None
        return {"value": value, "nextLink": nxt}


class _Handler(BaseHTTPRequestHandler):
    owner: KeyVaultStandIn
    protocol_version = "HTTP/1.1"
    server_version = "ezssh-kv-standin"
    sys_version = ""

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet
        pass

    def setup(self) -> None:
        super().setup()
        # headers and body go out in separate writes: without this, Nagle + delayed ACK add ~40 ms
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _answer(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        with self.owner._lock:  # logged before the client can read the answer, so tests see it
            self.owner.statuses.append(status)
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(raw)))
        self.send_header("x-ms-keyvault-service-version", "standin")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(raw)

    def _serve(self) -> None:
        owner = self.owner
        split = urlsplit(self.path)
        auth = self.headers.get("Authorization", "")
        has_auth = auth == f"Bearer {owner.token}"
        with owner._lock:
            owner.requests.append(Request(self.command, split.path, bool(auth)))
        length = int(self.headers.get("Content-Length") or 0)
        if not has_auth:
            # the challenge, before the body is looked at (it is only drained to keep the connection usable)
            if length:
                self.rfile.read(length)
            self._answer(401, UNAUTHORIZED_BODY, {"WWW-Authenticate": CHALLENGE})
            return
        body = self.rfile.read(length) if length else b""
        with owner._lock:
            failure = owner._failures.pop(0) if owner._failures else None
        if failure is not None:
            status, headers, raw = failure
            self._answer(status, raw, headers)
            return
        delay = owner.latency + (owner.sign_latency if split.path.endswith("/sign") else 0.0)
        if delay > 0:
            time.sleep(delay)  # this connection's thread only
        vault = f"https://{self.headers.get('Host') or f'127.0.0.1:{owner.port}'}"
        try:
            status, payload = owner.handle(self.command, split.path, parse_qs(split.query), body, vault)
        except _HttpError as e:
            self._answer(e.status, e.body, e.headers)
            return
        except Exception as e:  # noqa: BLE001 - a stand-in bug must answer, not hang the client
            self._answer(500, {"error": {"code": "InternalError", "message": f"stand-in: {type(e).__name__}: {e}"}})
            return
        self._answer(status, payload)

    def do_GET(self) -> None:  # noqa: N802
        self._serve()

    def do_POST(self) -> None:  # noqa: N802
        self._serve()

    def do_PATCH(self) -> None:  # noqa: N802
        self._serve()

    def do_PUT(self) -> None:  # noqa: N802
        self._serve()

    def do_DELETE(self) -> None:  # noqa: N802
        self._serve()

    def handle_one_request(self) -> None:
        try:
            super().handle_one_request()
        except (ssl.SSLError, ConnectionError, socket.timeout):
            self.close_connection = True
