"""The audit log: who asked for what, who decided, which certificate (key id, serial) was issued."""

from __future__ import annotations

from dataclasses import asdict

from fastapi import APIRouter, Depends, Query, Request

from ..core.ids import GUID
from ..core.policy import Identity
from ..service.audit import AUDIT_REFUSED
from .deps import caller, finite_number, service

router = APIRouter(prefix="/api/audit", tags=["audit"])


@router.get("")
def audit(
    request: Request,
    who: Identity = Depends(caller),
    since: str | None = Query(None, max_length=32, description="unix seconds; default: the last 24 hours"),
    until: str | None = Query(None, max_length=32),
    request_id: str | None = Query(None, max_length=64),
    policy: str | None = Query(None, max_length=63),
    key_id: str | None = Query(None, max_length=400),
    serial: str | None = Query(None, pattern=r"^[0-9]{1,19}$"),
    user: str | None = Query(None, pattern=f"^{GUID}$", description="the actor's object id"),
    limit: int = Query(100, ge=1, le=1000),
    continuation: str | None = Query(None, max_length=1024, description="the `next` of the page before"),
) -> dict:
    """Entries oldest first, at most `limit`; `next` (absent at the end) continues after this page."""
    svc = service(request)
    with svc.base.refusing(who, AUDIT_REFUSED, details={"path": request.url.path}):
        since_at, until_at = finite_number(since, "since"), finite_number(until, "until")
    log = svc.audit
    page = log.query(
        who,
        since=since_at,
        until=until_at,
        request_id=request_id,
        policy_id=policy,
        key_id=key_id,
        serial=serial,
        user=user.lower() if user else None,
        limit=limit,
        continuation=continuation,
    )
    out: dict = {"entries": [{**asdict(e), "intact": e.verify()} for e in page.entries]}
    if page.next is not None:
        out["next"] = page.next
    if request_id:
        out["chain_intact"] = log.request_chain_intact(who, request_id)
    return out
