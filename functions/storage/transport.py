"""The HTTP transport of the Table Storage client: azure-data-tables' own pipeline on one
requests.Session made for a server that answers many concurrent calls.

What differs from the SDK's default transport, and why (figures from bench/issue.py):
- Connection pool of POOL_SIZE per host (requests' default is 10). The API runs storage calls from
  up to 40 threads at once (anyio's default thread pool); with 10, every call past the tenth opens a
  new TCP connection and throws it away afterwards.
- `trust_env` off, with the proxy settings and CA bundle read from the environment ONCE, here: by
  default requests walks the whole process environment on every call to find proxies (CPU on every
  storage call). Same behaviour for HTTPS_PROXY / NO_PROXY / REQUESTS_CA_BUNDLE, decided
  at start instead of per call; no ~/.netrc lookup.
- No retries inside urllib3: azure-core's retry policy (CLIENT_OPTIONS) is the one that retries.

Everything else (authentication, the retry policy, request ids, the SDK's serialisation) is the
SDK's, configured through its documented keyword arguments.
"""

from __future__ import annotations

import os
from typing import Any

import requests
from azure.core.pipeline.transport import RequestsTransport

POOL_SIZE = 64


def table_transport(endpoint: str, *, connection_timeout: float, read_timeout: float) -> RequestsTransport:
    session = requests.Session()
    session.trust_env = False
    session.proxies.update(requests.utils.get_environ_proxies(endpoint))
    adapter = requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=POOL_SIZE, max_retries=0)
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    bundle = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
    verify: dict[str, Any] = {"connection_verify": bundle} if bundle else {}
    return RequestsTransport(
        session=session, session_owner=True, connection_timeout=connection_timeout, read_timeout=read_timeout, **verify
    )


def endpoint_of(connection_string: str) -> str:
    """The table endpoint a connection string names (for the proxy decision only)."""
    parts = dict(p.split("=", 1) for p in connection_string.split(";") if "=" in p)
    if parts.get("TableEndpoint"):
        return parts["TableEndpoint"]
    return (
        f"{parts.get('DefaultEndpointsProtocol', 'https')}://{parts.get('AccountName', '')}.table."
        f"{parts.get('EndpointSuffix', 'core.windows.net')}"
    )


def client_options(endpoint: str, options: dict[str, Any]) -> dict[str, Any]:
    """`options` (retry and timeout settings) plus the transport above, for TableServiceClient."""
    return {
        **options,
        "transport": table_transport(
            endpoint, connection_timeout=options["connection_timeout"], read_timeout=options["read_timeout"]
        ),
    }
