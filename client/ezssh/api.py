"""HTTP to the ezssh service (requests). Imported only by commands that talk to the network.

Every failure is mapped here, once, to an EzsshError with a documented exit code:
401 (after one forced token refresh) -> 3, 403 -> 4, 5xx / connection / timeout -> 6, other -> 1.
The service's error body `{error, message, request_id}` is shown as it came.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Callable
from urllib.parse import urlparse

import requests

from .errors import DENIED, ERROR, NOT_SIGNED_IN, UNAVAILABLE, EzsshError

TIMEOUT = (5, 30)  # connect, read
USER_AGENT = "ezssh-cli"


def is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_server_url(url: str) -> str:
    """Normalise a server URL; refuse plain http:// unless the host is loopback."""
    url = url.strip().rstrip("/")
    u = urlparse(url)
    if u.scheme not in ("https", "http") or not u.hostname:
        raise EzsshError(f"{url!r} is not an http(s) URL.", 2)
    if u.scheme == "http" and not is_loopback(u.hostname):
        raise EzsshError(f"Refusing plain http:// for {u.hostname}: use https:// (http is allowed only on loopback).", 2)
    if u.query or u.fragment:
        raise EzsshError(f"{url!r}: the server URL takes no query or fragment.", 2)
    return url


def make_session(ca_bundle: str | None, server: str | None = None) -> requests.Session:
    """One Session for the service and the identity provider.

    With a CA bundle, the session trusts exactly that bundle and ignores the environment
    (REQUESTS_CA_BUNDLE would otherwise silently override `session.verify`, and proxies do not apply
    to loopback stand-ins). Without one, system trust and the usual proxy variables apply, except for
    a loopback server.
    """
    s = requests.Session()
    s.headers["User-Agent"] = USER_AGENT
    if ca_bundle:
        s.trust_env = False
        s.verify = ca_bundle
    elif server and is_loopback(urlparse(server).hostname):
        s.trust_env = False
    return s


def _error_from(resp: requests.Response) -> EzsshError:
    body: Any = None
    try:
        body = resp.json()
    except ValueError:
        pass
    code = body.get("error") if isinstance(body, dict) else None
    message = body.get("message") if isinstance(body, dict) else None
    rid = (body.get("request_id") if isinstance(body, dict) else None) or resp.headers.get("x-request-id")
    if not message:
        text = (resp.text or "").strip().splitlines()
        message = f"HTTP {resp.status_code} {resp.reason or ''}".strip() + (f": {text[0][:200]}" if text else "")
    status = resp.status_code
    if status == 401:
        exit_code = NOT_SIGNED_IN
    elif status == 403:
        exit_code = DENIED
    elif status >= 500:
        exit_code = UNAVAILABLE
    else:
        exit_code = ERROR
    hint = "Run `ezssh login`." if status == 401 else None
    return EzsshError(message, exit_code, request_id=rid, error=code, hint=hint)


def _send(session: requests.Session, method: str, url: str, **kw: Any) -> requests.Response:
    try:
        return session.request(method, url, timeout=TIMEOUT, **kw)
    except requests.exceptions.SSLError as exc:
        raise EzsshError(f"TLS verification failed for {url}: {exc}", UNAVAILABLE,
                         hint="Pass the service's CA with `ezssh configure --ca-bundle PEM`.") from None
    except (requests.ConnectionError, requests.Timeout) as exc:
        raise EzsshError(f"Cannot reach {url}: {type(exc).__name__}.", UNAVAILABLE) from None
    except requests.RequestException as exc:
        raise EzsshError(f"Request to {url} failed: {exc}", UNAVAILABLE) from None


def fetch_client_config(session: requests.Session, server: str) -> dict:
    resp = _send(session, "GET", f"{server}/api/client-config")
    if resp.status_code != 200:
        raise _error_from(resp)
    try:
        cfg = resp.json()
    except ValueError:
        raise EzsshError(f"{server}/api/client-config did not return JSON; is this an ezssh service?") from None
    missing = [k for k in ("authority", "client_id", "scopes") if not cfg.get(k)]
    if missing:
        raise EzsshError(f"{server}/api/client-config lacks {', '.join(missing)}.")
    return cfg


class Api:
    """Authenticated calls. `token(force_refresh)` returns a bearer token (signing in if allowed)."""

    def __init__(self, server: str, session: requests.Session, token: Callable[[bool], str]) -> None:
        self.server = server.rstrip("/")
        self.session = session
        self._token = token

    def call(self, method: str, path: str, *, body: dict | None = None, params: dict | None = None,
             ok: tuple[int, ...] = (200, 201, 202), headers: dict | None = None) -> requests.Response:
        url = f"{self.server}{path}"
        kw: dict[str, Any] = {}
        if body is not None:
            kw["json"] = body
        if params:
            kw["params"] = params
        for attempt in (0, 1):
            hdrs = {**(headers or {}), "Authorization": f"Bearer {self._token(attempt == 1)}"}
            resp = _send(self.session, method, url, headers=hdrs, **kw)
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
