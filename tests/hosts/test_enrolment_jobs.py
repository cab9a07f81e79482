"""Enrolment jobs through the queue (issue 14): an enrolment of 20 VMs through the ARM stand-in answers
the HTTP call at once and completes through Azurite's queue and the enrol_job queue trigger; a worker
killed in the middle of a push is retried without the VM's script ever running twice at the same time;
a message that failed every delivery is marked failed by the poison-queue function."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from tests.standins.arm import StaticTokenCredential

from .test_enrolment import Clock, item_of, queue_worker, serve_api, wait_job

REPO = Path(__file__).resolve().parents[2]
SUB = "7d3c1b2a-9e8f-4a6b-8c5d-3e2f1a0b9c8d"  # this module's own subscription
RG = "rg-fleet"
CONTOSO = "1ff8d19a-512a-4382-b7c7-72836fd919c4"  # infra/local/oidc/users.json
SCOPES = f"{CONTOSO}=/subscriptions/{SUB}/resourceGroups/{RG}"
FLEET = 20
LEASE = 8  # seconds: longer than a push here takes (run_delay 3 s), as 660 s is longer than 600 s in Azure


@pytest.fixture(scope="module")
def jobs_policy(context, oidc):
    from devstack.stack import ensure_policy, identity_of

    return ensure_policy(context.service, identity_of(oidc, "carol"), {
        "id": "vm-jobs", "name": "Enrolment job tests",
        "rules": [{"groups": [oidc.group_id("contoso", "ezssh-users")], "action": "auto"}],
        "hosts": ["127.0.0.0/8"], "principals": ["{username}"], "max_ttl": 3600,
    })


def env_of(api_env, arm) -> dict[str, str]:
    return {**api_env, "EZSSH_ENROL_SCOPES": SCOPES, "EZSSH_ARM_ENDPOINT": arm.url,
            "EZSSH_PUBLIC_URL": "https://ezssh.contoso.test"}


@pytest.fixture(scope="module")
def jobs_ctx(api_env, context, arm, jobs_policy):
    from functions.settings import load_settings
    from functions.wiring import Context, build_enrolments

    settings = load_settings(env_of(api_env, arm))
    enrolments = build_enrolments(settings, context.service, context.service.store,
                                  credential=StaticTokenCredential(arm.token), connection_verify=arm.ca_path,
                                  polling_interval=0)
    enrolments.config = replace(enrolments.config, lease_seconds=LEASE)
    enrolments.clock = Clock()  # real time: the queue's visibility timeouts are real
    return Context(settings=settings, service=context.service, validator=context.validator, enrolments=enrolments)


@pytest.fixture(scope="module")
def api(jobs_ctx):
    with serve_api(jobs_ctx) as client:
        yield client


def fleet_vm(arm, make_host, name: str, **kw) -> tuple[str, object]:
    """A VM whose root is a sandbox host's (sshd_config, sshd -t) without a running sshd."""
    host = make_host(name, start=False)
    return arm.add_vm(RG, name, root=host.root, env={"EZSSH_SSHD_RELOAD": f"echo reload >> {host.reload_log}"},
                      **kw), host


def test_twenty_vms_answer_at_once_and_complete_through_the_queue(api, jobs_ctx, arm, azurite, make_host, auth):
    fleet = [fleet_vm(arm, make_host, f"fleet-{n:02d}", tags={"fleet": "green"}) for n in range(FLEET)]
    other, _ = fleet_vm(arm, make_host, "not-green", tags={"fleet": "blue"})
    carol = auth("carol")  # signed in before the clock starts
    jobs_ctx.enrolments.queue.ensure()
    jobs_ctx.enrolments.queue._client.clear_messages()  # noqa: SLF001
    # The workers run elsewhere in Azure (other instances); here they start once the API has answered,
    # so that the answer's time is the API's own, not shared with 8 pushes in this process.
    started = time.perf_counter()
    r = api.post("/api/policies/vm-jobs/enrolments", headers=carol, json={"resource_group": RG, "tag": "fleet=green"})
    answered = time.perf_counter() - started
    assert r.status_code == 202, r.text
    body = r.json()
    # The answer's speed is a benchmark figure (0.55-0.93 s on 2 busy cores); what this test holds
    # is that no push ran on the request's path (below), with a bound far from any machine's noise.
    print(f"20-VM enrolment answered in {answered:.3f} s")
    assert answered < 10.0, f"the HTTP answer took {answered:.3f}s"
    assert body["job"]["total"] == FLEET and body["job"]["source"] == "api"
    assert sorted(i["vm_id"] for i in body["items"]) == sorted(v for v, _ in fleet)
    assert arm.runs == [], "nothing ran on the request's path"
    with queue_worker(jobs_ctx, azurite, clear=False) as host:
        job = wait_job(api, carol, "vm-jobs", body["job"]["id"], timeout=180)
        done = time.perf_counter() - started
    assert job["job"]["state"] == "succeeded" and job["job"]["counts"] == {"succeeded": FLEET}, job["job"]
    for vid, sandbox in fleet:
        assert len(arm.runs_on(vid)) == 1, vid  # each script ran once
        assert item_of(job, vid)["attempts"] == 1
        assert (sandbox.etc / "sshd_config.d" / "50-ezssh.conf").exists()
    assert arm.runs_on(other) == []
    runs = [arm.runs_on(v)[0] for v, _ in fleet]
    overlap = max(sum(1 for r in runs if r.started <= t.started < (r.ended or 0)) for t in runs)
    assert host.failures == 0
    print(f"\n{FLEET} VMs: HTTP 202 in {answered:.3f}s; job done in {done:.2f}s "
          f"(queue batch {host.batch_size}, up to {overlap} Run Commands at once)")


