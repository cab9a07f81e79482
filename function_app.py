"""Azure Functions entry point (Python v2 programming model). Thin by design.

- The HTTP API is the FastAPI app from functions/api, served through func.AsgiFunctionApp.
- `expire_requests` (timer, every minute): expires stale access requests and retires CA keys whose
  rotation window has passed.
- `revoke_leavers` (timer, every minute; each tenant swept every EZSSH_LEAVER_INTERVAL seconds):
  the identities that hold live certificates are checked in Microsoft Graph; every certificate of
  one that is disabled, deleted (or rated risky, where set) is revoked, with the reason audited.
- Enrolment: `enrol_vm_event` (Event Grid), `reconcile_enrolments` (timer), and the queue triggers
  `enrol_job` and `enrol_job_poison` that push the host setup script to Azure VMs.

Settings, storage and signer are built lazily on first use in each worker, so a bad setting shows up
as a clear error in the logs and a 500 with a request id, not as a failed import.
"""

import logging

import azure.functions as func

from functions.storage.queue import ENROL_QUEUE, POISON_SUFFIX
from functions.wiring import asgi_app, shared_context

app = func.AsgiFunctionApp(app=asgi_app(), http_auth_level=func.AuthLevel.ANONYMOUS)


@app.timer_trigger(schedule="0 */1 * * * *", arg_name="timer", run_on_startup=False, use_monitor=True)
def expire_requests(timer: func.TimerRequest) -> None:
    ctx = shared_context()
    result = ctx.service.housekeeping(ctx.settings.tenants)
    logging.getLogger("ezssh.timer").info("housekeeping: %s", result)


@app.timer_trigger(schedule="30 */1 * * * *", arg_name="timer", run_on_startup=False, use_monitor=True)
def revoke_leavers(timer: func.TimerRequest) -> None:
    ctx = shared_context()
    result = ctx.service.identities.sweep(ctx.settings.tenants)
    logging.getLogger("ezssh.timer").info("leaver sweep: %s", result)


# ---- hosts: enrolment jobs -------------------------------------------------------------------------
# Nothing here runs Run Command on a request's path. The API (POST /api/policies/{id}/enrolments),
# `enrol_vm_event` and `reconcile_enrolments` only write a job and queue one message per VM, then
# return; `enrol_job` (queue trigger) pushes one VM per message. host.json bounds the time:
# functionTimeout 10 min > Run Command's poll timeout (8 min); the record's lease (11 min) outlives a
# worker that the host killed. A message that fails maxDequeueCount deliveries lands in the poison
# queue, where `enrol_job_poison` marks its item failed.
# `enrol_vm_event` (Event Grid, one event per invocation): Microsoft.Resources.ResourceWriteSuccess
# for Microsoft.Compute/virtualMachines/write. Queues a job for every policy that covers the VM (tag
# ezssh-policy=<id>, or a resource id / tag: host pattern) and is due there: a VM already set up with
# the policy's current CA keys and KRL is left alone, since every update of the VM fires the same
# event. It answers Event Grid at once; an unreachable ARM fails the invocation, so that Event Grid
# delivers again.
# `reconcile_enrolments` (timer, every 2 minutes): sends the job messages the queue has not taken yet
# (the outbox), then queues due retries, VMs in EZSSH_ENROL_SCOPES not yet enrolled, and re-pushes
# after a CA rotation or a revocation.


@app.queue_trigger(arg_name="msg", queue_name=ENROL_QUEUE, connection="AzureWebJobsStorage")
def enrol_job(msg: func.QueueMessage) -> None:
    outcome = shared_context().enrolments.run_message(msg.get_body(), msg.id)
    logging.getLogger("ezssh.jobs").info("message %s (delivery %s): %s", msg.id, msg.dequeue_count, outcome)


@app.queue_trigger(arg_name="msg", queue_name=ENROL_QUEUE + POISON_SUFFIX, connection="AzureWebJobsStorage")
def enrol_job_poison(msg: func.QueueMessage) -> None:
    outcome = shared_context().enrolments.give_up(msg.get_body())
    logging.getLogger("ezssh.jobs").error("poison message %s: %s", msg.id, outcome)


@app.event_grid_trigger(arg_name="event")
def enrol_vm_event(event: func.EventGridEvent) -> None:
    ctx = shared_context()
    jobs = ctx.enrolments.handle_event(event.event_type, event.subject, event.get_json())
    logging.getLogger("ezssh.events").info(
        "event %s %s: %s", event.id, event.subject, [(j.policy_id, j.job_id) for j in jobs] or "nothing to do")


@app.timer_trigger(schedule="0 */2 * * * *", arg_name="timer", run_on_startup=False, use_monitor=True)
def reconcile_enrolments(timer: func.TimerRequest) -> None:
    ctx = shared_context()
    sent = ctx.enrolments.send_unsent()  # the outbox first: jobs whose messages the queue did not take
    result = ctx.enrolments.reconcile()
    logging.getLogger("ezssh.timer").info("reconcile enrolments: %s; outbox %s", result, sent)
