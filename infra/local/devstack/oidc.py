"""The local Entra ID stand-in: start `infra/local/oidc/server.mjs` and play the user's browser.

    stand_in = start_oidc(state_dir, port)          # real oidc-provider, one issuer per dev tenant
    issuer = stand_in.issuer(stand_in.tenant_id("contoso"))
    ... MSAL: PublicClientApplication(cli_client_id, oidc_authority=issuer, http_client=session)
    complete_device_code(flow["verification_uri"], flow["user_code"], "alice", password_for("alice"),
                         stand_in.ca_path)
    stand_in.stop()

Every HTTP client here uses a Session with trust_env=False (this machine sets REQUESTS_CA_BUNDLE
and may set proxies) and verify=<dev CA>: only 127.0.0.1 is ever contacted.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urljoin, urlparse

import requests

from devstack.devca import DevCA, ensure_dev_ca
from devstack.proc import SLOW_HINT, REPO, Proc, StandInError, require_free, spawn, startup_timeout, wait_for_port

OIDC_DIR = REPO / "infra" / "local" / "oidc"
USERS_JSON = OIDC_DIR / "users.json"
SERVER_MJS = OIDC_DIR / "server.mjs"


class DeviceLoginError(RuntimeError):
    """The browser step of a device-code sign-in did not end on the success page."""


def load_config(path: Path = USERS_JSON) -> dict:
    return json.loads(Path(path).read_text())


def _find_user(config: dict, username: str) -> dict:
    want = username.lower()
    for tid, tenant in config["tenants"].items():
        for u in tenant["users"]:
            if want in (u["username"].lower(), u["preferred_username"].lower()):
                return {**u, "tid": tid, "tenant": tenant["name"]}
    raise KeyError(f"no dev user {username!r} in {USERS_JSON}")


def password_for(username: str) -> str:
    """The dev password of a user from users.json ("alice" or "alice@contoso.test")."""
    return _find_user(load_config(), username)["password"]


def session_for(ca_path: Path | str) -> requests.Session:
    """A requests Session that trusts only the dev CA and ignores proxy/CA environment variables."""
    s = requests.Session()
    s.trust_env = False
    s.verify = str(ca_path)
    return s


@dataclass
class OidcStandIn:
    proc: Proc
    port: int
    ca: DevCA
    config: dict = field(repr=False)
    started_in: float = 0.0
    state_dir: Path = Path(".")
    mi_port: int = 0

    @property
    def ca_path(self) -> Path:
        return self.ca.ca_cert

    @property
    def base_url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def mi_endpoint(self) -> str | None:
        """The managed identity endpoint (App Service protocol) for IDENTITY_ENDPOINT, if started."""
        return f"http://127.0.0.1:{self.mi_port}/msi/token" if self.mi_port else None

    @property
    def mi_header(self) -> str:
        """The secret for IDENTITY_HEADER."""
        return self.config["managed_identity"]["header"]

    def app(self, name: str) -> dict:
        """A workload identity's users.json entry plus "tid" (see infra/local/oidc/workloads.mjs)."""
        for tid, tenant in self.config["tenants"].items():
            for a in tenant.get("apps", ()):
                if a["name"] == name:
                    return {**a, "tid": tid}
        raise KeyError(f"no dev app {name!r}")

    def app_certificate(self, name: str) -> Path:
        """The PEM (private key and certificate) of an app registered with a certificate."""
        return app_cert_dir(self.state_dir) / f"{self.app(name)['client_id']}.key.pem"

    def ci_token(self, subject: str, audience: str = "api://AzureADTokenExchange") -> str:
        """A token from the dev CI issuer (https://127.0.0.1:<port>/ci), as a CI system hands one to a job."""
        r = self.session().post(f"{self.base_url}/ci/token", data={"subject": subject, "audience": audience},
                                headers={"Authorization": f"Bearer {self.config['ci']['request_token']}"}, timeout=10)
        r.raise_for_status()
        return r.json()["value"]

    @property
    def api_client_id(self) -> str:
        return self.config["api"]["client_id"]

    @property
    def cli_client_id(self) -> str:
        return self.config["cli"]["client_id"]

    @property
    def api_scope(self) -> str:
        return f"{self.config['api']['app_id_uri']}/{self.config['api']['scope']}"

    def issuer(self, tid: str) -> str:
        if tid not in self.config["tenants"]:
            tid = self.tenant_id(tid)  # allow "contoso"
        return f"{self.base_url}/{tid}"

    def tenant_id(self, name: str) -> str:
        for tid, tenant in self.config["tenants"].items():
            if tenant["name"] == name:
                return tid
        raise KeyError(f"no dev tenant {name!r}")

    def group_id(self, tenant: str, group: str) -> str:
        tid = tenant if tenant in self.config["tenants"] else self.tenant_id(tenant)
        return self.config["tenants"][tid]["groups"][group]

    def user(self, username: str) -> dict:
        """The user's users.json entry plus "tid" and "tenant" (name)."""
        return _find_user(self.config, username)

    def session(self) -> requests.Session:
        return session_for(self.ca_path)

    def stop(self) -> None:
        self.proc.stop()


