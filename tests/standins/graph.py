"""An HTTPS stand-in of the Microsoft Graph calls ezssh makes, in the shapes of the Graph v1.0 reference:

- `POST /v1.0/users/{id}/getMemberObjects` (body `{"securityEnabledOnly": true}`, answer `{"value":
  [<object ids>], "@odata.nextLink"?}`), for users in too many groups for their token;
- `POST /v1.0/$batch` (JSON batching, at most 20 requests) of `GET /users/{id}?$select=id,accountEnabled`
  and `GET /servicePrincipals/{id}?$select=...`: each answer `{"id", "status", "body"}`, 404 with an
  error body for an object that does not exist (deleted);
- `GET /v1.0/identityProtection/riskyUsers?$filter=...` (`{"value": [{"id", "riskLevel", "riskState"}]}`),
  filtered here by the levels named in the filter.
`accounts` holds who exists ({oid: ("user" | "servicePrincipal", accountEnabled)}), `risky` the
risk levels ({oid: "high"}); tests change them as Entra would."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler
from urllib.parse import parse_qs, urlsplit

from .tls import TlsStandIn


class GraphStandIn(TlsStandIn):
    name = "graph-standin"

    def __init__(self, token: str = "graph-token", page_size: int = 100) -> None:
        super().__init__()
        self.token = token
        self.page_size = page_size
        self.members: dict[str, list[str]] = {}
        self.accounts: dict[str, tuple[str, bool]] = {}
        self.risky: dict[str, str] = {}
        self.requests: list[tuple[str, str]] = []
        self._fail: list[int] = []
        self._lock = threading.Lock()

    def start(self) -> "GraphStandIn":
        self.handler = _Handler
        return super().start()

    def fail_next_with(self, status: int, times: int = 1) -> None:
        with self._lock:
            self._fail += [status] * times


class _Handler(BaseHTTPRequestHandler):
    owner: GraphStandIn

    def log_message(self, *args: object) -> None:
        pass

    def _answer(self, status: int, body: dict) -> None:
        raw = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def _serve(self) -> None:
        owner = self.owner
        url = urlsplit(self.path)
        with owner._lock:
            owner.requests.append((self.command, url.path))
            failing = owner._fail.pop(0) if owner._fail else None
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if self.headers.get("Authorization") != f"Bearer {owner.token}":
            return self._answer(401, {"error": {"code": "InvalidAuthenticationToken", "message": "Access token is empty."}})
        if failing:
            return self._answer(failing, {"error": {"code": "Authorization_RequestDenied",
                                                    "message": "Insufficient privileges to complete the operation."}})
        if url.path == "/v1.0/$batch" and self.command == "POST":
            return self._answer(200, {"responses": [self._object(r) for r in json.loads(raw or b"{}")["requests"][:20]]})
        if url.path == "/v1.0/identityProtection/riskyUsers":
            flt = parse_qs(url.query).get("$filter", [""])[0]
            return self._answer(200, {"value": [{"id": oid, "riskLevel": level, "riskState": "atRisk"}
                                                for oid, level in owner.risky.items() if f"'{level}'" in flt]})
        parts = url.path.strip("/").split("/")
        if len(parts) != 4 or parts[:2] != ["v1.0", "users"] or parts[3] != "getMemberObjects":
            return self._answer(404, {"error": {"code": "Request_ResourceNotFound", "message": "Not found."}})
        groups = owner.members.get(parts[2])
        if groups is None:
            return self._answer(404, {"error": {"code": "Request_ResourceNotFound",
                                                "message": f"Resource '{parts[2]}' does not exist."}})
        skip = int(parse_qs(url.query).get("$skiptoken", ["0"])[0])
        page = groups[skip: skip + owner.page_size]
        body: dict = {"@odata.context": "https://graph.microsoft.com/v1.0/$metadata#Collection(Edm.String)",
                      "value": page}
        if skip + owner.page_size < len(groups):
            body["@odata.nextLink"] = f"{owner.url}{url.path}?$skiptoken={skip + owner.page_size}"
        self._answer(200, body)

    def _object(self, req: dict) -> dict:
        """One request of a JSON batch: GET /users/{id} or /servicePrincipals/{id}."""
        path = urlsplit(req["url"]).path.strip("/").split("/")
        kind = {"users": "user", "servicePrincipals": "servicePrincipal"}.get(path[0]) if len(path) == 2 else None
        known = self.owner.accounts.get(path[-1])
        if kind is None or known is None or known[0] != kind:
            return {"id": req["id"], "status": 404, "body": {"error": {
                "code": "Request_ResourceNotFound", "message": f"Resource '{path[-1]}' does not exist."}}}
        return {"id": req["id"], "status": 200, "body": {"id": path[-1], "accountEnabled": known[1]}}

    do_POST = _serve
    do_GET = _serve
