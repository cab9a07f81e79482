"""The one place where errors become HTTP responses.

User errors (EzsshError, 4xx) carry their stable code and message. Anything else is a system error:
logged with the request id and answered with a generic 500. No response ever holds a stack trace.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..core.errors import EzsshError

log = logging.getLogger("ezssh.api")


def request_id_of(request: Request) -> str:
    return getattr(request.state, "request_id", "-")


def error_response(request: Request, status: int, code: str, message: str, **extra: object) -> JSONResponse:
    body: dict[str, object] = {"error": code, "message": message, "request_id": request_id_of(request)}
    body.update({k: v for k, v in extra.items() if v is not None})
    headers = {"WWW-Authenticate": 'Bearer realm="ezssh"'} if status == 401 else None
    return JSONResponse(body, status_code=status, headers=headers)


def describe(errors: Sequence[Mapping[str, Any]]) -> str:
    """One readable sentence from pydantic's error list."""
    parts = []
    for err in errors[:5]:
        loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
        if err.get("type") == "extra_forbidden":
            parts.append(f"unknown field '{loc}'")
        elif err.get("type") == "missing":
            parts.append(f"'{loc}' is required")
        else:
            parts.append(f"'{loc}': {err.get('msg', 'is not valid')}")
    return "Invalid request: " + "; ".join(parts) + "."


def fields_of(errors: Sequence[Mapping[str, Any]]) -> str:
    """The fields `describe` names, comma-separated (an error's `fields` detail: a client may say
    them in its own words)."""
    locs = (".".join(str(x) for x in err.get("loc", ()) if x != "body") for err in errors[:5])
    return ",".join(dict.fromkeys(loc for loc in locs if loc))


def install(app: FastAPI) -> None:
    @app.exception_handler(EzsshError)
    async def _ezssh(request: Request, exc: EzsshError) -> JSONResponse:
        if exc.status >= 500:
            log.error("request %s failed: %s %s", request_id_of(request), exc.code, exc.message)
        details = {k: v for k, v in exc.details.items() if isinstance(v, (str, int, float, bool))}
        return error_response(request, exc.status, exc.code, exc.message, **details)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(request, 400, "invalid_request", describe(exc.errors()), fields=fields_of(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(request, exc.status_code, code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("request %s failed with an unexpected error", request_id_of(request))
        return error_response(
            request,
            500,
            "internal_error",
            "Something went wrong on the server; quote the request id when reporting it.",
        )
