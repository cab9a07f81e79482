"""Structured log events that carry the HTTP request id.

The API middleware sets `request_id` for each request; blocking service code runs in the worker
thread pool, which copies context variables, so every event logged while serving a request names
it. Fields go both into the message (for plain logs) and into `extra` (Azure Monitor exports them
as custom dimensions).
"""

from __future__ import annotations

import logging
from contextvars import ContextVar

request_id: ContextVar[str] = ContextVar("ezssh_request_id", default="-")


def event(logger: logging.Logger, name: str, level: int = logging.INFO, **fields: object) -> None:
    """Log one event. Never raises: a logging problem must not fail the request it describes."""
    try:
        fields = {"event": name, "request_id": request_id.get(), **{k: v for k, v in fields.items() if v is not None}}
        text = " ".join(f"{k}={v}" for k, v in fields.items() if k != "event")
        logger.log(level, "%s %s", name, text, extra={f"ezssh_{k}": str(v) for k, v in fields.items()})
    except Exception:
        logging.getLogger(__name__).debug("could not log event %s", name, exc_info=True)
