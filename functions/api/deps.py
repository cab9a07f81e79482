"""Shared request plumbing: the worker's context, the caller's identity, and the one body parser.

Handlers are plain `def` functions (FastAPI runs them in its thread pool, where storage and HSM
calls may block); what needs the event loop (reading the body) happens in these dependencies.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from fastapi import Depends, Request
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.concurrency import run_in_threadpool

from ..core.errors import EzsshError, InvalidRequest
from ..core.policy import Identity
from ..service import Service
from .errors import describe, fields_of

if TYPE_CHECKING:
    from ..health import Health
    from ..identity import TokenValidator
    from ..service.enrolment import EnrolmentService
    from ..settings import Settings

M = TypeVar("M", bound=BaseModel)
MAX_BODY = 64 * 1024
MAX_DEPTH = 32  # nesting of JSON arrays and objects; every document we take needs fewer than 8


class Strict(BaseModel):
    """Request bodies reject unknown fields and do not coerce types."""

    model_config = ConfigDict(extra="forbid", strict=True)


class Worker(Protocol):
    """What the handlers read from the worker's one context (functions.wiring.Context fills it; the
    API names it here so that it imports nothing above it)."""

    @property
    def settings(self) -> Settings: ...
    @property
    def service(self) -> Service: ...
    @property
    def validator(self) -> TokenValidator: ...
    @property
    def enrolments(self) -> EnrolmentService | None: ...
    @property
    def health(self) -> Health: ...


def context(request: Request) -> Worker:
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


def json_depth(raw: bytes) -> int:
    """The deepest nesting of arrays/objects in a JSON text, counted without parsing it (so a
    hostile document is measured before any recursive decoder sees it)."""
    depth = deepest = 0
    in_string = escaped = False
    for b in raw:
        if in_string:
            if escaped:
                escaped = False
            elif b == 0x5C:  # backslash
                escaped = True
            elif b == 0x22:
                in_string = False
        elif b == 0x22:
            in_string = True
        elif b in (0x5B, 0x7B):  # [ {
            depth += 1
            if depth > deepest:
                deepest = depth
        elif b in (0x5D, 0x7D):
            depth -= 1
    return deepest


def _finite_float(text: str) -> float:
    v = float(text)
    if not math.isfinite(v):
        raise InvalidRequest("Numbers in the request must be finite.")
    return v


def _no_constants(name: str) -> float:
    raise InvalidRequest(f"{name} is not a JSON number; numbers must be finite.")


def _check_strings(value: object, where: str) -> None:
    """Every string (and key) must be valid Unicode that storage can hold: no lone surrogates."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                raise InvalidRequest(f"A string in the {where} is not valid Unicode (a lone surrogate).") from None
        elif isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)


def load_json(raw: bytes, *, what: str = "request body", empty: bytes = b"null") -> object:
    """Decode a JSON body with bounds: size, nesting depth (measured before parsing), finite
    numbers only (no NaN, Infinity or 1e400), strings storage can hold (no lone surrogates)."""
    if len(raw) > MAX_BODY:
        raise InvalidRequest(f"The {what} is too large.")
    # fewer opening brackets than the limit (most bodies) cannot nest deeper: no scan needed
    if raw.count(b"[") + raw.count(b"{") > MAX_DEPTH and json_depth(raw) > MAX_DEPTH:
        raise InvalidRequest(f"The {what} nests deeper than {MAX_DEPTH} levels.")
    try:
        data = json.loads(raw or empty, parse_float=_finite_float, parse_constant=_no_constants)
    except InvalidRequest:
        raise
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise InvalidRequest(f"The {what} is not valid JSON.") from None
    _check_strings(data, what)
    return data


def finite_number(value: str | None, name: str) -> float | None:
    """A number from a query string: finite, or InvalidRequest (float() takes inf and nan)."""
    if value is None:
        return None
    try:
        v = float(value)
    except ValueError:
        raise InvalidRequest(f"'{name}' must be a number.") from None
    if not math.isfinite(v):
        raise InvalidRequest(f"'{name}' must be a finite number.")
    return v


def body(model: type[M] | None, action: str, *, host: bool = False) -> Any:
    """The one dependency for JSON bodies: `doc = body(Model, USE_CASE_REFUSED)` in a handler's
    signature. With a model, the body must be an object that validates against it (unknown fields
    refused); with None, any JSON document (the policy routes validate it in the service). A bad
    body is refused through the service's one refusal path. `host=True`: the caller is a host
    proving itself in the body (no bearer token), so no identity is asked for."""

    def validate(raw: bytes) -> Any:  # no I/O: runs on the event loop
        if model is None:
            return load_json(raw, what="document")
        data = load_json(raw, empty=b"{}")
        if not isinstance(data, dict):
            raise InvalidRequest("The request body must be a JSON object.")
        try:
            return model.model_validate(data)
        except ValidationError as exc:
            raise InvalidRequest(describe(exc.errors()), fields=fields_of(exc.errors())) from None

    async def parsed(request: Request, who: Identity | None) -> Any:
        raw = await request.body()
        try:
            # small bodies on the event loop; a large one (its depth scan is a few ms) off it
            return validate(raw) if len(raw) <= 8192 else await run_in_threadpool(validate, raw)
        except EzsshError as exc:
            # a refusal writes its audit entry: off the event loop, like the handlers
            # with the request the path names, as the use case records it
            named = (
                {"request_id": str(request.path_params["request_id"])[:64]}
                if "request_id" in request.path_params
                else {}
            )
            await run_in_threadpool(
                functools.partial(
                    service(request).base.refuse, who, exc, action, details={"path": request.url.path}, **named
                )
            )
            raise

    if host:

        async def parse_from_host(request: Request) -> Any:
            return await parsed(request, None)

        return Depends(parse_from_host)

    async def parse(request: Request, who: Identity = Depends(caller)) -> Any:
        return await parsed(request, who)

    return Depends(parse)


Factory = Callable[[], Any]
