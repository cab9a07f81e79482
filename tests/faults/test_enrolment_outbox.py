"""Enrolment jobs through an outbox, with faults at the table and queue calls of
`POST /api/policies/{id}/enrolments`: a proxy in front of Azurite's table service and one in front of
its queue service, the ARM stand-in as the VMs, the enrol_job queue trigger as the worker.

Whatever fails, the call answers within its deadline, and each VM gets exactly one push, audited:
  - the queue down: 202 at once, the job and its unsent message on record; the timer sends it later;
  - the job write's answer lost: 503, but the job landed with its unsent message; the timer sends it;
  - the queue send's answer lost: the SDK sends again, two messages; the second one is a no-op.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import replace
from typing import Iterator

import pytest

from tests.hosts.conftest import arm, make_host  # noqa: F401 - fixtures for this module too
from tests.hosts.test_enrolment import Clock, queue_worker, wait_job
from tests.standins.arm import StaticTokenCredential
from tests.standins.faultproxy import FAIL, LOSE, PASS, FaultProxy

from .conftest import Faulty

SUB = "5b8e2c1d-3f4a-4b6c-9d7e-8f0a1b2c3d4e"  # this module's own subscription (the arm fixture serves it)
RG = "rg-outbox"
CONTOSO = "1ff8d19a-512a-4382-b7c7-72836fd919c4"  # infra/local/oidc/users.json
PID = "f-enrol"


class Outbox:
    def __init__(self, faulty: Faulty, queue_proxy: FaultProxy, ctx, client, clock: Clock) -> None:  # type: ignore[no-untyped-def]
        self.faulty, self.queue_proxy, self.ctx, self.client, self.clock = faulty, queue_proxy, ctx, client, clock

    @property
    def svc(self):  # type: ignore[no-untyped-def]
        return self.ctx.enrolments

    def unsent(self) -> list:
        from functions.storage.enrolmentjobs import JobStore

        return JobStore(self.faulty.truth).unsent(CONTOSO, created_before=int(self.clock()) + 10_000)

    def actions(self, vid: str) -> list[str]:
        return [e.action for e in self.faulty.truth.list_audit(CONTOSO, limit=100_000) if e.host == vid]


@pytest.fixture(scope="module")
def outbox(faulty: Faulty, api_env, azurite, arm, oidc) -> Iterator[Outbox]:  # noqa: F811 - the imported fixture
    from starlette.testclient import TestClient

    from devstack.stack import identity_of
    from functions.api.app import create_app
    from functions.settings import load_settings
    from functions.storage.queue import JobQueue
    from functions.wiring import Context, build_enrolments

    qproxy = FaultProxy(azurite.queue_port).start()
    queue = JobQueue.from_connection_string(qproxy.connection_string().replace("TableEndpoint=", "QueueEndpoint="))
    settings = load_settings({**api_env, "EZSSH_ENROL_SCOPES": f"{CONTOSO}=/subscriptions/{SUB}/resourceGroups/{RG}",
                              "EZSSH_ARM_ENDPOINT": arm.url, "EZSSH_PUBLIC_URL": "https://ezssh.contoso.test"})
    service = faulty.context.service
    enrolments = build_enrolments(settings, service, service.store, credential=StaticTokenCredential(arm.token),
                                  connection_verify=arm.ca_path, polling_interval=0, queue=queue)
    clock = Clock()
    enrolments.clock = clock
    enrolments.config = replace(enrolments.config, lease_seconds=8)
    queue.ensure()
    ctx = Context(settings=settings, service=service, validator=faulty.context.validator, enrolments=enrolments)
    service.policies.create(identity_of(oidc, "carol"), {
        "id": PID, "rules": [{"groups": [oidc.group_id("contoso", "ezssh-users")], "action": "auto"}],
        "hosts": ["127.0.0.0/8"], "principals": ["alice"]})
    with TestClient(create_app(lambda: ctx), raise_server_exceptions=False) as client:
        yield Outbox(faulty, qproxy, ctx, client, clock)
    qproxy.stop()


def vm(arm, make_host) -> str:  # noqa: F811
    name = f"ob-{uuid.uuid4().hex[:6]}"
    host = make_host(name, start=False)
    return arm.add_vm(RG, name, root=host.root, env={"EZSSH_SSHD_RELOAD": f"echo reload >> {host.reload_log}"})


def enrol(o: Outbox, auth, vid: str):  # type: ignore[no-untyped-def]
    t = time.monotonic()
    r = o.client.post(f"/api/policies/{PID}/enrolments", headers=auth("carol"), json={"vm_id": vid})
    return r, time.monotonic() - t


def the_timer_sends_it_and_it_runs_once(o: Outbox, azurite, arm, auth, vid: str, job_id: str) -> dict:  # noqa: F811
    o.faulty.proxy.heal()
    o.queue_proxy.heal()
    assert [u.vm_id for u in o.unsent()] == [vid], "the job's message is not in the outbox"
    assert o.svc.send_unsent() == {"unsent": 0, "sent": 0}, "the timer must leave a message the call is sending"
    o.clock.advance(o.svc.config.unsent_grace + 1)
    assert o.svc.send_unsent() == {"unsent": 1, "sent": 1}
    assert o.unsent() == []
    with queue_worker(o.ctx, azurite, clear=False):
        job = wait_job(o.client, auth("carol"), PID, job_id, timeout=60)
    assert job["job"]["state"] == "succeeded", job
    arm.wait_idle()
    assert len(arm.runs_on(vid)) == 1, "one push per VM"
    return job


def test_the_queue_down_answers_at_once_and_the_timer_sends_the_job_later(
        outbox: Outbox, azurite, arm, make_host, auth) -> None:  # noqa: F811
    vid = vm(arm, make_host)
    outbox.queue_proxy.plan = lambda i, m, p: FAIL
    r, took = enrol(outbox, auth, vid)
    assert r.status_code == 202, r.text
    assert took < 10, f"the queue being down held the caller {took:.1f} s (deadline 10 s)"
    print(f"\nqueue down: 202 in {took:.2f} s")
    job_id = r.json()["job"]["id"]
    assert [i["state"] for i in r.json()["items"]] == ["queued"]
    the_timer_sends_it_and_it_runs_once(outbox, azurite, arm, auth, vid, job_id)
    acts = outbox.actions(vid)
    assert acts.count("enrolment.push_started") == 1 and acts.count("enrolment.pushed") == 1, acts


def test_the_job_write_with_its_answer_lost_is_sent_by_the_timer(outbox: Outbox, azurite, arm, make_host, auth) -> None:  # noqa: F811
    vid = vm(arm, make_host)
    seen: list[int] = []

    def lose_the_job_write(i: int, method: str, path: str) -> str:
        if "$batch" in path and not seen:
            seen.append(i)
            return LOSE
        return PASS

    outbox.faulty.proxy.plan = lose_the_job_write
    r, took = enrol(outbox, auth, vid)
    outbox.faulty.proxy.heal()
    assert r.status_code == 503 and took < 10, r.text
    # it landed all the same: the job, its audit entry, and the message still to send
    queued = [e for e in outbox.faulty.truth.list_audit(CONTOSO, limit=100_000)
              if e.action == "enrolment.queued" and vid in (e.details or {}).get("vms", [])]
    assert len(queued) == 1
    job_id = queued[0].details["job_id"]
    the_timer_sends_it_and_it_runs_once(outbox, azurite, arm, auth, vid, job_id)


def test_a_queue_send_whose_answer_was_lost_is_sent_twice_and_pushed_once(
        outbox: Outbox, azurite, arm, make_host, auth) -> None:  # noqa: F811
    vid = vm(arm, make_host)
    seen: list[int] = []

    def lose_the_send(i: int, method: str, path: str) -> str:
        if method == "POST" and path.split("?")[0].endswith("/messages") and not seen:
            seen.append(i)
            return LOSE
        return PASS

    outbox.queue_proxy.plan = lose_the_send
    r, took = enrol(outbox, auth, vid)
    sends = [c for c in outbox.queue_proxy.calls_since_plan() if c[0] == "POST" and "/messages" in c[1]]
    outbox.queue_proxy.heal()
    assert r.status_code == 202 and took < 10, r.text
    assert len(sends) == 2, sends  # the SDK sent it again: two messages for one VM
    assert outbox.unsent() == []
    with queue_worker(outbox.ctx, azurite, clear=False) as host:
        job = wait_job(outbox.client, auth("carol"), PID, r.json()["job"]["id"], timeout=60)
        deadline = time.monotonic() + 20
        while host.handled < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    assert job["job"]["state"] == "succeeded", job
    arm.wait_idle()
    assert len(arm.runs_on(vid)) == 1, "the second message pushed again"
    assert outbox.actions(vid).count("enrolment.push_started") == 1


@pytest.mark.parametrize("kind", ["fail", "lose"])
def test_a_fault_at_each_table_call_of_an_enrolment_ends_in_one_push_or_none(
        kind, outbox: Outbox, azurite, arm, make_host, auth) -> None:  # noqa: F811
    """Each table call of the enrolment request in turn fails (503s from there on) or commits with its
    answer lost: the caller hears within the deadline; a 202 means the job landed; a job that landed
    is pushed exactly once (the timer sends what the call could not); one that did not is not pushed."""
    from tests.standins.faultproxy import fail_from, lose_at

    proxy, service = outbox.faulty.proxy, outbox.faulty.context.service
    proxy.plan = lambda i, m, p: PASS
    service.base.policies.changed(CONTOSO)  # count the policy read too
    first = vm(arm, make_host)
    r, _ = enrol(outbox, auth, first)
    assert r.status_code == 202, r.text
    calls = len(proxy.calls_since_plan())
    with queue_worker(outbox.ctx, azurite, clear=False):
        wait_job(outbox.client, auth("carol"), PID, r.json()["job"]["id"], timeout=60)
    outcomes = []
    for k in range(1, calls + 1):
        vid = vm(arm, make_host)
        service.base.policies.changed(CONTOSO)
        proxy.plan = {"fail": fail_from, "lose": lose_at}[kind](k)
        r, took = enrol(outbox, auth, vid)
        proxy.heal()
        assert took < 10 and r.status_code in (202, 503), (k, took, r.text)
        queued = [e for e in outbox.faulty.truth.list_audit(CONTOSO, limit=100_000)
                  if e.action == "enrolment.queued" and vid in (e.details or {}).get("vms", [])]
        assert len(queued) <= 1
        if r.status_code == 202:
            assert queued, "a 202 for a job that did not land"
        outbox.clock.advance(outbox.svc.config.unsent_grace + 1)
        outbox.svc.send_unsent()
        assert outbox.unsent() == []
        if queued:
            with queue_worker(outbox.ctx, azurite, clear=False):
                job = wait_job(outbox.client, auth("carol"), PID, queued[0].details["job_id"], timeout=60)
            assert job["job"]["state"] == "succeeded", (k, job)
        arm.wait_idle()
        assert len(arm.runs_on(vid)) == (1 if queued else 0), (k, kind)
        outcomes.append((k, r.status_code, bool(queued)))
    assert any(landed for _, _, landed in outcomes), outcomes
    print(f"\n{kind} at each of {calls} table calls: {outcomes}")
