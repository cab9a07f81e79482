"""The FastAPI application. Azure Functions serves it through func.AsgiFunctionApp; uvicorn locally."""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import deadline, observability
from . import audit, enrolments, errors, hostcerts, hosts, identities, meta, namespaces, policies, requests, web

log = logging.getLogger("ezssh.api")
# Every storage call of one request shares this many seconds (functions/deadline.py); well under
# the Functions front end's HTTP limit (about 230 s) and a client's patience.
REQUEST_DEADLINE = 10.0


class RequestContext:
    """Each request's id (X-Request-Id, the log events' request_id) and deadline, and no-store.

    A plain ASGI middleware: FastAPI's @app.middleware("http") runs every request through an extra
    task and memory streams, CPU on every request (bench/issue.py measures it)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = secrets.token_hex(8)
        scope.setdefault("state", {})["request_id"] = rid

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers["X-Request-Id"] = rid
                if "cache-control" not in headers:  # the web page's files say how they are cached
                    headers["Cache-Control"] = "no-store"
            await send(message)

        token = observability.request_id.set(rid)
        try:
            with deadline.within(REQUEST_DEADLINE):
                await self.app(scope, receive, send_with_headers)
        finally:
            observability.request_id.reset(token)


def create_app(context: Callable[[], Any]) -> FastAPI:
    """`context()` returns the worker's one Context (settings, adapters, service), built on first
    use and the same object on every call afterwards: functions.wiring.shared_context."""
    app = FastAPI(title="ezssh", version="0.1.0", docs_url=None, redoc_url=None, openapi_url="/api/openapi.json")
    app.state.context = context

    app.add_middleware(RequestContext)
    errors.install(app)
    app.include_router(meta.router)
    app.include_router(requests.router)
    app.include_router(policies.router)
    app.include_router(audit.router)
    app.include_router(hosts.router)
    app.include_router(enrolments.router)
    app.include_router(hostcerts.router)
    app.include_router(identities.router)
    app.include_router(namespaces.router)
    app.include_router(web.router)
    return app
