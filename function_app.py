"""Azure Functions entry point (Python v2 programming model). Thin by design.

The HTTP API is the FastAPI app from functions/api, served through func.AsgiFunctionApp. Settings,
storage and signer are built lazily on the first request of each worker, so a bad setting shows up
as a clear error in the logs and a 500 with a request id, not as a failed import.
"""

import azure.functions as func

from functions.wiring import asgi_app

app = func.AsgiFunctionApp(app=asgi_app(), http_auth_level=func.AuthLevel.ANONYMOUS)
