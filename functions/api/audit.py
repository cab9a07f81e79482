"""The audit log: who asked for what, who decided, which certificate (key id, serial) was issued."""

from __future__ import annotations

from dataclasses import asdict

from fastapi import APIRouter, Depends, Query, Request

from ..core.policy import Identity
from .deps import caller, service

router = APIRouter(prefix="/api/audit", tags=["audit"])


@router.get("")
def audit(request: Request, who: Identity = Depends(caller),
                since: float | None = Query(None, description="unix seconds; default: the last 24 hours"),
                until: float | None = Query(None), request_id: str | None = Query(None, max_length=64),
                policy: str | None = Query(None, max_length=63), key_id: str | None = Query(None, max_length=400),
                serial: str | None = Query(None, pattern=r"^[0-9]{1,19}$"),
                limit: int = Query(200, ge=1, le=1000)) -> dict:
    log = service(request).audit
    entries = log.query(who, since=since, until=until, request_id=request_id, policy_id=policy,
                        key_id=key_id, serial=serial, limit=limit)
    out: dict = {"entries": [{**asdict(e), "intact": e.verify()} for e in entries]}
    if request_id:
        out["chain_intact"] = log.request_chain_intact(who, request_id)
    return out
