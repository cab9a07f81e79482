"""HTTP to the ezssh service, over the standard library's http.client (requests is slow to import;
it is loaded only for MSAL, and for the service when a proxy applies to it).

Every failure is mapped here, once, to an EzsshError with a documented exit code:
401 (after one forced token refresh) -> 3, 403 -> 4, 5xx / connection / timeout -> 6, other -> 1.
The service's error body `{error, message, request_id}` is shown in the CLI's words.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode, urlsplit

from .errors import DENIED, ERROR, NOT_SIGNED_IN, UNAVAILABLE, USAGE, EzsshError

if TYPE_CHECKING:
    import ssl

    import requests

TIMEOUT = 30.0
CONNECT_TIMEOUT = 5.0
USER_AGENT = "ezssh-cli"


def is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host.lower() == "localhost":
        return True
    import ipaddress

    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_server_url(url: str) -> str:
    """Normalise a server URL; refuse plain http:// unless the host is loopback, and a path ending in /api."""
    url = url.strip().rstrip("/")
    u = urlsplit(url)
    if u.scheme not in ("https", "http") or not u.hostname:
        raise EzsshError(
            f"{url!r} is not an http(s) URL.", USAGE, hint="Give the service's address, e.g. https://ezssh.example.com"
        )
    if u.scheme == "http" and not is_loopback(u.hostname):
        raise EzsshError(
            f"Refusing plain http:// for {u.hostname}: use https:// (http is allowed only on loopback).", USAGE
        )
    if u.query or u.fragment:
        raise EzsshError(f"{url!r}: the server URL takes no query or fragment.", USAGE)
    if u.path.rstrip("/").endswith("/api"):
        base = url[: -len("/api")]
        raise EzsshError(
            f"{url!r} ends in /api, but ezssh adds /api itself.",
            USAGE,
            hint=f"Use the service's base URL: ezssh configure --server {base}",
        )
    return url


# ---- transport -------------------------------------------------------------------------------------


class Response:
    """What callers read of an answer: status_code, reason, headers (case-insensitive get), text, json()."""

    def __init__(self, status: int, reason: str, headers: dict[str, str], content: bytes) -> None:
        self.status_code = status
        self.reason = reason
        self.headers = _Headers(headers)
        self.content = content

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", errors="replace")

    def json(self) -> Any:
        return json.loads(self.content or b"null")


class _Headers(dict):
    def __init__(self, items: dict[str, str]) -> None:
        super().__init__({k.lower(): v for k, v in items.items()})

    def get(self, key: str, default: Any = None) -> Any:
        return super().get(key.lower(), default)


def _proxied(url: str) -> bool:
    """Whether a proxy variable applies to `url` (then requests, which honours them, carries it)."""
    u = urlsplit(url)
    if is_loopback(u.hostname):
        return False
    names = ("https_proxy", "all_proxy") if u.scheme == "https" else ("http_proxy", "all_proxy")
    if not any(os.environ.get(n) or os.environ.get(n.upper()) for n in names):
        return False
    no_proxy = (os.environ.get("no_proxy") or os.environ.get("NO_PROXY") or "").replace(" ", "")
    host = (u.hostname or "").lower()
    for entry in filter(None, no_proxy.split(",")):
        entry = entry.lower().lstrip(".")
        if entry == "*" or host == entry or host.endswith("." + entry):
            return False
    return True


class Transport:
    """One connection per call to the service over http.client; `ca_bundle`, when given, is the only
    trust for https (as `ezssh configure --ca-bundle` promises)."""

    def __init__(self, ca_bundle: str | None = None) -> None:
        self.ca_bundle = ca_bundle
        self._ssl: ssl.SSLContext | None = None
        self._requests: requests.Session | None = None

    def _context(self) -> ssl.SSLContext:
        if self._ssl is None:
            import ssl

            self._ssl = (
                ssl.create_default_context(cafile=self.ca_bundle) if self.ca_bundle else ssl.create_default_context()
            )
        return self._ssl

    def request(self, method: str, url: str, headers: dict[str, str], body: bytes | None) -> Response:
        if _proxied(url) and not self.ca_bundle:
            return self._via_requests(method, url, headers, body)
        import http.client

        u = urlsplit(url)
        if not u.hostname:
            raise EzsshError(f"No host in the service address {url!r}.", USAGE)
        path = (u.path or "/") + (f"?{u.query}" if u.query else "")
        conn: http.client.HTTPConnection
        if u.scheme == "https":
            conn = http.client.HTTPSConnection(u.hostname, u.port, timeout=CONNECT_TIMEOUT, context=self._context())
        else:
            conn = http.client.HTTPConnection(u.hostname, u.port, timeout=CONNECT_TIMEOUT)
        try:
            conn.connect()
            conn.sock.settimeout(TIMEOUT)
            conn.request(method, path, body=body, headers={"User-Agent": USER_AGENT, **headers})
            r = conn.getresponse()
            return Response(r.status, r.reason, dict(r.getheaders()), r.read())
        finally:
            conn.close()

    def _via_requests(self, method: str, url: str, headers: dict[str, str], body: bytes | None) -> Response:
        import requests

        if self._requests is None:
            self._requests = requests.Session()
            self._requests.headers["User-Agent"] = USER_AGENT
        r = self._requests.request(method, url, headers=headers, data=body, timeout=(CONNECT_TIMEOUT, TIMEOUT))
        return Response(r.status_code, r.reason or "", dict(r.headers), r.content)


