"""ASGI apps the benchmark serves with uvicorn next to the real one (`--factory`).

- `trivial`: FastAPI with one plain `def` POST route (thread pool) whose body is read by an async
  dependency, answering a small JSON document, as the real routes do: what uvicorn + FastAPI cost
  with no ezssh code in the way.
- `keyvault`: the real ezssh app, wired exactly as functions/wiring.py does but with the CA keys in
  the Key Vault stand-in (the real azure-keyvault-keys SDK over HTTPS), which answers after a chosen
  latency. The stand-in runs in the benchmark process; BENCH_KV_URL, BENCH_KV_CA and BENCH_KV_TOKEN
  say where it is and how to reach it. Production wiring uses DefaultAzureCredential, which cannot
  get a token here.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def trivial() -> FastAPI:
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)

    async def body(request: Request) -> dict:  # read on the event loop, as the real app does
        return json.loads(await request.body())

    @app.post("/api/requests")
    def echo(doc: dict = Depends(body)) -> JSONResponse:  # plain def: runs in the thread pool
        return JSONResponse({"status": "ok", "fields": len(doc)}, status_code=201)

    return app


def keyvault_context(env: dict[str, str], kv_url: str, kv_ca: str, kv_token: str):  # type: ignore[no-untyped-def]
    """A Context like functions.wiring.build_context, with a KeyVaultKeyStore on the stand-in."""
    from functions.identity import TokenValidator
    from functions.service import Service
    from functions.settings import load_settings
    from functions.signing.keyvault import KeyVaultKeyStore
    from functions.wiring import Context, build_store, service_config
    from tests.standins.keyvault import StaticTokenCredential

    settings = load_settings(env)
    store = build_store(settings)
    keys = KeyVaultKeyStore(kv_url, StaticTokenCredential(kv_token), connection_verify=kv_ca,
                            verify_challenge_resource=False)
    service = Service(store, keys, service_config(settings, signer_backend="keyvault"))
    validator = TokenValidator(settings)
    validator.warm()
    return Context(settings=settings, service=service, validator=validator)


def keyvault():  # type: ignore[no-untyped-def]
    from functions.api.app import create_app

    ctx = keyvault_context(dict(os.environ), os.environ["BENCH_KV_URL"], os.environ["BENCH_KV_CA"],
                           os.environ["BENCH_KV_TOKEN"])
    return create_app(lambda: ctx)
