"""What every HTTPS stand-in shares: a threaded server on 127.0.0.1:<free port> with a throwaway CA
(trustme), its URL and CA file, and a clean stop."""

from __future__ import annotations

import shutil
import ssl
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class TlsStandIn:
    """Subclasses set `name` and `handler` (a BaseHTTPRequestHandler class that reads `self.owner`)."""

    name = "standin"
    handler: type[BaseHTTPRequestHandler]

    def __init__(self) -> None:
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._dir: Path | None = None
        self.port = 0

    def start(self):  # type: ignore[no-untyped-def]
        import trustme

        self._dir = Path(tempfile.mkdtemp(prefix=f"{self.name}-"))
        ca = trustme.CA(organization_name=f"ezssh {self.name}")
        leaf = ca.issue_cert("127.0.0.1", "localhost")
        ca.cert_pem.write_to_path(str(self._dir / "ca.pem"))
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        leaf.configure_cert(ctx)
        handler = type("Handler", (self.handler,), {"owner": self})
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        server.daemon_threads = True
        # handshake lazily in the connection's own thread, not in the accept loop
        server.socket = ctx.wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)
        self._server = server
        self.port = server.server_address[1]
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name=f"{self.name}-{self.port}", daemon=True)
        self._thread.start()
        return self

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def ca_path(self) -> str:
        assert self._dir is not None, "start() first"
        return str(self._dir / "ca.pem")

    def _stop_server(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def _remove_files(self) -> None:
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def stop(self) -> None:
        self._stop_server()
        self._remove_files()
