"""Sign-in with MSAL (device code flow or the browser: authorization code + PKCE) and the persisted token cache (msal-extensions).

Imported lazily: only commands that need a token load msal. For the local/OIDC identity provider
(`authority_type == "oidc"`) MSAL is given `oidc_authority=` (never `authority=`, which would make
it contact Microsoft) and the shared requests Session (trusting only the configured CA bundle).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import msal
import requests

from .errors import NOT_SIGNED_IN, UNAVAILABLE, EzsshError, not_signed_in
from .home import HTTP_CACHE, TOKEN_CACHE, write_private
from .tokens import claims as jwt_claims


def token_cache(home: Path):
    """(PersistedTokenCache, description). Encrypted where the platform offers it, else a 0600 file."""
    from msal_extensions import FilePersistence, PersistedTokenCache, build_encrypted_persistence

    location = str(home / TOKEN_CACHE)
    persistence = None
    why = ""
    if os.environ.get("EZSSH_PLAINTEXT_TOKEN_CACHE") != "1":
        try:
            persistence = build_encrypted_persistence(location)
        except Exception as exc:  # any failure means: no encrypted store here
            why = _no_encrypted_store(exc)
    else:
        why = "EZSSH_PLAINTEXT_TOKEN_CACHE=1"
    if persistence is not None:
        kind = {
            "LibsecretPersistence": "libsecret",
            "KeychainPersistence": "macOS keychain",
            "FilePersistenceWithDataProtection": "Windows DPAPI",
        }.get(type(persistence).__name__, type(persistence).__name__)
        desc = f"encrypted ({kind})"
    else:
        persistence = FilePersistence(location)
        desc = f"plaintext file {location} (mode 0600; no encrypted store: {why})"
    if os.path.exists(location):
        os.chmod(location, 0o600)
    return PersistedTokenCache(persistence), desc


def _no_encrypted_store(exc: Exception) -> str:
    """Why msal-extensions found no encrypted store, in words (not its ImportError)."""
    text = str(exc)
    if isinstance(exc, ImportError) and "'gi'" in text:
        return (
            "libsecret is not reachable from this Python: its bindings (PyGObject, module gi) are not "
            "installed here; EZSSH_PLAINTEXT_TOKEN_CACHE=1 keeps the file without this note"
        )
    return f"{type(exc).__name__}: {text}".splitlines()[0][:120]


class Auth:
    def __init__(self, cfg: dict, home: Path, session: requests.Session) -> None:
        self.cfg = cfg
        self.home = home
        self.session = session
        self.scopes = list(cfg["scopes"])
        self.cache, self.cache_desc = token_cache(home)
        self._app: msal.PublicClientApplication | None = None

    @property
    def app(self) -> msal.PublicClientApplication:
        if self._app is None:
            kw = dict(http_client=self.session, token_cache=self.cache, http_cache=self._http_cache())
            try:
                if self.cfg.get("authority_type", "entra") == "oidc":
                    self._app = msal.PublicClientApplication(
                        self.cfg["client_id"], oidc_authority=self.cfg["authority"], **kw
                    )
                else:
                    self._app = msal.PublicClientApplication(
                        self.cfg["client_id"], authority=self.cfg["authority"], **kw
                    )
            except requests.RequestException as exc:
                raise EzsshError(
                    f"Cannot reach the identity provider {self.cfg['authority']}: {type(exc).__name__}.", UNAVAILABLE
                ) from None
            except ValueError as exc:
                raise EzsshError(
                    f"Identity provider {self.cfg['authority']} is not usable: {exc}", UNAVAILABLE
                ) from None
        return self._app

    def _http_cache(self) -> dict:
        """MSAL's HTTP cache (the identity provider's discovery documents), kept in the ezssh directory
        so a token refresh does not fetch them again on every run."""
        import atexit
        import pickle

        path = self.home / HTTP_CACHE
        cache: dict = {}
        try:
            with open(path, "rb") as f:
                loaded = pickle.load(f)  # our own 0600 file in the 0700 ezssh directory
            if isinstance(loaded, dict):
                cache = loaded
        except (OSError, EOFError, ValueError, TypeError, AttributeError, ImportError, pickle.UnpicklingError):
            pass
        before = dict(cache)

        def save() -> None:
            if cache != before:
                try:
                    write_private(path, pickle.dumps(cache), 0o600)
                except (OSError, TypeError, ValueError, pickle.PicklingError):
                    pass

        atexit.register(save)
        return cache

    # ---- accounts and tokens -------------------------------------------------------------------

    def _account(self) -> dict | None:
        accounts = self.app.get_accounts()
        want = self.cfg.get("account")
        for a in accounts:
            if want and a.get("home_account_id") == want:
                return a
        return accounts[0] if accounts else None

    def has_account(self) -> bool:
        """Whether the cache holds any account (no network)."""
        return bool(self.cache.find(msal.TokenCache.CredentialType.ACCOUNT))

    def silent(self, force_refresh: bool = False) -> dict | None:
        if not self.has_account():
            return None
        account = self._account()
        if account is None:
            return None
        try:
            result = self.app.acquire_token_silent_with_error(self.scopes, account=account, force_refresh=force_refresh)
        except requests.RequestException as exc:
            raise EzsshError(f"Cannot reach the identity provider: {type(exc).__name__}.", UNAVAILABLE) from None
        if result and "access_token" in result:
            return result
        return None

    def token(self, force_refresh: bool = False) -> str:
        """A bearer token for the service; signs in with the device flow when allowed (see may_prompt)."""
        result = self.silent(force_refresh)
        if result is None:
            if force_refresh:
                raise not_signed_in("The service did not accept your sign-in and it could not be refreshed.")
            if not may_prompt():
                raise not_signed_in()
            result = self.device_login()
        return result["access_token"]

    def device_login(self, out=None) -> dict:
        out = out or sys.stderr
        try:
            flow = self.app.initiate_device_flow(scopes=self.scopes)
        except requests.RequestException as exc:
            raise EzsshError(f"Cannot reach the identity provider: {type(exc).__name__}.", UNAVAILABLE) from None
        if "user_code" not in flow:
            raise EzsshError(
                f"The identity provider refused to start a device sign-in: "
                f"{flow.get('error_description') or flow.get('error') or flow}",
                UNAVAILABLE,
            )
        minutes = max(1, int(flow.get("expires_in", 900)) // 60)
        # Stable format, one line, flushed at once (tests and wrappers read it from the pipe):
        out.write(
            f"To sign in, open {flow['verification_uri']} and enter the code {flow['user_code']} "
            f"(expires in {minutes} min).\n"
        )
        out.flush()
        try:
            result = self.app.acquire_token_by_device_flow(flow)
        except requests.RequestException as exc:
            raise EzsshError(f"Lost the identity provider while waiting: {type(exc).__name__}.", UNAVAILABLE) from None
        return self._signed_in(result)

    def browser_login(self, timeout: int = 300, out=None) -> dict:
        """Sign in in the system browser: authorization code + PKCE, the answer arriving on a loopback
        listener (http://localhost:<ephemeral port>, RFC 8252). Fails (exit 3) after `timeout` seconds."""
        out = out or sys.stderr
        app = self.app  # discovery first: an unreachable provider fails before a browser opens

        def no_browser(uri: str) -> None:
            out.write(
                f"No browser could be opened. Open this address in a browser on this machine: {uri}\n"
                f"or stop (Ctrl+C) and use: ezssh login --device\n"
            )
            out.flush()

        # Stable format, one line, flushed at once:
        out.write("Opening your browser to sign in; if it does not open, use: ezssh login --device\n")
        out.flush()
        try:
            result = app.acquire_token_interactive(self.scopes, timeout=timeout, auth_uri_callback=no_browser)
        except msal.BrowserInteractionTimeoutError:
            raise EzsshError(
                f"Sign-in failed: the sign-in was not completed in the browser within {timeout} s.",
                NOT_SIGNED_IN,
                hint="Run `ezssh login` again (or `ezssh login --device`).",
            ) from None
        except requests.RequestException as exc:
            raise EzsshError(
                f"Lost the identity provider while signing in: {type(exc).__name__}.", UNAVAILABLE
            ) from None
        except (OSError, ValueError) as exc:  # e.g. no loopback listener, or a mismatched answer
            raise EzsshError(
                f"Sign-in failed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
                NOT_SIGNED_IN,
                hint="Run `ezssh login` again (or `ezssh login --device`).",
            ) from None
        return self._signed_in(result)

    def _signed_in(self, result: dict) -> dict:
        """Check an MSAL token response and remember its account as the one to use."""
        if "access_token" not in result:
            err = result.get("error")
            desc = (result.get("error_description") or err or "no token").splitlines()[0]
            raise EzsshError(f"Sign-in failed: {desc}", NOT_SIGNED_IN, error=err)
        home_account_id = None
        idc = result.get("id_token_claims") or {}
        if idc.get("oid") and idc.get("tid"):
            home_account_id = f"{idc['oid']}.{idc['tid']}"
        if home_account_id:
            from .issue import switch_account

            # Another account's keys and certificates leave the agent and the disk before this one's
            # first use: a cached certificate never serves anyone but whom it was issued to.
            switch_account(self.cfg, self.home, home_account_id)
        return result

    def whoami(self) -> dict:
        result = self.silent()
        if result is None:
            raise not_signed_in("You are not signed in (or the session has expired).")
        claims = jwt_claims(result["access_token"])
        exp = claims.get("exp")
        return {
            "upn": claims.get("preferred_username") or claims.get("upn") or claims.get("unique_name"),
            "name": claims.get("name"),
            "oid": claims.get("oid"),
            "tid": claims.get("tid"),
            "groups": claims.get("groups", []),
            "roles": claims.get("roles", []),
            "scopes": (claims.get("scp") or "").split(),
            "issuer": claims.get("iss"),
            "audience": claims.get("aud"),
            "expires_at": exp,
            "expires_in": int(exp - time.time()) if isinstance(exp, (int, float)) else None,
            "server": self.cfg.get("server"),
            "token_cache": self.cache_desc,
        }


def may_prompt() -> bool:
    """A command may start the device sign-in itself on a terminal or with EZSSH_ALLOW_DEVICE_LOGIN=1."""
    if os.environ.get("EZSSH_ALLOW_DEVICE_LOGIN") == "1":
        return True
    try:
        return sys.stdin.isatty() and sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False
