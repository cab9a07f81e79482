"""Enrolment state and its audit land together on Table Storage (Azurite): a push's outcome with
its audit entry, a job with its `enrolment.queued` entry. A failing audit write changes nothing."""

from __future__ import annotations

import uuid
from dataclasses import replace

import pytest

from functions.core.audit import AuditEntry
from functions.core.errors import Conflict
from functions.storage.enrolmentjobs import Job, JobItem, JobStore
from functions.storage.enrolments import Enrolment, EnrolmentStore
from functions.storage.tables import TableStore

T0 = 1_780_000_000.0


@pytest.fixture(scope="module")
def store(azurite) -> TableStore:
    s = TableStore.from_connection_string(azurite.connection_string, f"enraudit{uuid.uuid4().hex[:8]}")
    s.ensure_table()
    return s


def entry(tid: str, action: str) -> AuditEntry:
    return AuditEntry(tenant_id=tid, at=T0, action=action, outcome="ok", chain="enr:web").sealed()


def test_a_push_outcome_and_its_audit_land_together(store) -> None:
    tid = str(uuid.uuid4())
    enr = EnrolmentStore(store)
    rec = enr.create(Enrolment(tenant_id=tid, policy_id="web", vm_id="/subscriptions/s/resourceGroups/r/"
                                                                      "providers/Microsoft.Compute/virtualMachines/v"))
    first = entry(tid, "enrolment.pushed")
    done = enr.update(replace(rec, state="succeeded", attempts=1), rec.etag or "", first)
    assert done.state == "succeeded"
    assert [e.action for e in store.list_audit(tid)] == ["enrolment.pushed"]
    # the same audit entry again: the write fails, and the record stays as it was
    with pytest.raises(Conflict):
        enr.update(replace(done, state="failed", attempts=2), done.etag or "", first)
    got = enr.get(tid, "web", rec.vm_id)
    assert got is not None and got.state == "succeeded" and got.attempts == 1 and got.etag == done.etag
    assert [e.action for e in store.list_audit(tid)] == ["enrolment.pushed"]


def test_a_job_and_its_audit_land_together(store) -> None:
    tid = str(uuid.uuid4())
    jobs = JobStore(store)
    job = Job(tenant_id=tid, job_id=uuid.uuid4().hex, policy_id="web", source="api", created_at=int(T0), total=2)
    items = [JobItem(tenant_id=tid, job_id=job.job_id, policy_id="web", vm_id=f"/subscriptions/s/vm{i}")
             for i in range(2)]
    queued = entry(tid, "enrolment.queued")
    jobs.create(job, items, queued)
    assert jobs.get(tid, job.job_id) is not None
    assert [e.action for e in store.list_audit(tid)] == ["enrolment.queued"]
    other = replace(job, job_id=uuid.uuid4().hex)
    with pytest.raises(Conflict):  # the audit entry exists: the whole transaction fails
        jobs.create(other, [replace(i, job_id=other.job_id) for i in items], queued)
    assert jobs.get(tid, other.job_id) is None
    assert [e.action for e in store.list_audit(tid)] == ["enrolment.queued"]
