"""Host namespaces: the DNS suffixes, host names and IP ranges the tenant's hosts live in.

GET /api/host-namespaces      signed-in users -> {namespaces, source: setting|tenant, etag}
PUT /api/host-namespaces      tenant admins: {namespaces: ["*.contoso.internal", "10.20.0.0/16"]}
                              (If-Match: the etag read, once the tenant has set them)
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import JSONResponse

from ..core.jsonvalue import JsonValue
from ..core.policy import Identity
from ..service.namespaces import NAMESPACES_REFUSED
from .deps import body, caller, service

router = APIRouter(prefix="/api/host-namespaces", tags=["host certificates"])


def _respond(view: dict) -> JSONResponse:
    return JSONResponse(view, headers={"ETag": view["etag"]} if view.get("etag") else None)


@router.get("")
def get(request: Request, who: Identity = Depends(caller)) -> JSONResponse:
    return _respond(service(request).namespaces.view(who))


@router.put("")
def put(
    request: Request,
    who: Identity = Depends(caller),
    if_match: str | None = Header(None),
    doc: JsonValue = body(None, NAMESPACES_REFUSED),
) -> JSONResponse:
    return _respond(service(request).namespaces.replace(who, doc, if_match))
