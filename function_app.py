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


# ---- hosts: auto-enrolment -------------------------------------------------------------------------
# `enrol_vm_event` (Event Grid, one event per invocation): Microsoft.Resources.ResourceWriteSuccess
# for Microsoft.Compute/virtualMachines/write. Pushes the setup script of every policy that covers
# the VM (tag ezssh-policy=<id>, or a resource id / tag: host pattern). Idempotent: a VM already
# set up with the policy's current CA keys and KRL is left alone, since every update of the VM fires
# the same event. A VM whose agent is not ready gets a retrying record that the timer picks up; an
# unreachable ARM fails the invocation so that Event Grid delivers again.
# `reconcile_enrolments` (timer, every 2 minutes): due retries, VMs in EZSSH_ENROL_SCOPES not yet
# enrolled, and re-pushes after a CA rotation or a revocation.


@app.event_grid_trigger(arg_name="event")
def enrol_vm_event(event: func.EventGridEvent) -> None:
    ctx = shared_context()
    recs = ctx.enrolments.handle_event(event.event_type, event.subject, event.get_json())
    logging.getLogger("ezssh.events").info(
        "event %s %s: %s", event.id, event.subject, [(r.policy_id, r.state, r.attempts) for r in recs] or "nothing to do")


@app.timer_trigger(schedule="0 */2 * * * *", arg_name="timer", run_on_startup=False, use_monitor=True)
def reconcile_enrolments(timer: func.TimerRequest) -> None:
    ctx = shared_context()
    result = ctx.enrolments.reconcile()
    logging.getLogger("ezssh.timer").info("reconcile enrolments: %s", result)
