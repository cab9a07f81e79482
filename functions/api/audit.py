"""The audit log: who asked for what, who decided, which certificate (key id, serial) was issued."""

from __future__ import annotations

from dataclasses import asdict

from fastapi import APIRouter, Depends, Query, Request

from ..core.policy import Identity
from .deps import caller, finite_number, service

router = APIRouter(prefix="/api/audit", tags=["audit"])


@router.get("")
def audit(request: Request, who: Identity = Depends(caller),
                since: str | None = Query(None, max_length=32, description="unix seconds; default: the last 24 hours"),
                until: str | None = Query(None, max_length=32), request_id: str | None = Query(None, max_length=64),
                policy: str | None = Query(None, max_length=63), key_id: str | None = Query(None, max_length=400),
                serial: str | None = Query(None, pattern=r"^[0-9]{1,19}$"),
                limit: int = Query(200, ge=1, le=1000)) -> dict:
    svc = service(request)
    with svc.base.refusing(who, "audit.refused", details={"path": request.url.path}):
        since_at, until_at = finite_number(since, "since"), finite_number(until, "until")
    log = svc.audit
    entries = log.query(who, since=since_at, until=until_at, request_id=request_id, policy_id=policy,
                        key_id=key_id, serial=serial, limit=limit)
    out: dict = {"entries": [{**asdict(e), "intact": e.verify()} for e in entries]}
    if request_id:
        out["chain_intact"] = log.request_chain_intact(who, request_id)
    return out
