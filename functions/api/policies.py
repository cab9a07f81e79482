"""Access policies (the read side the CLI and hosts need; full CRUD lives here too as it grows)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import PlainTextResponse
from starlette.concurrency import run_in_threadpool

from ..core.policy import Identity
from .deps import caller, service

router = APIRouter(prefix="/api/policies", tags=["policies"])


@router.get("/{policy_id}/ca")
async def ca(request: Request, policy_id: str, who: Identity = Depends(caller)) -> PlainTextResponse:
    keys = await run_in_threadpool(service(request).ca_public_keys, who, policy_id)
    return PlainTextResponse("".join(k.public_key + "\n" for k in keys))
