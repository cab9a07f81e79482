"""Access requests: ask, look, decide, and fetch the certificate."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import JSONResponse
from pydantic import Field, model_validator

from ..core.errors import NotFound
from ..core.evaluation import AccessRequest
from ..core.policy import Identity
from ..core.text import normalize_host, printable_text
from ..service import Outcome
from ..service.issuance import CERTIFICATE_REFUSED, REQUEST_REFUSED
from ..service.requests import decision_refused
from .deps import Strict, body, caller, service

router = APIRouter(prefix="/api/requests", tags=["requests"])


class NewRequest(Strict):
    host: str = Field(min_length=1, max_length=253, pattern=r"\S")
    principal: str = Field(min_length=1, max_length=64, pattern=r"\S")
    policy: str | None = Field(None, max_length=63)
    ttl_seconds: int | None = None
    reason: str | None = Field(None, max_length=1000)
    public_key: str | None = None

    @model_validator(mode="after")
    def _clean(self) -> NewRequest:
        """What people typed, in its one form (core.text): bad text is refused like a bad body."""
        return self.model_copy(
            update={
                "host": normalize_host(self.host),
                "principal": printable_text(self.principal, "principal", 64),
                "reason": (printable_text(self.reason, "reason", 1000) or None) if self.reason is not None else None,
            }
        )

    def command(self) -> AccessRequest:
        return AccessRequest(
            host=self.host,
            principal=self.principal,
            ttl_seconds=self.ttl_seconds,
            policy_id=self.policy,
            reason=self.reason,
        )


class DecisionBody(Strict):
    comment: str | None = Field(None, max_length=1000)

    @model_validator(mode="after")
    def _clean(self) -> DecisionBody:
        if self.comment is None:
            return self
        return self.model_copy(update={"comment": printable_text(self.comment, "comment", 1000) or None})


class CertificateBody(Strict):
    public_key: str


def render(outcome: Outcome, now: int, link: str | None = None) -> JSONResponse:
    out = outcome.request.to_public(now)
    if outcome.certificate is not None:
        c = outcome.certificate
        out.update(
            status="issued",
            certificate=c.openssh,
            serial=str(c.serial),
            key_id=c.key_id,
            principals=list(c.principals),
            valid_after=c.valid_after,
            valid_before=c.valid_before,
            ca_fingerprint=c.ca_fingerprint,
        )
        return JSONResponse(out, status_code=201)
    if outcome.status == "pending":
        out["approvers_needed"] = outcome.approvers_needed
        out["approvers"] = outcome.approvers
        if link:
            out["link"] = link  # the request's web page, where approvers decide
        return JSONResponse(out, status_code=202)
    return JSONResponse(out, status_code=200)


@router.post("")
def create(
    request: Request,
    who: Identity = Depends(caller),
    new: NewRequest = body(NewRequest, REQUEST_REFUSED),
    idempotency_key: str | None = Header(None, max_length=200),
) -> JSONResponse:
    """`Idempotency-Key` (one per client attempt): a retry after a lost answer gets that answer."""
    svc = service(request)
    outcome = svc.issuance.request_access(who, new.command(), new.public_key, idempotency_key)
    return render(outcome, int(svc.clock()), svc.base.request_link(outcome.request.id))


@router.get("")
def list_(
    request: Request,
    state: str | None = Query(None, max_length=16),
    role: str | None = Query(None, max_length=16),
    limit: int = Query(100),
    continuation: str | None = Query(None, max_length=512),
    who: Identity = Depends(caller),
) -> dict:
    """Newest first, `limit` (1-1000) a page; `next` is the `continuation` of the next page."""
    svc = service(request)
    now = int(svc.clock())
    page = svc.requests.list(who, state=state, role=role, limit=limit, continuation=continuation)
    return {"requests": [r.to_public(now) for r in page.requests], "next": page.next}


@router.get("/{request_id}")
def get(request: Request, request_id: str, who: Identity = Depends(caller)) -> dict:
    """The request; once issued, also its certificate's validity and whether it was revoked."""
    svc = service(request)
    rec = svc.requests.get(who, request_id)
    out = rec.to_public(int(svc.clock()))
    cert = svc.requests.certificate_of(who, rec)
    if cert is not None:
        out.update(valid_after=cert.valid_after, valid_before=cert.valid_before, revoked_at=cert.revoked_at)
    return out


@router.post("/{request_id}/certificate")
def certificate(
    request: Request,
    request_id: str,
    who: Identity = Depends(caller),
    cert: CertificateBody = body(CertificateBody, CERTIFICATE_REFUSED),
) -> JSONResponse:
    svc = service(request)
    return render(svc.issuance.issue_for_request(who, request_id, cert.public_key), int(svc.clock()))


def _decide(action: str) -> Callable[..., dict[str, Any]]:
    refused = decision_refused(action)

    def handler(
        request: Request,
        request_id: str,
        who: Identity = Depends(caller),
        decision: DecisionBody = body(DecisionBody, refused),
    ) -> dict[str, Any]:
        svc = service(request)
        rec = getattr(svc.requests, action)(who, request_id, decision.comment)
        return rec.to_public(int(svc.clock()))

    return handler


for _action in ("approve", "deny", "cancel"):
    router.add_api_route(f"/{{request_id}}/{_action}", _decide(_action), methods=["POST"], name=_action)


@router.post("/{request_id}/{action}")
def unknown_action(request_id: str, action: str) -> None:
    raise NotFound(f"Unknown action {action!r}; use approve, deny or cancel.")
