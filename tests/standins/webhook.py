"""A webhook receiver on 127.0.0.1 (plain http, or https with a throwaway CA) that records every post
and answers as told: a status, a body, optionally a Location (to try redirects)."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from .tls import TlsStandIn


class _Handler(BaseHTTPRequestHandler):
    owner: "object"

    def _answer(self) -> None:
        o = self.owner  # type: ignore[attr-defined]
        raw = self.rfile.read(int(self.headers.get("content-length", 0) or 0))
        with o.lock:
            o.posts.append({"path": self.path, "method": self.command, "host": self.headers.get("Host"),
                            "body": json.loads(raw) if raw else None})
        self.send_response(o.status)
        if o.location:
            self.send_header("Location", o.location)
        self.send_header("Content-Length", str(len(o.reply)))
        self.end_headers()
        self.wfile.write(o.reply)

    do_POST = _answer  # noqa: N815
    do_GET = _answer  # noqa: N815

    def log_message(self, *args) -> None:  # noqa: D401
        pass


class _State:
    def __init__(self) -> None:
        self.posts: list[dict] = []
        self.lock = threading.Lock()
        self.status = 200
        self.reply = b"ok"
        self.location: str | None = None

    def answer(self, status: int, reply: bytes = b"ok", location: str | None = None) -> None:
        self.status, self.reply, self.location = status, reply, location

    def wait_for(self, n: int = 1, timeout: float = 10.0) -> list[dict]:
        deadline = time.time() + timeout
        while time.time() < deadline:
            with self.lock:
                if len(self.posts) >= n:
                    return list(self.posts)
            time.sleep(0.02)
        return list(self.posts)


class HttpsReceiver(_State, TlsStandIn):
    name = "webhook"
    handler = _Handler

    def __init__(self) -> None:
        _State.__init__(self)
        TlsStandIn.__init__(self)


class HttpReceiver(_State):
    def __init__(self) -> None:
        super().__init__()
        handler = type("Handler", (_Handler,), {"owner": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
