"""Contract tests for the local Entra ID stand-in (infra/local/oidc/server.mjs, real oidc-provider).

The provider is started once for the module on a free port in a temporary state dir. MSAL is driven
exactly as the CLI will drive it: `oidc_authority=<issuer>` (never `authority=`, which would make MSAL
call Microsoft), an HTTP session that trusts only the dev CA and ignores the environment.
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import pytest

from tests.realparts import unavailable

try:
    import devstack  # noqa: F401
except ImportError:  # pytest.ini normally puts infra/local on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "infra" / "local"))

import jwt
import msal
import requests

from devstack.oidc import DeviceLoginError, OidcStandIn, complete_device_code, password_for, start_oidc
from devstack.proc import StandInError, free_port

API_SCOPE = "api://ezssh/access_as_user"


@pytest.fixture(scope="module")
def oidc(tmp_path_factory) -> OidcStandIn:
    state = tmp_path_factory.mktemp("oidc-state")
    try:
        stand_in = start_oidc(state, free_port())
    except (StandInError, OSError) as exc:
        unavailable(f"Entra ID stand-in did not start: {exc}")
    yield stand_in
    stand_in.stop()


@pytest.fixture()
def session(oidc) -> requests.Session:
    s = oidc.session()
    yield s
    s.close()


def _app(oidc: OidcStandIn, tenant: str, session: requests.Session) -> msal.PublicClientApplication:
    return msal.PublicClientApplication(
        oidc.cli_client_id,
        oidc_authority=oidc.issuer(oidc.tenant_id(tenant)),
        http_client=session,
    )


def _device_login(app, oidc: OidcStandIn, username: str, password: str | None = None) -> dict:
    """MSAL device flow; the browser part runs in a thread as the user would, in parallel to polling."""
    flow = app.initiate_device_flow(scopes=[API_SCOPE])
    assert "user_code" in flow, flow
    errors: list[BaseException] = []

    def browse():
        try:
            complete_device_code(
                flow["verification_uri"], flow["user_code"], username,
                password if password is not None else password_for(username), oidc.ca_path,
            )
        except BaseException as exc:  # noqa: BLE001 - surfaced below
            errors.append(exc)
            flow["expires_at"] = 0  # stop MSAL's polling loop

    t = threading.Thread(target=browse, daemon=True)
    t.start()
    result = app.acquire_token_by_device_flow(flow)
    t.join(30)
    if errors:
        raise errors[0]
    return result


def _verify(oidc: OidcStandIn, session: requests.Session, tenant: str, token: str) -> dict:
    issuer = oidc.issuer(oidc.tenant_id(tenant))
    disco = session.get(f"{issuer}/.well-known/openid-configuration", timeout=5).json()
    jwks = session.get(disco["jwks_uri"], timeout=5).json()
    header = jwt.get_unverified_header(token)
    assert header["alg"] == "RS256"
    key = jwt.PyJWKSet.from_dict(jwks)[header["kid"]]
    return jwt.decode(
        token,
        key=key,
        algorithms=["RS256"],
        audience=oidc.api_client_id,
        issuer=issuer,
        options={"require": ["exp", "iat", "iss", "aud", "sub"]},
    )


# ---- 1. discovery -----------------------------------------------------------------------------


@pytest.mark.parametrize("tenant", ["contoso", "fabrikam"])
def test_discovery_per_tenant(oidc, session, tenant):
    tid = oidc.tenant_id(tenant)
    issuer = f"https://127.0.0.1:{oidc.port}/{tid}"
    assert oidc.issuer(tid) == issuer
    r = session.get(f"{issuer}/.well-known/openid-configuration", timeout=5)
    assert r.status_code == 200
    d = r.json()
    assert d["issuer"] == issuer
    assert d["device_authorization_endpoint"] == f"{issuer}/device/auth"
    for key in ("token_endpoint", "jwks_uri", "authorization_endpoint", "userinfo_endpoint"):
        assert d[key].startswith(issuer + "/"), (key, d[key])
    assert "urn:ietf:params:oauth:grant-type:device_code" in d["grant_types_supported"]
    jwks = session.get(d["jwks_uri"], timeout=5).json()
    assert jwks["keys"] and all(k["kty"] == "RSA" and "d" not in k for k in jwks["keys"])


def test_unknown_tenant_is_404(oidc, session):
    r = session.get(f"{oidc.base_url}/00000000-0000-4000-8000-000000000000/.well-known/openid-configuration", timeout=5)
    assert r.status_code == 404


# ---- 2. MSAL device flow end to end -----------------------------------------------------------


def test_msal_device_flow_jwt_claims_and_refresh(oidc, session):
    app = _app(oidc, "contoso", session)
    t0 = time.monotonic()
    result = _device_login(app, oidc, "alice")
    elapsed = time.monotonic() - t0
    assert "access_token" in result, result
    assert elapsed < 15, f"device login took {elapsed:.1f}s"

    alice = oidc.user("alice")
    tid = oidc.tenant_id("contoso")
    claims = _verify(oidc, session, "contoso", result["access_token"])
    assert claims["iss"] == oidc.issuer(tid)
    assert claims["aud"] == oidc.api_client_id
    assert claims["tid"] == tid == alice["tid"]
    assert claims["oid"] == alice["oid"]
    assert claims["sub"] != alice["oid"]  # pairwise, as in Entra: consumers must key on oid
    assert claims["preferred_username"] == "alice@contoso.test"
    assert claims["name"] == alice["name"]
    assert claims["groups"] == alice["groups"] == [oidc.group_id("contoso", "ezssh-users")]
    assert claims.get("roles", []) == alice["roles"] == []  # Entra omits empty roles
    assert claims["scp"] == "access_as_user"
    assert claims["azp"] == oidc.cli_client_id
    assert claims["ver"] == "2.0"
    assert claims["exp"] - claims["iat"] == 3600
    assert abs(claims["iat"] - time.time()) < 60

    # ID token and the account MSAL records
    idc = result["id_token_claims"]
    assert (idc["tid"], idc["oid"], idc["preferred_username"], idc["name"]) == (
        tid, alice["oid"], alice["preferred_username"], alice["name"])
    assert idc["aud"] == oidc.cli_client_id
    [account] = app.get_accounts()
    assert account["home_account_id"] == f"{alice['oid']}.{tid}"
    assert account["username"] == "alice@contoso.test"
    assert "refresh_token" in result

    # cached, then a real refresh through the refresh token
    cached = app.acquire_token_silent([API_SCOPE], account=account)
    assert cached and cached["access_token"] == result["access_token"]
    refreshed = app.acquire_token_silent([API_SCOPE], account=account, force_refresh=True)
    assert refreshed and "access_token" in refreshed, refreshed
    assert refreshed["access_token"] != result["access_token"]
    again = _verify(oidc, session, "contoso", refreshed["access_token"])
    assert (again["oid"], again["tid"], again["scp"], again["groups"]) == (
        claims["oid"], claims["tid"], claims["scp"], claims["groups"])


def test_roles_and_groups_of_other_users(oidc, session):
    app = _app(oidc, "contoso", session)
    result = _device_login(app, oidc, "carol@contoso.test")
    claims = _verify(oidc, session, "contoso", result["access_token"])
    carol = oidc.user("carol")
    assert claims["oid"] == carol["oid"]
    assert claims["roles"] == ["EZSSH.Admin"]
    assert claims["groups"] == [oidc.group_id("contoso", "ezssh-admins")]


# ---- 3. wrong password ------------------------------------------------------------------------


def test_wrong_password_is_refused(oidc, session):
    app = _app(oidc, "contoso", session)
    flow = app.initiate_device_flow(scopes=[API_SCOPE])
    with pytest.raises(DeviceLoginError, match="incorrect"):
        complete_device_code(flow["verification_uri_complete"], flow["user_code"], "alice", "not-the-password", oidc.ca_path)
    # the device code was not completed: one poll says so
    pending = app.acquire_token_by_device_flow(flow, exit_condition=lambda f: True)
    assert pending.get("error") == "authorization_pending", pending
    assert "access_token" not in pending


def test_user_of_another_tenant_is_refused(oidc, session):
    app = _app(oidc, "fabrikam", session)
    flow = app.initiate_device_flow(scopes=[API_SCOPE])
    with pytest.raises(DeviceLoginError, match="incorrect"):
        complete_device_code(flow["verification_uri"], flow["user_code"], "alice", password_for("alice"), oidc.ca_path)


def test_wrong_user_code_is_refused(oidc):
    issuer = oidc.issuer(oidc.tenant_id("contoso"))
    with pytest.raises(DeviceLoginError, match="incorrect"):
        complete_device_code(f"{issuer}/device", "BCDF-GHJK", "alice", password_for("alice"), oidc.ca_path)


# ---- 4. second tenant -------------------------------------------------------------------------


def test_fabrikam_token(oidc, session):
    app = _app(oidc, "fabrikam", session)
    result = _device_login(app, oidc, "mallory")
    fab = oidc.tenant_id("fabrikam")
    claims = _verify(oidc, session, "fabrikam", result["access_token"])
    assert claims["iss"] == oidc.issuer(fab) == f"https://127.0.0.1:{oidc.port}/{fab}"
    assert claims["tid"] == fab != oidc.tenant_id("contoso")
    assert claims["oid"] == oidc.user("mallory")["oid"]
    assert claims["roles"] == ["EZSSH.Admin"]
    # a fabrikam token does not verify as a contoso token
    with pytest.raises(jwt.InvalidIssuerError):
        _verify(oidc, session, "contoso", result["access_token"])


# ---- 3. authorization code + PKCE on a loopback redirect (ezssh login --browser) -------------------


class _Loopback:
    """The app's loopback redirect listener: records the form_post it receives."""

    def __init__(self) -> None:
        from http.server import BaseHTTPRequestHandler, HTTPServer
        from urllib.parse import parse_qsl

        self.received: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", 0))).decode()
                outer.received.append(dict(parse_qsl(body)))
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *a):
                pass

        self.httpd = HTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.port = self.httpd.server_address[1]

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def test_msal_auth_code_with_pkce_on_any_loopback_port(oidc, session):
    from devstack.oidc import complete_authorization

    app = _app(oidc, "contoso", session)
    for host in ("localhost", "127.0.0.1"):
        listener = _Loopback()
        try:
            flow = app.initiate_auth_code_flow([API_SCOPE], redirect_uri=f"http://{host}:{listener.port}",
                                               response_mode="form_post")
            assert "code_challenge=" in flow["auth_uri"]
            resp = complete_authorization(flow["auth_uri"], "alice", password_for("alice"), oidc.ca_path)
            assert resp.status_code == 200
        finally:
            listener.stop()
        assert len(listener.received) == 1 and "code" in listener.received[0], listener.received
        result = app.acquire_token_by_auth_code_flow(flow, listener.received[0])
        assert "access_token" in result, result
        claims = _verify(oidc, session, "contoso", result["access_token"])
        assert claims["oid"] == oidc.user("alice")["oid"] and claims["scp"] == "access_as_user"
        assert result["id_token_claims"]["preferred_username"] == "alice@contoso.test"


