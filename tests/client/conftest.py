"""Fixtures for the ezssh CLI tests: the real Entra ID stand-in, a tiny real HTTP server for
/api/client-config (the API service is built separately), and a runner for the CLI as a subprocess."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.realparts import unavailable

REPO = Path(__file__).resolve().parents[2]
CLIENT = REPO / "client"
INFRA_LOCAL = REPO / "infra" / "local"
for p in (CLIENT, INFRA_LOCAL):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from devstack.proc import StandInError, free_port  # noqa: E402

API_SCOPE = "api://ezssh/access_as_user"
DEVICE_LINE = re.compile(r"To sign in, open (?P<uri>\S+) and enter the code (?P<code>[A-Za-z0-9-]+)")


def _stand_in_unavailable(what: str, exc: BaseException):
    unavailable(f"{what} did not start: {exc}")


@pytest.fixture(scope="session")
def oidc(tmp_path_factory):
    from devstack.oidc import start_oidc

    state = tmp_path_factory.mktemp("oidc-state")
    try:
        stand_in = start_oidc(state, free_port())
    except (StandInError, OSError) as exc:
        _stand_in_unavailable("Entra ID stand-in (oidc-provider)", exc)
    yield stand_in
    stand_in.stop()


class ConfigServer:
    """A real HTTP server on 127.0.0.1 serving GET /api/client-config (and nothing else: 404)."""

    def __init__(self, body: dict | None, status: int = 200) -> None:
        self.body = body
        self.status = status
        self.hits: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                outer.hits.append(self.path)
                if self.path == "/api/client-config":
                    status, payload = outer.status, outer.body
                else:
                    status, payload = 404, {"error": "not_found", "message": "No such endpoint.", "request_id": "r-404"}
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *a):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def wrap_tls(self, cert: Path, key: Path) -> None:
        import ssl

        self.httpd.shutdown()
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(cert), str(key))
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self.httpd.RequestHandlerClass)
        self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def client_config_for(oidc, tenant: str = "contoso") -> dict:
    tid = oidc.tenant_id(tenant)
    return {
        "authority": oidc.issuer(tid),
        "authority_type": "oidc",
        "tenant_id": tid,
        "tenants": list(oidc.config["tenants"]),
        "client_id": oidc.cli_client_id,
        "scopes": [API_SCOPE],
    }


@pytest.fixture()
def config_server(oidc):
    srv = ConfigServer(client_config_for(oidc))
    yield srv
    srv.stop()


@pytest.fixture()
def ezssh_home(tmp_path) -> Path:
    return tmp_path / "ezssh-home"


def cli_env(home: Path, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EZSSH_")}
    env["EZSSH_HOME"] = str(home)
    env["PYTHONPATH"] = os.pathsep.join([str(CLIENT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(extra)
    return env


def run_cli(home: Path, *args: str, timeout: float = 60, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ezssh", *args], env=cli_env(home, **env),
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)
