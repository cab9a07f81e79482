"""The approvers' and admins' web page: static files under /app/, served by the same app as the API.

On Azure Functions the one ASGI function (function_app.py) takes every path: host.json's
`routePrefix` is "", so /app/... reaches this router and /api/... the API's, both with their full path.

Nothing is built: the page's own modules (functions/web/app/) and the pinned libraries named in
functions/web/vendor.json (from node_modules locally; copied into the Functions zip by
scripts/package.sh) are read once per worker, and served under /app/v/<version>/, where <version>
is a hash of every file's bytes. Those answers are immutable (cached for a year); index.html, which
names the version, is never cached, so a new deployment is picked up on the next load.

Every page answer carries a strict Content-Security-Policy: scripts, styles and images only from
this origin (no inline script or style), `connect-src` only this origin (the API) and the identity
provider's origin, no framing, no plugins, no <base>. The page keeps tokens in sessionStorage and
sends them as a bearer header; it sets no cookies.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import mimetypes
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlsplit

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, Response

from ..core.errors import NotFound
from .deps import context

WEB = Path(__file__).resolve().parent.parent / "web"
REPO = WEB.parent.parent
IMMUTABLE = "public, max-age=31536000, immutable"
TYPES = {
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
}
# A vendored module's bare import ("preact") becomes a path next to it: an import map would be an
# inline script, which the policy forbids.
_IMPORT = re.compile(r"""(\bfrom\s*|\bimport\s*\(?\s*)(["'])([^"'./][^"']*)\2""")

router = APIRouter(tags=["web"])


class WebFilesMissing(NotFound):
    """A pinned library is not where vendor.json says (npm ci was not run, or the zip lacks it)."""


@dataclass(frozen=True)
class Assets:
    version: str
    files: dict[str, bytes]  # name under /app/v/<version>/ -> bytes
    index: bytes
    gzipped: dict[str, bytes]  # the same, gzip-compressed once (a phone's first load: 430 KB -> 130 KB)


def _vendor_bytes(name: str, spec: dict) -> bytes:
    packaged = WEB / "vendor" / name
    source = packaged if packaged.is_file() else REPO / "node_modules" / spec["from"]
    if not source.is_file():
        raise WebFilesMissing(f"The web page's library {spec['from']} is missing; run `npm ci` (scripts/setup.sh).")
    data = source.read_bytes()
    imports = spec.get("imports") or {}
    if imports:

        def swap(m: re.Match) -> str:
            target = imports.get(m.group(3))
            if target is None:
                raise WebFilesMissing(f"{spec['from']} imports {m.group(3)!r}, which vendor.json does not map.")
            return f"{m.group(1)}{m.group(2)}{target}{m.group(2)}"

        data = _IMPORT.sub(swap, data.decode("utf-8")).encode("utf-8")
    return data


@lru_cache(maxsize=1)
def assets() -> Assets:
    """The page's files and their version (once per worker)."""
    files: dict[str, bytes] = {}
    for path in sorted((WEB / "app").rglob("*")):
        if path.is_file() and path.suffix in TYPES:
            files[path.relative_to(WEB / "app").as_posix()] = path.read_bytes()
    for name, spec in sorted(json.loads((WEB / "vendor.json").read_text())["files"].items()):
        files[f"vendor/{name}"] = _vendor_bytes(name, spec)
    h = hashlib.sha256()
    for name, data in sorted(files.items()):
        h.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
    version = h.hexdigest()[:16]
    index = (WEB / "index.html").read_text().replace("{{v}}", f"/app/v/{version}").encode()
    gzipped = {name: gzip.compress(data, mtime=0) for name, data in files.items()}
    return Assets(version, files, index, gzipped)


def authority_origins(issuers: list[str]) -> list[str]:
    """The identity provider's origins (scheme://host[:port]) for connect-src and form-action."""
    out: list[str] = []
    for issuer in issuers:
        u = urlsplit(issuer)
        origin = f"{u.scheme}://{u.netloc}"
        if origin not in out:
            out.append(origin)
    return out


def content_security_policy(authorities: list[str]) -> str:
    idp = " ".join(authorities)
    return "; ".join(
        (
            "default-src 'none'",
            "script-src 'self'",
            "style-src 'self'",
            "img-src 'self'",
            "font-src 'self'",
            f"connect-src 'self' {idp}",
            f"form-action 'self' {idp}",
            "frame-ancestors 'none'",
            "base-uri 'none'",
            "object-src 'none'",
        )
    )


def page_headers(request: Request) -> dict[str, str]:
    s = context(request).settings
    return {
        "Content-Security-Policy": content_security_policy(authority_origins([s.issuer_for(t) for t in s.tenants])),
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "Cross-Origin-Resource-Policy": "same-origin",
    }


@router.get("/", include_in_schema=False)
@router.get("/app", include_in_schema=False)
def app_root() -> Response:
    return Response(status_code=308, headers={"Location": "/app/"})


@router.get("/app/v/{version}/{name:path}", include_in_schema=False)
def asset(request: Request, version: str, name: str) -> Response:
    a = assets()
    data = a.files.get(name)
    if version != a.version or data is None:
        raise NotFound("No such file (the page was updated: reload it).")
    ctype = TYPES.get(Path(name).suffix) or mimetypes.guess_type(name)[0] or "application/octet-stream"
    headers = {**page_headers(request), "Cache-Control": IMMUTABLE, "Vary": "Accept-Encoding"}
    if "gzip" in request.headers.get("accept-encoding", "").lower():
        data = a.gzipped[name]
        headers["Content-Encoding"] = "gzip"
    return Response(data, media_type=ctype, headers=headers)


@router.get("/app/{path:path}", include_in_schema=False)
def index(request: Request, path: str) -> Response:
    """Every page of the app (/app/, /app/requests/<id>, ...) is the same document; the page routes."""
    return HTMLResponse(assets().index, headers={**page_headers(request), "Cache-Control": "no-cache"})
