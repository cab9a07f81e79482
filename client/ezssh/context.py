"""The context a command that talks to the service works in: config, home, the HTTP transport to the
service, the requests session and sign-in (MSAL) for the identity provider, and the API client, each
built on first use (so a command pays only for what it touches). Stdlib only here."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .home import home_dir, load_config

if TYPE_CHECKING:
    import requests

    from .api import Api, Transport
    from .auth import Auth


class Ctx:
    def __init__(self) -> None:
        self.home = home_dir()
        self.cfg = load_config(self.home)
        self._session: requests.Session | None = None
        self._auth: Auth | None = None
        self._api: Api | None = None
        self._transport: Transport | None = None

    @property
    def server(self) -> str:
        return self.cfg["server"]

    @property
    def session(self) -> requests.Session:
        if self._session is None:
            from .api import make_session

            self._session = make_session(self.cfg.get("ca_bundle"), self.cfg["server"])
        return self._session

    @property
    def auth(self) -> Auth:
        if self._auth is None:
            from .auth import Auth

            self._auth = Auth(self.cfg, self.home, self.session)
        return self._auth

    @property
    def transport(self) -> Transport:
        if self._transport is None:
            from .api import Transport

            self._transport = Transport(self.cfg.get("ca_bundle"))
        return self._transport

    def token(self, force_refresh: bool = False) -> str:
        """A bearer token: the cached one, read without MSAL, while it is good; else MSAL's (refresh or
        sign-in). A workload (`ezssh login --managed-identity` ...) gets its app-only token through
        azure-identity instead."""
        if self.cfg.get("workload"):
            from .workload import token

            return token(self.cfg, self.home, force_refresh)
        if not force_refresh:
            from .tokens import cached_access_token

            cached = cached_access_token(self.cfg, self.home)
            if cached:
                return cached
        return self.auth.token(force_refresh)

    @property
    def api(self) -> Api:
        if self._api is None:
            from .api import Api

            self._api = Api(self.cfg["server"], self.transport, self.token)
        return self._api
