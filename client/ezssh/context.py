"""The context a command that talks to the service works in: config, home, HTTP session, sign-in and
API client, each built on first use (so a command pays only for what it touches). Stdlib only here."""

from __future__ import annotations

from .home import home_dir, load_config


class Ctx:
    def __init__(self) -> None:
        self.home = home_dir()
        self.cfg = load_config(self.home)
        self._session = self._auth = self._api = None

    @property
    def server(self) -> str:
        return self.cfg["server"]

    @property
    def session(self):
        if self._session is None:
            from .api import make_session
            self._session = make_session(self.cfg.get("ca_bundle"), self.cfg["server"])
        return self._session

    @property
    def auth(self):
        if self._auth is None:
            from .auth import Auth
            self._auth = Auth(self.cfg, self.home, self.session)
        return self._auth

    @property
    def api(self):
        if self._api is None:
            from .api import Api
            self._api = Api(self.cfg["server"], self.session, self.auth.token)
        return self._api
