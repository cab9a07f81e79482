"""Access policies: CRUD (conditional on ETags), CA keys and rotation."""

from __future__ import annotations

import json

from fastapi import APIRouter, Depends, Header, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.concurrency import run_in_threadpool

from ..core.errors import InvalidRequest
from ..core.policy import Identity, Policy
from .deps import MAX_BODY, caller, service

router = APIRouter(prefix="/api/policies", tags=["policies"])
SERVER_ONLY_FIELDS = ("host_token",)


def view(p: Policy, who: Identity) -> dict:
    """What a caller sees of a policy. Capabilities (host tokens) only for its admins."""
    d = p.to_dict()
    d["etag"] = p.etag
    d["you"] = {"admin": p.is_admin(who), "member": p.is_member(who), "approver": p.is_approver(who)}
    if not p.is_admin(who):
        for f in SERVER_ONLY_FIELDS:
            d.pop(f, None)
    return d


def _respond(p: Policy, who: Identity, status: int = 200) -> JSONResponse:
    headers = {"ETag": p.etag} if p.etag else None
    return JSONResponse(view(p, who), status_code=status, headers=headers)


async def _document(request: Request, who: Identity, action: str) -> object:
    raw = await request.body()
    try:
        if len(raw) > MAX_BODY:
            raise InvalidRequest("The policy document is too large.")
        try:
            return json.loads(raw or b"null")
        except (ValueError, UnicodeDecodeError):
            raise InvalidRequest("The policy document is not valid JSON.") from None
    except InvalidRequest as exc:
        service(request).refuse(who, exc, action)
        raise


@router.get("")
async def list_(request: Request, who: Identity = Depends(caller)) -> dict:
    policies = await run_in_threadpool(service(request).list_policies, who)
    return {"policies": [view(p, who) for p in policies]}


@router.post("")
async def create(request: Request, who: Identity = Depends(caller)) -> JSONResponse:
    doc = await _document(request, who, "policy.create.refused")
    p = await run_in_threadpool(service(request).create_policy, who, doc)
    return _respond(p, who, 201)


@router.get("/{policy_id}")
async def get(request: Request, policy_id: str, who: Identity = Depends(caller)) -> JSONResponse:
    return _respond(await run_in_threadpool(service(request).get_policy, who, policy_id), who)


@router.patch("/{policy_id}")
async def update(request: Request, policy_id: str, who: Identity = Depends(caller),
                 if_match: str | None = Header(None)) -> JSONResponse:
    doc = await _document(request, who, "policy.update.refused")
    p = await run_in_threadpool(service(request).update_policy, who, policy_id, doc, if_match)
    return _respond(p, who)


@router.delete("/{policy_id}")
async def delete(request: Request, policy_id: str, who: Identity = Depends(caller),
                 if_match: str | None = Header(None)) -> Response:
    await run_in_threadpool(service(request).delete_policy, who, policy_id, if_match)
    return Response(status_code=204)


@router.post("/{policy_id}/rotate-ca")
async def rotate(request: Request, policy_id: str, who: Identity = Depends(caller),
                 if_match: str | None = Header(None)) -> JSONResponse:
    p = await run_in_threadpool(service(request).rotate_ca, who, policy_id, if_match)
    return _respond(p, who)


@router.get("/{policy_id}/ca")
async def ca(request: Request, policy_id: str, who: Identity = Depends(caller)) -> PlainTextResponse:
    keys = await run_in_threadpool(service(request).ca_public_keys, who, policy_id)
    return PlainTextResponse("".join(k.public_key + "\n" for k in keys))
