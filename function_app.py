"""Azure Functions entry point (Python v2 programming model). Thin by design.

- The HTTP API is the FastAPI app from functions/api, served through func.AsgiFunctionApp.
- `expire_requests` (timer, every minute): expires stale access requests and retires CA keys whose
  rotation window has passed.

Settings, storage and signer are built lazily on first use in each worker, so a bad setting shows up
as a clear error in the logs and a 500 with a request id, not as a failed import.
"""

import logging

import azure.functions as func

from functions.wiring import asgi_app, shared_context

app = func.AsgiFunctionApp(app=asgi_app(), http_auth_level=func.AuthLevel.ANONYMOUS)


@app.timer_trigger(schedule="0 */1 * * * *", arg_name="timer", run_on_startup=False, use_monitor=True)
def expire_requests(timer: func.TimerRequest) -> None:
    ctx = shared_context()
    result = ctx.service.housekeeping(ctx.settings.tenants)
    logging.getLogger("ezssh.timer").info("housekeeping: %s", result)
