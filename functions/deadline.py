"""One deadline per API request, shared by every storage and signer call the request makes.

The API sets it (`within(seconds)`) around each request; the Table Storage and Key Vault pipelines
read it before each attempt (`deadline_hook`, installed through azure-core's `raw_request_hook`):
every attempt's connect and read timeouts are cut to what is left, and no attempt starts once it has
passed. A hung store or vault then costs a caller at most the deadline, not one read timeout per retry.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from azure.core.exceptions import AzureError

_deadline: ContextVar[float | None] = ContextVar("ezssh_deadline", default=None)


class DeadlinePassed(AzureError):
    """Not retried by azure-core (it retries only connection and response errors)."""


@contextmanager
def within(seconds: float) -> Iterator[None]:
    token = _deadline.set(time.monotonic() + seconds)
    try:
        yield
    finally:
        _deadline.reset(token)


def remaining() -> float | None:
    """Seconds left for the current request; None outside a request (timers, scripts)."""
    d = _deadline.get()
    return None if d is None else d - time.monotonic()


def deadline_hook(request: Any) -> None:
    """azure-core raw_request_hook: fit this attempt into what is left of the deadline."""
    left = remaining()
    if left is None:
        return
    if left <= 0.05:
        raise DeadlinePassed("The request's deadline passed before storage answered.")
    opts = request.context.options
    opts["connection_timeout"] = min(float(opts.get("connection_timeout") or 5), left)
    opts["read_timeout"] = min(float(opts.get("read_timeout") or 20), left)
