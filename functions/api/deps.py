"""Shared request plumbing: the per-worker context, the caller's identity, strict body parsing."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

from fastapi import Request
from pydantic import BaseModel, ConfigDict, ValidationError

from ..core.errors import EzsshError, InvalidRequest, Unauthenticated
from ..core.policy import Identity
from ..identity import TokenValidator
from ..service import Service
from ..settings import Settings
from .errors import describe

M = TypeVar("M", bound=BaseModel)
MAX_BODY = 64 * 1024


@dataclass
class Context:
    settings: Settings
    service: Service
    validator: TokenValidator
    enrolments: Any = None  # functions.hosts.enrolment.EnrolmentService (push to Azure VMs)


class Strict(BaseModel):
    """Request bodies reject unknown fields and do not coerce types."""

    model_config = ConfigDict(extra="forbid", strict=True)


def context(request: Request) -> Context:
    return request.app.state.context()


def service(request: Request) -> Service:
    return context(request).service


def caller(request: Request) -> Identity:
    ctx = context(request)
    try:
        return ctx.validator.validate(request.headers.get("authorization"))
    except Unauthenticated as exc:
        ctx.service.refuse(None, exc, "auth.refused", details={"path": request.url.path})
        raise


async def parse_body(request: Request, model: type[M], who: Identity | None, action: str) -> M:
    """Parse a JSON body into `model`; a bad body is refused (and audited) with a clear message."""
    svc = service(request)
    try:
        raw = await request.body()
        if len(raw) > MAX_BODY:
            raise InvalidRequest("The request body is too large.")
        try:
            data = json.loads(raw or b"{}")
        except (ValueError, UnicodeDecodeError):
            raise InvalidRequest("The request body is not valid JSON.") from None
        if not isinstance(data, dict):
            raise InvalidRequest("The request body must be a JSON object.")
        try:
            return model.model_validate(data)
        except ValidationError as exc:
            raise InvalidRequest(describe(exc.errors())) from None
    except EzsshError as exc:
        svc.refuse(who, exc, action, details={"path": request.url.path})
        raise


Factory = Callable[[], Context]