def _discovery_ok(session: requests.Session, issuer: str) -> bool:
    try:
        r = session.get(f"{issuer}/.well-known/openid-configuration", timeout=2)
    except requests.RequestException:
        return False
    return r.status_code == 200 and r.json().get("issuer") == issuer


def app_cert_dir(state_dir: Path) -> Path:
    return Path(state_dir) / "oidc" / "app-certs"


def ensure_app_certificates(state_dir: Path, config: dict) -> None:
    """For each dev app registered with a certificate: a self-signed RSA certificate (what an admin
    uploads to the app registration: <client_id>.pem, read by the stand-in) and its private key with
    the certificate (<client_id>.key.pem, what the workload holds). Made once, kept in the state dir."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    d = app_cert_dir(state_dir)
    for tenant in config["tenants"].values():
        for app in tenant.get("apps", ()):
            if not app.get("certificate"):
                continue
            cert_path, key_path = d / f"{app['client_id']}.pem", d / f"{app['client_id']}.key.pem"
            if cert_path.exists() and key_path.exists():
                continue
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
            key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, app["name"])])
            now = dt.datetime.now(dt.timezone.utc)
            cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                    .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
                    .not_valid_after(now + dt.timedelta(days=365)).sign(key, hashes.SHA256()))
            pem = cert.public_bytes(serialization.Encoding.PEM)
            key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption())
            fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(key_pem + pem)
            cert_path.write_bytes(pem)


def start_oidc(state_dir: Path, port: int, *, timeout: float | None = None, env: dict | None = None,
               mi_port: int = 0) -> OidcStandIn:
    """Start the Entra ID stand-in on https://127.0.0.1:<port>/<tid>; returns once discovery answers.
    With `mi_port`, it also serves the managed identity endpoint on http://127.0.0.1:<mi_port>/msi/token."""
    t0 = time.monotonic()
    timeout = startup_timeout() if timeout is None else timeout
    require_free(port, "oidc-provider")
    if mi_port:
        require_free(mi_port, "managed identity endpoint")
    state_dir = Path(state_dir)
    ca = ensure_dev_ca(state_dir)
    config = load_config()
    ensure_app_certificates(state_dir, config)
    node = os.environ.get("NODE", "node")
    argv = [
        node, str(SERVER_MJS),
        "--port", str(port),
        "--state-dir", str(state_dir),
        "--cert", str(ca.server_cert),
        "--key", str(ca.server_key),
        "--users", str(USERS_JSON),
        "--mi-port", str(mi_port),
    ]
    child_env = {**os.environ, **(env or {})}
    child_env.pop("NODE_OPTIONS", None)
    proc = spawn("oidc-provider", argv, state_dir / "logs" / "oidc.log", env=child_env, cwd=REPO)
    try:
        wait_for_port(proc, port, timeout)
        first = next(iter(config["tenants"]))
        issuer = f"https://127.0.0.1:{port}/{first}"
        s = session_for(ca.ca_cert)
        while not _discovery_ok(s, issuer):
            if not proc.alive():
                raise StandInError(f"oidc-provider exited with {proc.popen.returncode}:\n{proc.log_tail()}")
            if time.monotonic() - t0 > timeout:
                raise StandInError(f"oidc-provider discovery at {issuer} did not answer within {timeout:.0f}s. "
                                   f"Its output ({proc.log_path}):\n{proc.log_tail()}\n{SLOW_HINT}")
            time.sleep(0.05)
    except BaseException:
        proc.stop()
        raise
    return OidcStandIn(proc=proc, port=port, ca=ca, config=config, started_in=time.monotonic() - t0,
                       state_dir=state_dir, mi_port=mi_port)


# ---- the "browser" -------------------------------------------------------------------------------