def make_session(ca_bundle: str | None, server: str | None = None) -> requests.Session:
    """A requests Session for MSAL (the identity provider).

    With a CA bundle, the session trusts exactly that bundle and ignores the environment
    (REQUESTS_CA_BUNDLE would otherwise silently override `session.verify`, and proxies do not apply
    to loopback stand-ins). Without one, system trust and the usual proxy variables apply, except for
    a loopback server.
    """
    import requests

    s = requests.Session()
    s.headers["User-Agent"] = USER_AGENT
    if ca_bundle:
        s.trust_env = False
        s.verify = ca_bundle
    elif server and is_loopback(urlsplit(server).hostname):
        s.trust_env = False
    return s


# ---- errors in the CLI's words ----------------------------------------------------------------------


# the service's field names as the CLI's options and words
_FIELD_WORDS = {"ttl_seconds": "--ttl", "principal": "the login", "public_key": "the public key"}


def _whole(d: dict, *keys: str) -> bool:
    return all(isinstance(d.get(k), int) and not isinstance(d.get(k), bool) for k in keys)


def in_cli_words(code: str | None, message: str, details: dict) -> str:
    """The service's error in the CLI's words, formatted from its code and details (the service
    names API fields and counts seconds; the CLI says --ttl and 1d1h); its message as sent otherwise."""
    from .durations import fmt_duration as fmt

    d = details
    if code == "ttl_too_long" and _whole(d, "requested", "max_ttl") and isinstance(d.get("policy"), str):
        return f"--ttl {fmt(d['requested'])} is over policy {d['policy']!r}'s maximum of {fmt(d['max_ttl'])}."
    if d.get("field") == "ttl_seconds" and _whole(d, "min", "max"):
        return f"--ttl must be between {fmt(d['min'])} and {fmt(d['max'])}."
    if d.get("field") == "ttl_seconds" and _whole(d, "min"):
        return f"--ttl must be a whole number of at least {d['min']}."
    if code in ("too_many_requests", "too_many_pending") and _whole(d, "retry_after"):
        return message.replace(f"{d['retry_after']} seconds", fmt(d["retry_after"]))
    named = str(d.get("fields") or d.get("field") or "")
    for field in filter(None, named.split(",")):
        word = _FIELD_WORDS.get(field)
        if word is not None:
            message = message.replace(f"'{field}'", word)
            if message.startswith(f"{field} "):
                message = word[0].upper() + word[1:] + message[len(field) :]
    return message


def _error_from(resp: Response) -> EzsshError:
    body: Any = None
    try:
        body = resp.json()
    except ValueError:
        pass
    code = body.get("error") if isinstance(body, dict) else None
    message = body.get("message") if isinstance(body, dict) else None
    rid = (body.get("request_id") if isinstance(body, dict) else None) or resp.headers.get("x-request-id")
    status = resp.status_code
    if not message:
        text = (resp.text or "").strip().splitlines()
        message = f"HTTP {status} {resp.reason or ''}".strip() + (f": {text[0][:200]}" if text else "")
    hint = "Run `ezssh login`." if status == 401 else None
    if status == 404 and not code:
        hint = "Is the server URL the service's base URL (`ezssh configure --server URL`, without /api)?"
    if status == 401:
        exit_code = NOT_SIGNED_IN
    elif status == 403:
        exit_code = DENIED
    elif status >= 500:
        exit_code = UNAVAILABLE
    else:
        exit_code = ERROR
    details = body if isinstance(body, dict) and code else {}
    return EzsshError(in_cli_words(code, message, details), exit_code, request_id=rid, error=code, hint=hint)


