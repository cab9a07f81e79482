"""Enrolment: push a policy's host setup script to Azure VMs, by hand, on VM events, and by reconcile.

Nothing runs Run Command on a request's path. A request becomes a job (one item per VM, Table
Storage) and one queue message per VM (Azure Storage Queue); the queue-triggered function runs the
push (`run_message`). The HTTP call and the Event Grid delivery return as soon as the messages are
queued; the job's state is read back with `job()`.

The messages go through an outbox (storage/enrolmentjobs.py): the job row, its audit entry and every
item with its unsent message land in one transaction first; the messages are sent after, within the
request's deadline, and each one sent is struck off. What the queue did not take (down, slow, an
answer lost) the timer sends (`send_unsent`). A message sent twice changes nothing: its handler
claims the item with the queue's message id, and another message for a claimed or finished item is
dropped; a redelivery of the same message (its worker died) carries on.

Use cases (EnrolmentService: enrol.py, jobs.py, reconcile.py over push.py (one push attempt) and
outbox.py (a job and its queue messages), both over base.py; ports.py for the adapters):
  enrol(who, policy, vm_id=... | resource_group=..., tag="k=v")   POST /api/policies/{id}/enrolments (202)
  job(who, policy, job_id)                                          GET  /api/policies/{id}/enrolment-jobs/{job}
  list(who, policy, limit, continuation)                            GET  /api/policies/{id}/enrolments (a page)
  handle_event(event)        Event Grid: Microsoft.Resources.ResourceWriteSuccess for a VM write
  reconcile()                timer: due retries, VMs in scope not yet enrolled, re-push after a CA
                             rotation or a revocation (pushed CA fingerprints / KRL version differ)
  run_message(body, id)      queue trigger: one VM of one job
  send_unsent()              timer: the messages of jobs the queue has not taken yet
  give_up(body)              poison queue trigger: the message failed every delivery

A VM is covered by a policy (for events and reconcile) when its tag `ezssh-policy` names the policy
(`<policy id>` or `<tenant id>/<policy id>`; several separated by commas), or when one of the
policy's host patterns is a resource id (the VM or its resource group) or a `tag:name=value` that the
VM carries. Name globs and CIDRs never enrol anything on their own.

Each push is one attempt on an enrolment record (storage/enrolments.py): the record is claimed with
an ETag-guarded update (state pending, a lease longer than the function timeout), the script runs
through Run Command, and the outcome is written back: succeeded (with the CA fingerprints and KRL
version pushed), retrying (a transient failure: agent not ready, throttling, ARM unavailable; next
attempt after an exponential backoff), or failed (VM gone, permission missing, the script exited non-zero, or too many attempts).
Only VMs inside the configured scopes (EZSSH_ENROL_SCOPES) are ever touched.

A worker that dies mid-push (killed, or past the function timeout) leaves its lease on the record; the
message comes back after its visibility timeout, finds the lease, and is queued again to run when
the lease ends, so a VM's script never runs twice at the same time. Each push is audited when it
starts (`enrolment.push_started`, with the claim) and when it ends (pushed / retrying / failed, with
the outcome), and an abandoned message as `enrolment.gave_up`, so a push that ran on a VM is on record
even when its worker died. Retries are bounded: transient
Run Command failures by `max_attempts` (the timer re-queues them after the backoff), crashes by the
host's maxDequeueCount (then the poison queue, and `give_up` marks the item failed).
"""

from __future__ import annotations

from .enrol import Enrol
from .jobs import JobRunner
from .ports import EnrolConfig, JobQueue, VmHostCerts, VmPusher
from .reconcile import Reconcile

__all__ = ["EnrolConfig", "EnrolmentService", "JobQueue", "VmHostCerts", "VmPusher"]


class EnrolmentService(Enrol, JobRunner, Reconcile):
    """Enrolment's use cases over one set of ports."""
