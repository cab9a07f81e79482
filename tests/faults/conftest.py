"""Fault injection against the real stand-ins: a proxy in front of Azurite that fails, delays or
loses chosen storage calls; Azurite stopped (SIGSTOP) and resumed; the SoftHSM token taken away and
brought back; an API worker killed mid-request."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any, Iterator

import pytest

from tests.api.conftest import pub  # noqa: F401 - a fixture for this folder too
from tests.standins.faultproxy import FaultProxy


@pytest.fixture(scope="module")
def proxy(azurite) -> Iterator[FaultProxy]:
    p = FaultProxy(azurite.port).start()
    yield p
    p.stop()


@dataclass
class Faulty:
    """The API app wired to storage through the proxy, and a direct view of storage for checks."""

    proxy: FaultProxy
    context: Any
    client: Any  # starlette TestClient on the real FastAPI app
    truth: Any  # TableStore straight on Azurite: what really landed
    table: str


@pytest.fixture(scope="module")
def faulty(api_env, azurite, proxy, context) -> Iterator[Faulty]:
    from azure.data.tables import TableServiceClient
    from starlette.testclient import TestClient

    from functions.api.app import create_app
    from functions.service import Service
    from functions.storage.tables import CLIENT_OPTIONS, TableStore
    from functions.wiring import Context

    table = f"faults{uuid.uuid4().hex[:10]}"
    # the production client options, with a short backoff so each injected outage is quick
    options = {**CLIENT_OPTIONS, "retry_backoff_factor": 0.02, "retry_backoff_max": 0.1}
    store = TableStore(TableServiceClient.from_connection_string(proxy.connection_string(), **options), table)
    store.ensure_table()
    truth = TableStore.from_connection_string(azurite.connection_string, table)
    service = Service(store, context.service.keys, context.service.base.config)
    ctx = Context(settings=context.settings, service=service, validator=context.validator)
    with TestClient(create_app(lambda: ctx), raise_server_exceptions=False) as client:
        yield Faulty(proxy, ctx, client, truth, table)
    proxy.heal()
