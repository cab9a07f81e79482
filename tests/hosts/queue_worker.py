"""A queue worker in its own process, so that a test can kill it (SIGKILL) in the middle of a push.

    python -m tests.hosts.queue_worker CONFIG.json

CONFIG: {"env": the service's settings, "arm_url", "arm_token", "arm_ca", "lease_seconds",
"invisible_for"}. It wires the service as the host tests do (ARM stand-in, static token), points
function_app's shared context at it, and serves the enrol_job queue trigger like the Functions host
(tests/queue_host.py) until it is killed.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
from dataclasses import replace


def main(path: str) -> None:
    from functions import wiring
    from functions.settings import load_settings
    from tests.queue_host import QueueHost
    from tests.standins.arm import StaticTokenCredential

    cfg = json.loads(open(path).read())
    settings = load_settings(cfg["env"])
    ctx = wiring.build_context(settings)
    ctx.enrolments = wiring.build_enrolments(settings, ctx.service, ctx.service.store,
                                             credential=StaticTokenCredential(cfg["arm_token"]),
                                             connection_verify=cfg["arm_ca"], polling_interval=0)
    ctx.enrolments.config = replace(ctx.enrolments.config, lease_seconds=cfg["lease_seconds"])
    wiring._context[:] = [ctx]  # noqa: SLF001 - what shared_context() hands function_app
    host = QueueHost(settings.storage_connection_string, "enrol_job", invisible_for=cfg["invisible_for"])
    print("worker ready", flush=True)
    host.serve(threading.Event())


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    main(sys.argv[1])
