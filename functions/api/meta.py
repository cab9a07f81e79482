"""Health and client configuration: the two endpoints that need no token."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from .deps import context

router = APIRouter(prefix="/api", tags=["meta"])


@router.get("/health")
def health(request: Request) -> JSONResponse:
    checks = context(request).health.checks()
    ok = all(v == "ok" for v in checks.values())
    return JSONResponse({"status": "ok" if ok else "degraded", "checks": checks}, status_code=200 if ok else 503)


@router.get("/client-config")
def client_config(request: Request) -> dict:
    s = context(request).settings
    tenant = s.tenants[0]
    return {
        "authority": s.issuer_for(tenant).removesuffix("/v2.0"),
        "authority_type": s.authority_type,
        "tenant_id": tenant,
        "tenants": list(s.tenants),
        "client_id": s.cli_client_id,
        "scopes": s.scopes,
        # the web page signs in to one of these (tenant id -> authority), then calls the API
        "authorities": {t: s.issuer_for(t).removesuffix("/v2.0") for t in s.tenants},
    }