def _kill(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


def test_a_worker_killed_mid_push_is_retried_and_never_runs_a_vm_twice_at_once(
        api, jobs_ctx, api_env, arm, azurite, make_host, auth, tmp_path):
    vid, sandbox = fleet_vm(arm, make_host, "kill-me")
    jobs_ctx.enrolments.queue._client.clear_messages()  # noqa: SLF001
    r = api.post("/api/policies/vm-jobs/enrolments", headers=auth("carol"), json={"vm_id": vid})
    assert r.status_code == 202
    job_id = r.json()["job"]["id"]

    cfg = tmp_path / "worker.json"
    cfg.write_text(json.dumps({"env": env_of(api_env, arm), "arm_url": arm.url, "arm_token": arm.token,
                               "arm_ca": str(arm.ca_path), "lease_seconds": LEASE, "invisible_for": 3}))
    env = {**os.environ, **{k: v for k, v in api_env.items() if not k.startswith("EZSSH_")}}
    env["PYTHONPATH"] = os.pathsep.join(str(REPO / p) for p in (".", "infra/local", "client"))
    arm.run_delay = 3.0
    worker = subprocess.Popen([sys.executable, "-m", "tests.hosts.queue_worker", str(cfg)], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=open(tmp_path / "worker.log", "w"))
    try:
        deadline = time.monotonic() + 60
        while not arm.runs_on(vid):  # the worker claimed the VM and Run Command is running
            assert worker.poll() is None, (tmp_path / "worker.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the worker never started the push"
            time.sleep(0.02)
        _kill(worker)
        [first] = arm.runs_on(vid)
        assert not first.done, "killed in the middle of the push"
        rec = jobs_ctx.enrolments.store.get(CONTOSO, "vm-jobs", vid)
        assert rec.state == "pending" and rec.lease_until > time.time() and rec.job_id == job_id
        lease_until = rec.lease_until
        running = wait_job(api, auth("carol"), "vm-jobs", job_id, until=lambda b: True)
        assert item_of(running, vid)["state"] == "running" and item_of(running, vid)["deliveries"] == 1

        # another worker: the message comes back after its visibility timeout, finds the lease,
        # waits for it, then pushes
        with queue_worker(jobs_ctx, azurite, clear=False):
            done = wait_job(api, auth("carol"), "vm-jobs", job_id, timeout=60)
    finally:
        arm.run_delay = 0.0
        if worker.poll() is None:
            _kill(worker)
    item = item_of(done, vid)
    assert done["job"]["state"] == "succeeded" and item["attempts"] == 1, done
    assert item["deliveries"] >= 3, item  # the killed one, the one that waited for the lease, the push
    arm.wait_idle()
    first, second = arm.runs_on(vid)
    assert first.ended is not None and second.started >= first.ended, "the VM's script ran twice at once"
    assert second.started >= lease_until - 1, "the second push started before the first one's lease ended"
    assert (sandbox.etc / "sshd_config.d" / "50-ezssh.conf").exists()
    # the push that ran before its worker was killed is on record, as is the one that finished
    actions = [e.action for e in jobs_ctx.service.store.list_audit(CONTOSO, limit=100_000) if e.host == vid]
    assert actions.count("enrolment.push_started") == 2 and actions.count("enrolment.pushed") == 1, actions
    print(f"\nkilled mid-push: first run {first.ended - first.started:.1f}s, second started "
          f"{second.started - first.ended:.1f}s after it ended (lease {LEASE}s)")


def test_a_message_that_failed_every_delivery_marks_its_item_failed(jobs_ctx, api, arm, azurite, make_host, auth):
    from tests.queue_host import QueueHost

    vid, _ = fleet_vm(arm, make_host, "poisoned")
    svc = jobs_ctx.enrolments
    policy = next(p for p in jobs_ctx.service.hosts.policies_with_ca(CONTOSO) if p.id == "vm-jobs")
    from functions.hosts.azure_vms import parse_vm_id

    job, _ = svc.submit(policy, [parse_vm_id(vid)], source="api")
    svc.queue._client.clear_messages()  # noqa: SLF001 - as if every delivery had failed ...
    svc.queue._poison.send_message(json.dumps(svc._message(job, vid)))  # noqa: SLF001 - ... and the host moved it
    with pytest.MonkeyPatch.context() as mp:
        from functions import wiring

        mp.setattr(wiring, "_context", [jobs_ctx])
        poison = QueueHost(azurite.connection_string, "enrol_job_poison")
        poison.run_until(lambda: poison.handled >= 1, timeout=30)
    body = wait_job(api, auth("carol"), "vm-jobs", job.job_id, until=lambda b: True)
    assert body["job"]["done"] and body["job"]["state"] == "failed"
    assert item_of(body, vid)["error_code"] == "gave_up" and "abandoned" in item_of(body, vid)["last_error"]
    [gave_up] = [e for e in jobs_ctx.service.store.list_audit(CONTOSO, limit=100_000)
                 if e.action == "enrolment.gave_up" and e.host == vid]
    assert gave_up.details["job_id"] == job.job_id and gave_up.outcome == "error"
    assert arm.runs_on(vid) == []
