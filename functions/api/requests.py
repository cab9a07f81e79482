"""Access requests: ask, look, decide, and fetch the certificate."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse
from pydantic import Field

from ..core.approval import RequestRecord
from ..core.policy import AccessRequest, Identity
from ..service import Outcome
from .deps import Strict, caller, parse_body, service

router = APIRouter(prefix="/api/requests", tags=["requests"])


class NewRequest(Strict):
    host: str = Field(min_length=1, max_length=253, pattern=r"\S")
    principal: str = Field(min_length=1, max_length=64, pattern=r"\S")
    policy: str | None = Field(None, max_length=63)
    ttl_seconds: int | None = None
    reason: str | None = Field(None, max_length=1000)
    public_key: str | None = None


class Decision(Strict):
    comment: str | None = Field(None, max_length=1000)


class CertificateBody(Strict):
    public_key: str


def render(outcome: Outcome, now: int) -> JSONResponse:
    body = outcome.request.to_public(now)
    if outcome.certificate is not None:
        c = outcome.certificate
        body.update(
            status="issued",
            certificate=c.openssh,
            serial=str(c.serial),
            key_id=c.key_id,
            principals=list(c.principals),
            valid_after=c.valid_after,
            valid_before=c.valid_before,
            ca_fingerprint=c.ca_fingerprint,
        )
        return JSONResponse(body, status_code=201)
    if outcome.status == "pending":
        body["approvers_needed"] = outcome.approvers_needed
        body["approvers"] = outcome.approvers
        return JSONResponse(body, status_code=202)
    return JSONResponse(body, status_code=200)


@router.post("")
async def create(request: Request, who: Identity = Depends(caller)) -> JSONResponse:
    body = await parse_body(request, NewRequest, who, "request.refused")
    svc = service(request)
    req = AccessRequest(host=body.host.strip(), principal=body.principal.strip(), ttl_seconds=body.ttl_seconds,
                        policy_id=body.policy, reason=body.reason)
    outcome = await _run(svc.request_access, who, req, body.public_key)
    return render(outcome, int(svc.clock()))


@router.get("")
async def list_(request: Request, state: str | None = Query(None), role: str | None = Query(None),
                who: Identity = Depends(caller)) -> dict:
    svc = service(request)
    recs: list[RequestRecord] = await _run(svc.list_requests, who, state=state, role=role)
    now = int(svc.clock())
    return {"requests": [r.to_public(now) for r in recs]}


@router.get("/{request_id}")
async def get(request: Request, request_id: str, who: Identity = Depends(caller)) -> dict:
    svc = service(request)
    rec = await _run(svc.get_request, who, request_id)
    return rec.to_public(int(svc.clock()))


@router.post("/{request_id}/certificate")
async def certificate(request: Request, request_id: str, who: Identity = Depends(caller)) -> JSONResponse:
    body = await parse_body(request, CertificateBody, who, "certificate.refused")
    svc = service(request)
    outcome = await _run(svc.issue_for_request, who, request_id, body.public_key)
    return render(outcome, int(svc.clock()))


@router.post("/{request_id}/{action}")
async def decide(request: Request, request_id: str, action: str, who: Identity = Depends(caller)) -> dict:
    from ..core.errors import NotFound

    if action not in ("approve", "deny", "cancel"):
        raise NotFound(f"Unknown action {action!r}; use approve, deny or cancel.")
    body = await parse_body(request, Decision, who, f"request.{action}.refused")
    svc = service(request)
    rec = await _run(getattr(svc, action), who, request_id, body.comment)
    return rec.to_public(int(svc.clock()))


async def _run(fn, *args, **kwargs):  # type: ignore[no-untyped-def]
    """Run blocking service code (storage, HSM) in the worker thread pool."""
    from starlette.concurrency import run_in_threadpool

    return await run_in_threadpool(fn, *args, **kwargs)