def test_auth_code_requires_pkce_and_a_loopback_redirect(oidc, session):
    from urllib.parse import parse_qs, urlencode, urlparse

    issuer = oidc.issuer(oidc.tenant_id("contoso"))
    base = {"client_id": oidc.cli_client_id, "response_type": "code", "scope": f"openid {API_SCOPE}"}
    # Without PKCE: the error goes back to the (valid) loopback redirect URI.
    r = session.get(f"{issuer}/auth?" + urlencode({**base, "redirect_uri": "http://localhost:5555"}),
                    allow_redirects=False, timeout=5)
    assert r.status_code in (302, 303), r.text
    assert urlparse(r.headers["Location"]).port == 5555
    assert parse_qs(urlparse(r.headers["Location"]).query)["error"] == ["invalid_request"]
    assert "PKCE" in parse_qs(urlparse(r.headers["Location"]).query)["error_description"][0]
    # A redirect URI that is not loopback (or not http) is refused without redirecting anywhere.
    pkce = {"code_challenge": "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM", "code_challenge_method": "S256"}
    for bad in ("http://evil.example:5555", "https://localhost:5555"):
        r = session.get(f"{issuer}/auth?" + urlencode({**base, **pkce, "redirect_uri": bad}),
                        allow_redirects=False, timeout=5)
        assert r.status_code == 400 and "redirect_uri" in r.text, (bad, r.status_code, r.text[:300])
