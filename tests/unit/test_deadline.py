"""The per-request deadline (functions/deadline.py) as azure-core's pipeline sees it."""

from __future__ import annotations

import time

import pytest
from azure.core.pipeline import PipelineContext, PipelineRequest
from azure.core.rest import HttpRequest

from functions.deadline import DeadlinePassed, deadline_hook, remaining, within


def attempt(**options: object) -> PipelineRequest:
    ctx = PipelineContext(None)
    ctx.options.update(options)
    return PipelineRequest(HttpRequest("GET", "http://127.0.0.1/"), ctx)


def test_outside_a_request_nothing_changes() -> None:
    req = attempt(read_timeout=20)
    assert remaining() is None
    deadline_hook(req)
    assert req.context.options == {"read_timeout": 20}


def test_each_attempt_gets_at_most_what_is_left() -> None:
    with within(2.0):
        req = attempt(connection_timeout=5, read_timeout=20)
        deadline_hook(req)
        left = remaining()
        assert left is not None and 1.5 < left <= 2.0
        assert 1.5 < req.context.options["read_timeout"] <= 2.0
        assert 1.5 < req.context.options["connection_timeout"] <= 2.0


def test_no_attempt_starts_after_the_deadline_and_it_is_not_retried_by_azure_core() -> None:
    from azure.core.exceptions import ServiceRequestError, ServiceResponseError

    with within(0.1):
        time.sleep(0.15)
        with pytest.raises(DeadlinePassed):
            deadline_hook(attempt())
    assert not issubclass(DeadlinePassed, (ServiceRequestError, ServiceResponseError))  # what RetryPolicy retries
    assert remaining() is None  # the deadline ends with its request
