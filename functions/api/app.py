"""The FastAPI application. Azure Functions serves it through func.AsgiFunctionApp; uvicorn locally."""

from __future__ import annotations

import logging
import secrets
from typing import Any, Callable

from fastapi import FastAPI, Request

from .. import deadline, observability
from . import audit, errors, meta, policies, requests
from . import hosts
from . import enrolments
from . import hostcerts

log = logging.getLogger("ezssh.api")
# Every storage call of one request shares this many seconds (functions/deadline.py); well under
# the Functions front end's HTTP limit (about 230 s) and a client's patience.
REQUEST_DEADLINE = 10.0


def create_app(context: Callable[[], Any]) -> FastAPI:
    """`context()` returns the worker's one Context (settings, adapters, service), built on first
    use and the same object on every call afterwards: functions.wiring.shared_context."""
    app = FastAPI(title="ezssh", version="0.1.0", docs_url=None, redoc_url=None, openapi_url="/api/openapi.json")
    app.state.context = context

    @app.middleware("http")
    async def request_id(request: Request, call_next):  # type: ignore[no-untyped-def]
        rid = secrets.token_hex(8)
        request.state.request_id = rid
        token = observability.request_id.set(rid)
        try:
            with deadline.within(REQUEST_DEADLINE):
                response = await call_next(request)
        finally:
            observability.request_id.reset(token)
        response.headers["X-Request-Id"] = rid
        response.headers["Cache-Control"] = "no-store"
        return response

    errors.install(app)
    app.include_router(meta.router)
    app.include_router(requests.router)
    app.include_router(policies.router)
    app.include_router(audit.router)
    app.include_router(hosts.router)
    app.include_router(enrolments.router)
    app.include_router(hostcerts.router)
    return app