class _Forms(HTMLParser):
    """Collects forms (id, action, method, inputs) and the text of elements with an id."""

    def __init__(self) -> None:
        super().__init__()
        self.forms: list[dict] = []
        self.ids: dict[str, str] = {}
        self._form: dict | None = None
        self._open_id: list[tuple[str, str]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "form":
            self._form = {"id": a.get("id"), "action": a.get("action") or "", "method": (a.get("method") or "get").lower(), "fields": {}}
            self.forms.append(self._form)
        elif tag == "input" and self._form is not None and a.get("name"):
            self._form["fields"][a["name"]] = a.get("value") or ""
        if a.get("id") and tag in ("p", "div", "h1", "span"):
            self._open_id.append((tag, a["id"]))
            self.ids.setdefault(a["id"], "")

    def handle_endtag(self, tag):
        if tag == "form":
            self._form = None
        if self._open_id and self._open_id[-1][0] == tag:
            self._open_id.pop()

    def handle_data(self, data):
        self.text.append(data)
        for _, i in self._open_id:
            self.ids[i] += data


def _parse(html: str) -> _Forms:
    p = _Forms()
    p.feed(html)
    return p


def _form(page: _Forms, form_id: str) -> dict | None:
    return next((f for f in page.forms if f["id"] == form_id), None)


def _describe(resp: requests.Response, page: _Forms) -> str:
    msg = page.ids.get("error") or " ".join(" ".join(page.text).split())[:300]
    return f"HTTP {resp.status_code} at {resp.url}: {msg.strip()}"


def complete_device_code(
    verification_uri: str,
    user_code: str,
    username: str,
    password: str,
    ca_path: Path | str,
    *,
    timeout: float = 10.0,
) -> None:
    """Play the user's browser for a device-code sign-in: enter the code, confirm, sign in, consent.

    `verification_uri` may be the plain verification_uri or verification_uri_complete. Raises
    DeviceLoginError (with the page's error text) unless the provider's success page is reached.
    Only the origin of `verification_uri` is contacted (the stand-in on 127.0.0.1).
    """
    origin = urlparse(verification_uri)
    if origin.hostname not in ("127.0.0.1", "::1", "localhost"):
        raise DeviceLoginError(f"refusing to browse to a non-loopback verification URI: {verification_uri}")
    s = session_for(ca_path)
    s.headers["User-Agent"] = "ezssh-devstack-browser/1"

    def same_origin(url: str) -> str:
        u = urlparse(url)
        if (u.scheme, u.netloc) != (origin.scheme, origin.netloc):
            raise DeviceLoginError(f"unexpected redirect off the stand-in: {url}")
        return url

    def submit(resp: requests.Response, form: dict, extra: dict | None = None) -> requests.Response:
        data = {**form["fields"], **(extra or {})}
        url = same_origin(urljoin(resp.url, form["action"] or resp.url))
        if form["method"] == "post":
            return s.post(url, data=data, timeout=timeout)
        return s.get(url, params=data, timeout=timeout)

    resp = s.get(verification_uri, timeout=timeout)
    for _ in range(10):  # [auto-post] input code -> confirm -> login -> (consent, automatic) -> success
        same_origin(resp.url)
        page = _parse(resp.text)
        if "success" in page.ids:
            return
        if (f := _form(page, "op.deviceInputForm")) is not None:
            if "error" in page.ids and f["fields"].get("user_code"):
                raise DeviceLoginError(f"user code refused: {_describe(resp, page)}")
            resp = submit(resp, f, {"user_code": user_code})
        elif (f := _form(page, "op.deviceConfirmForm")) is not None:
            if f["fields"].get("user_code", "").replace("-", "").upper() != user_code.replace("-", "").upper():
                raise DeviceLoginError(f"confirmation page shows another code than {user_code}")
            resp = submit(resp, f)
        elif len(page.forms) == 1 and "forms[0].submit()" in resp.text:
            resp = submit(resp, page.forms[0])  # auto-submitting page (what a browser's JS would do)
        elif (f := _form(page, "login")) is not None:
            if "error" in page.ids:
                raise DeviceLoginError(f"sign-in refused for {username}: {_describe(resp, page)}")
            resp = submit(resp, f, {"username": username, "password": password})
        else:
            raise DeviceLoginError(f"device sign-in did not succeed: {_describe(resp, page)}")
    raise DeviceLoginError(f"device sign-in did not finish after several pages (last {resp.url})")


class BrowserLoginError(DeviceLoginError):
    """The browser step of an authorization-code sign-in did not reach the app's loopback redirect."""


_LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")


def complete_authorization(
    auth_uri: str,
    username: str,
    password: str,
    ca_path: Path | str,
    *,
    timeout: float = 10.0,
) -> requests.Response:
    """Play the user's browser for an authorization-code sign-in (MSAL acquire_token_interactive):
    open `auth_uri`, sign in, (consent is automatic), and deliver the authorization response to the
    app's loopback redirect URI (a form_post, as MSAL asks for) like a browser's JavaScript would.

    Returns the loopback listener's response. Raises BrowserLoginError (with the page's error text)
    when the stand-in refuses the sign-in or answers with an error instead of a redirect. Only the
    origin of `auth_uri` (the stand-in on 127.0.0.1) and a plain-http loopback listener are contacted;
    `localhost` is dialled as 127.0.0.1 (MSAL's listener binds there).
    """
    origin = urlparse(auth_uri)
    if origin.hostname not in _LOOPBACK_HOSTS:
        raise BrowserLoginError(f"refusing to browse to a non-loopback authorization URI: {auth_uri}")
    s = session_for(ca_path)
    s.headers["User-Agent"] = "ezssh-devstack-browser/1"

    def on_stand_in(url: str) -> bool:
        u = urlparse(url)
        return (u.scheme, u.netloc) == (origin.scheme, origin.netloc)

    def loopback_app(url: str) -> str | None:
        """The URL to dial when `url` is the app's loopback redirect (http, loopback host, a port)."""
        u = urlparse(url)
        if u.scheme != "http" or u.hostname not in _LOOPBACK_HOSTS or not u.port:
            return None
        return u._replace(netloc=f"127.0.0.1:{u.port}").geturl() if u.hostname == "localhost" else url

    def get(url: str) -> requests.Response:
        # Follow redirects by hand: the last hop may leave the stand-in for the loopback app.
        for _ in range(10):
            resp = s.get(url, timeout=timeout, allow_redirects=False)
            if resp.is_redirect:
                nxt = urljoin(resp.url, resp.headers["Location"])
                if not on_stand_in(nxt):
                    app = loopback_app(nxt)
                    if app is None:
                        raise BrowserLoginError(f"unexpected redirect off the stand-in: {nxt}")
                    return s.get(app, timeout=timeout, allow_redirects=False)  # response_mode=query
                url = nxt
                continue
            return resp
        raise BrowserLoginError(f"too many redirects from {url}")

    def submit(resp: requests.Response, form: dict, extra: dict | None = None) -> requests.Response:
        data = {**form["fields"], **(extra or {})}
        url = urljoin(resp.url, form["action"] or resp.url)
        if not on_stand_in(url):
            raise BrowserLoginError(f"form posts off the stand-in: {url}")
        if form["method"] != "post":
            return get(f"{url}?{requests.compat.urlencode(data)}")
        r = s.post(url, data=data, timeout=timeout, allow_redirects=False)
        return get(urljoin(r.url, r.headers["Location"])) if r.is_redirect else r

    resp = get(auth_uri)
    for _ in range(10):  # login -> (consent, automatic) -> form_post to the app
        if not on_stand_in(resp.url):
            return resp  # the app's loopback listener answered (a query-mode redirect)
        page = _parse(resp.text)
        if (f := _form(page, "login")) is not None:
            if "error" in page.ids:
                raise BrowserLoginError(f"sign-in refused for {username}: {_describe(resp, page)}")
            resp = submit(resp, f, {"username": username, "password": password})
        elif len(page.forms) == 1 and "forms[0].submit()" in resp.text:
            f = page.forms[0]
            target = urljoin(resp.url, f["action"] or resp.url)
            if on_stand_in(target):
                resp = submit(resp, f)
                continue
            app = loopback_app(target)
            if app is None or f["method"] != "post":
                raise BrowserLoginError(f"authorization response goes to an unexpected place: {target}")
            if "error" in f["fields"]:  # still deliver it (the app reports it), but say so
                s.post(app, data=f["fields"], timeout=timeout)
                raise BrowserLoginError(f"the stand-in answered with an error: {f['fields'].get('error')}: "
                                        f"{f['fields'].get('error_description', '')}")
            return s.post(app, data=f["fields"], timeout=timeout)  # response_mode=form_post
        else:
            raise BrowserLoginError(f"browser sign-in did not succeed: {_describe(resp, page)}")
    raise BrowserLoginError(f"browser sign-in did not finish after several pages (last {resp.url})")


def sign_in(oidc: OidcStandIn, username: str, scopes: list[str] | None = None) -> dict:
    """A real MSAL device-code sign-in as a dev user, with this module playing the browser.
    Returns MSAL's token response (access_token, id_token_claims, ...)."""
    import threading

    import msal

    user = oidc.user(username)
    app = msal.PublicClientApplication(oidc.cli_client_id, oidc_authority=oidc.issuer(user["tid"]),
                                       http_client=session_for(oidc.ca_path))
    flow = app.initiate_device_flow(scopes=scopes or [oidc.api_scope])
    errors: list[BaseException] = []

    def browser() -> None:
        try:
            complete_device_code(flow["verification_uri"], flow["user_code"], username, password_for(username),
                                 oidc.ca_path)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
            flow["expires_at"] = 0  # stop MSAL's polling

    t = threading.Thread(target=browser)
    t.start()
    result = app.acquire_token_by_device_flow(flow)
    t.join()
    if errors:
        raise errors[0]
    if "access_token" not in result:
        raise DeviceLoginError(f"sign-in as {username} failed: {result.get('error_description') or result}")
    return result