def send(transport: Transport, method: str, url: str, *, headers: dict | None = None, body: Any = None) -> Response:
    data = None
    hdrs = dict(headers or {})
    if body is not None:
        data = json.dumps(body).encode()
        hdrs["Content-Type"] = "application/json"
    try:
        return transport.request(method, url, hdrs, data)
    except EzsshError:
        raise
    except Exception as exc:  # one mapping for every transport failure
        raise _connection_error(url, exc) from None


def _connection_error(url: str, exc: BaseException) -> EzsshError:
    text = str(exc)
    scheme = urlsplit(url).scheme
    if "WRONG_VERSION_NUMBER" in text or "wrong version number" in text:
        return EzsshError(
            f"{url} does not answer with TLS (the server speaks plain HTTP there).",
            UNAVAILABLE,
            hint="On loopback use http:// (`ezssh configure --server http://...`); elsewhere check the port.",
        )
    if "CERTIFICATE_VERIFY_FAILED" in text or type(exc).__name__ in ("SSLCertVerificationError", "SSLError"):
        return EzsshError(
            f"TLS verification failed for {url}: {text.splitlines()[0] if text else type(exc).__name__}",
            UNAVAILABLE,
            hint="Pass the service's CA with `ezssh configure --ca-bundle PEM`.",
        )
    if scheme == "http" and type(exc).__name__ in ("RemoteDisconnected", "BadStatusLine", "ConnectionResetError"):
        return EzsshError(
            f"{url} closed the connection without an HTTP answer.",
            UNAVAILABLE,
            hint="Does it speak https? Try `ezssh configure --server https://...`.",
        )
    if isinstance(exc, TimeoutError) or type(exc).__name__ in ("timeout", "Timeout", "ReadTimeout", "ConnectTimeout"):
        return EzsshError(f"Cannot reach {url}: timed out.", UNAVAILABLE)
    why = type(exc).__name__
    if isinstance(exc, OSError) and exc.strerror:
        why = exc.strerror.lower()
    return EzsshError(f"Cannot reach {url}: {why}.", UNAVAILABLE)


def fetch_client_config(transport: Transport, server: str) -> dict:
    resp = send(transport, "GET", f"{server}/api/client-config")
    if resp.status_code != 200:
        raise _error_from(resp)
    try:
        cfg = resp.json()
    except ValueError:
        raise EzsshError(f"{server}/api/client-config did not return JSON; is this an ezssh service?") from None
    if not isinstance(cfg, dict):
        raise EzsshError(f"{server}/api/client-config did not return an object; is this an ezssh service?")
    missing = [k for k in ("authority", "client_id", "scopes") if not cfg.get(k)]
    if missing:
        raise EzsshError(f"{server}/api/client-config lacks {', '.join(missing)}.")
    return cfg


class Api:
    """Authenticated calls. `token(force_refresh)` returns a bearer token (signing in if allowed)."""

    def __init__(self, server: str, transport: Transport, token: Callable[[bool], str]) -> None:
        self.server = server.rstrip("/")
        self.transport = transport
        self._token = token
        self.bearer: str | None = None  # the token of the last call: whom the service answered

    def call(
        self,
        method: str,
        path: str,
        *,
        body: dict | None = None,
        params: dict | None = None,
        ok: tuple[int, ...] = (200, 201, 202),
        headers: dict | None = None,
    ) -> Response:
        url = f"{self.server}{path}"
        if params:
            url += ("&" if "?" in url else "?") + urlencode(params)
        for attempt in (0, 1):
            self.bearer = self._token(attempt == 1)
            hdrs = {**(headers or {}), "Authorization": f"Bearer {self.bearer}"}
            resp = send(self.transport, method, url, headers=hdrs, body=body)
            if resp.status_code == 401 and attempt == 0:
                continue  # one silent refresh, then give up with exit 3
            break
        if resp.status_code not in ok:
            raise _error_from(resp)
        return resp

    def json(self, method: str, path: str, **kw: Any) -> tuple[int, dict]:
        resp = self.call(method, path, **kw)
        try:
            return resp.status_code, resp.json()
        except ValueError:
            raise EzsshError(f"{method} {path} returned HTTP {resp.status_code} without JSON.", UNAVAILABLE) from None

    def pages(self, path: str, key: str, params: dict[str, str], *, follow: bool) -> tuple[list, str | None]:
        """GET a paginated list: its items under `key`, and the token of the page after (None at the
        end). With `follow`, every page, passing each `next` back as `continuation`."""
        items: list = []
        params = dict(params)
        while True:
            _, data = self.json("GET", path, params=params)
            items += data.get(key) or []
            token = data.get("next")
            if not (follow and token):
                return items, token
            params["continuation"] = token
