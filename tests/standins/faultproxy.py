"""An HTTP proxy in front of a real Azurite that fails, delays, holds or loses chosen calls.

    proxy = FaultProxy(azurite_port).start()          # http://127.0.0.1:<proxy.port>
    proxy.calls                                        # every call seen: (method, path)
    proxy.plan = fail_from(3)                          # from the 3rd call on, answer 503 unforwarded
    proxy.plan = lose_at(2)                            # forward the 2nd call (it commits), then cut
                                                       # the connection: the client never hears

A plan is a function (index of the call since the plan was set, method, path) -> an Action:
  PASS          forward and answer
  FAIL          answer 503 ServerBusy without forwarding (nothing reaches storage)
  DROP          close the connection without forwarding or answering
  LOSE          forward (storage commits), then close the connection without answering
  Delay(s)      wait s seconds, then forward
  HOLD          forward after `release()` (or never, if the client gives up first)

Only loopback; the proxy stops by itself with `stop()`.
"""

from __future__ import annotations

import http.client
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

PASS, FAIL, DROP, LOSE, HOLD = "pass", "fail", "drop", "lose", "hold"


@dataclass(frozen=True)
class Delay:
    seconds: float


Plan = Callable[[int, str, str], object]


def passing(i: int, method: str, path: str) -> object:
    return PASS


def fail_from(k: int, action: object = FAIL) -> Plan:
    """Calls 1..k-1 pass; call k and every later one gets `action` (retries included)."""
    return lambda i, m, p: PASS if i < k else action


def lose_at(k: int) -> Plan:
    """Call k commits but its answer is lost; every later call fails (so retries can't repair it)."""
    return lambda i, m, p: PASS if i < k else (LOSE if i == k else FAIL)


class FaultProxy:
    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1") -> None:
        self.upstream = (upstream_host, upstream_port)
        self.calls: list[tuple[str, str]] = []
        self._plan: Plan = passing
        self._since = 0
        self._lock = threading.Lock()
        self._released = threading.Event()
        self._server: ThreadingHTTPServer | None = None

    # ---- control ----------------------------------------------------------------------------------
    @property
    def plan(self) -> Plan:
        return self._plan

    @plan.setter
    def plan(self, plan: Plan) -> None:
        with self._lock:
            self._plan = plan
            self._since = len(self.calls)
            self._released.clear()

    def heal(self) -> None:
        self.plan = passing
        self._released.set()

    def release(self) -> None:
        self._released.set()

    def calls_since_plan(self) -> list[tuple[str, str]]:
        with self._lock:
            return self.calls[self._since:]

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.server_address[1]

    def connection_string(self) -> str:
        return ("DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;"
                "AccountKey=Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==;"
                f"TableEndpoint=http://127.0.0.1:{self.port}/devstoreaccount1;")

    # ---- serving ----------------------------------------------------------------------------------
    def start(self) -> "FaultProxy":
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                with proxy._lock:
                    proxy.calls.append((self.command, self.path))
                    index = len(proxy.calls) - proxy._since
                    action = proxy._plan(index, self.command, self.path)
                if action == FAIL:
                    payload = b'{"odata.error":{"code":"ServerBusy","message":{"value":"injected"}}}'
                    self.send_response(503)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                if action == DROP:
                    self.close_connection = True
                    return
                if isinstance(action, Delay):
                    threading.Event().wait(action.seconds)
                if action == HOLD:
                    proxy._released.wait(60)
                status, headers, data = proxy._forward(self.command, self.path, self.headers, body)
                if action == LOSE:
                    self.close_connection = True
                    return
                self.send_response(status)
                for k, v in headers:
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_MERGE = _handle  # type: ignore[assignment]

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def _forward(self, method: str, path: str, headers, body: bytes) -> tuple[int, list, bytes]:  # type: ignore[no-untyped-def]
        conn = http.client.HTTPConnection(*self.upstream, timeout=30)
        try:
            fwd = {k: v for k, v in headers.items() if k.lower() not in ("connection", "keep-alive")}
            conn.request(method, path, body=body, headers=fwd)
            resp = conn.getresponse()
            return resp.status, resp.getheaders(), resp.read()
        finally:
            conn.close()

    def stop(self) -> None:
        self._released.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
