"""Shared request plumbing: the worker's context, the caller's identity, and the one body parser.

Handlers are plain `def` functions (FastAPI runs them in its thread pool, where storage and HSM
calls may block); what needs the event loop (reading the body) happens in these dependencies.
"""

from __future__ import annotations

import json
from typing import Any, Callable, TypeVar

from fastapi import Depends, Request
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.concurrency import run_in_threadpool

from ..core.errors import EzsshError, InvalidRequest
from ..core.policy import Identity
from ..service import Service
from .errors import describe

M = TypeVar("M", bound=BaseModel)
MAX_BODY = 64 * 1024


class Strict(BaseModel):
    """Request bodies reject unknown fields and do not coerce types."""

    model_config = ConfigDict(extra="forbid", strict=True)


def context(request: Request) -> Any:
    """The worker's one functions.wiring.Context (settings, service, validator, enrolments)."""
    return request.app.state.context()


def service(request: Request) -> Service:
    return context(request).service


def identify(request: Request) -> Identity:
    """The caller's Identity, from a plain `def` handler (blocking: runs where the handler runs)."""
    ctx = context(request)
    request.app.state.ready = ctx
    with ctx.service.base.refusing(None, "auth.refused", details={"path": request.url.path}):
        return ctx.validator.validate(request.headers.get("authorization"))


async def caller(request: Request) -> Identity:
    """The caller's Identity. A token this worker verified before (functions.identity) is answered
    on the event loop; anything else (first check, JWKS fetch, a refusal's audit write) in the
    thread pool."""
    ready = getattr(request.app.state, "ready", None)
    if ready is not None:
        hit = ready.validator.cached(request.headers.get("authorization"))
        if hit is not None:
            return hit
    return await run_in_threadpool(identify, request)


def _decode(raw: bytes, *, what: str = "request body") -> object:
    if len(raw) > MAX_BODY:
        raise InvalidRequest(f"The {what} is too large.")
    try:
        return json.loads(raw or b"null")
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise InvalidRequest(f"The {what} is not valid JSON.") from None


def body(model: type[M] | None, action: str) -> Any:
    """The one dependency for JSON bodies: `doc = body(Model, "x.refused")` in a handler's
    signature. With a model, the body must be an object that validates against it (unknown fields
    refused); with None, any JSON document (the policy routes validate it in the service). A bad
    body is refused through the service's one refusal path."""

    def validate(raw: bytes) -> Any:  # no I/O: runs on the event loop
        if model is None:
            return _decode(raw, what="document")
        data = _decode(raw or b"{}")
        if not isinstance(data, dict):
            raise InvalidRequest("The request body must be a JSON object.")
        try:
            return model.model_validate(data)
        except ValidationError as exc:
            raise InvalidRequest(describe(exc.errors())) from None

    async def parse(request: Request, who: Identity = Depends(caller)) -> Any:
        raw = await request.body()
        try:
            return validate(raw)
        except EzsshError as exc:
            # a refusal writes its audit entry: off the event loop, like the handlers
            await run_in_threadpool(service(request).base.refuse, who, exc, action,
                                    details={"path": request.url.path})
            raise

    return Depends(parse)


Factory = Callable[[], Any]
