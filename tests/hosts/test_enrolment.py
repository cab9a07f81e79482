"""Push to Azure VMs: the real azure-mgmt-compute client against the HTTPS ARM stand-in, whose Run
Command really runs the setup script into a sandbox root; a login through that root's sshd then
works. The API only queues a job (202); the queue-triggered function in function_app.py, driven by
tests/queue_host.py against Azurite's queue service, does the push. Retries with backoff, failures
shown clearly, bad input changes nothing, and the CLI (`ezssh hosts enrol|list`) over real HTTP."""

from __future__ import annotations

import statistics
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, replace

import httpx
import pytest

from tests.standins.arm import StaticTokenCredential

from .sandbox import SandboxHost, user_key

SUB = "0b1f6471-1bf0-4dda-aec3-cb9272f09590"
RG, RG_AUTO, RG_OUT = "rg-ezssh", "rg-auto", "rg-other"
CONTOSO = "1ff8d19a-512a-4382-b7c7-72836fd919c4"  # infra/local/oidc/users.json
SCOPES = ",".join(f"{CONTOSO}={s}" for s in (f"/subscriptions/{SUB}/resourceGroups/{RG}", f"/subscriptions/{SUB}/resourceGroups/{RG_AUTO}"))  # contoso's VMs only
BACKOFF = 60
FIGURES: dict[str, list[float]] = {"push_s": [], "polls": []}


def vm_id(rg: str, name: str) -> str:
    return f"/subscriptions/{SUB}/resourceGroups/{rg}/providers/Microsoft.Compute/virtualMachines/{name}"


@dataclass
class Clock:
    """Real time plus an offset the tests move forward (backoff without sleeping)."""

    offset: float = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds


# ---- fixtures ------------------------------------------------------------------------------------


def _policy_doc(oidc, pid: str) -> dict:
    return {
        "id": pid,
        "name": f"Enrolment tests: {pid}",
        "rules": [{"groups": [oidc.group_id("contoso", "ezssh-users")], "action": "auto"}],
        "hosts": ["127.0.0.0/8", f"/subscriptions/{SUB}/resourceGroups/{RG_AUTO}"],
        "principals": ["{username}"],
        "admins": {"users": [oidc.user("dave")["oid"]]},
        "max_ttl": 3600,
    }


@pytest.fixture(scope="module")
def policy(context, oidc):
    from devstack.stack import identity_of
    from devstack.stack import ensure_policy

    return ensure_policy(context.service, identity_of(oidc, "carol"), _policy_doc(oidc, "vm-push"))


@pytest.fixture(scope="module")
def clock():
    return Clock()


@pytest.fixture(scope="module")
def enrol_ctx(api_env, context, arm, clock, policy):
    """The service's context with enrolment wired to the ARM stand-in (static token, its CA)."""
    from functions.wiring import Context
    from functions.settings import load_settings
    from functions.wiring import build_enrolments

    settings = load_settings({**api_env, "EZSSH_ENROL_SCOPES": SCOPES, "EZSSH_ARM_ENDPOINT": arm.url,
                              "EZSSH_PUBLIC_URL": "https://ezssh.contoso.test"})
    enrolments = build_enrolments(settings, context.service, context.service.store,
                                  credential=StaticTokenCredential(arm.token), connection_verify=arm.ca_path,
                                  polling_interval=0)
    # this module's pace: short backoff, few attempts
    enrolments.config = replace(enrolments.config, backoff_base=BACKOFF, backoff_cap=3600, max_attempts=4)
    enrolments.clock = clock
    return Context(settings=settings, service=context.service, validator=context.validator, enrolments=enrolments)


@pytest.fixture(scope="module")
def worker(enrol_ctx, azurite):
    """The Functions host's queue listener for enrol_job, serving in a thread, with function_app's
    shared context answering with this module's wiring."""
    with queue_worker(enrol_ctx, azurite) as host:
        yield host


@contextmanager
def queue_worker(ctx, azurite, *, invisible_for: float = 600, clear: bool = True):
    """The enrol_job queue trigger served in a thread, function_app's shared context answering with ctx."""
    from functions import wiring
    from tests.queue_host import QueueHost

    ctx.enrolments.queue.ensure()
    if clear:
        ctx.enrolments.queue._client.clear_messages()  # noqa: SLF001 - a clean queue per module
    host = QueueHost(azurite.connection_string, "enrol_job", invisible_for=invisible_for)
    stop = threading.Event()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(wiring, "_context", [ctx])
        t = threading.Thread(target=host.serve, args=(stop,), daemon=True, name="queue-host")
        t.start()
        try:
            yield host
        finally:
            stop.set()
            t.join(timeout=30)
            if clear:
                ctx.enrolments.queue._client.clear_messages()  # noqa: SLF001


def wait_job(client, auth_header, policy_id: str, job_id: str, *, until=None, timeout: float = 60) -> dict:
    """GET the job until `until(body)` (default: the job is done)."""
    until = until or (lambda b: b["job"]["done"])
    deadline = time.monotonic() + timeout
    while True:
        r = client.get(f"/api/policies/{policy_id}/enrolment-jobs/{job_id}", headers=auth_header)
        assert r.status_code == 200, r.text
        if until(r.json()):
            return r.json()
        assert time.monotonic() < deadline, f"job {job_id} not there in {timeout} s: {r.json()}"
        time.sleep(0.05)


def enrol_and_wait(client, auth_header, policy_id: str, body: dict, **kw) -> dict:
    r = client.post(f"/api/policies/{policy_id}/enrolments", headers=auth_header, json=body)
    assert r.status_code == 202, r.text
    assert r.headers["Location"] == f"/api/policies/{policy_id}/enrolment-jobs/{r.json()['job']['id']}"
    return wait_job(client, auth_header, policy_id, r.json()["job"]["id"], **kw)


def item_of(body: dict, vid: str) -> dict:
    return next(i for i in body["items"] if i["vm_id"] == vid)


@pytest.fixture(scope="module")
def enrol_api(enrol_ctx, worker):
    """The real API app over real HTTP (uvicorn in a thread), with enrolment wired to the stand-in."""
    with serve_api(enrol_ctx) as client:
        yield client


@contextmanager
def serve_api(ctx):
    import uvicorn

    from devstack.proc import free_port
    from functions.api.app import create_app

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(lambda: ctx), host="127.0.0.1", port=port,
                                           log_level="warning", access_log=False))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    deadline = time.time() + 20
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    assert server.started, "uvicorn did not start"
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as c:
        yield c
    server.should_exit = True
    t.join(timeout=10)


def host_vm(arm, make_host, rg: str, name: str, **kw) -> tuple[str, SandboxHost]:
    """A sandbox host with a running sshd, registered in the stand-in as an Azure VM."""
    host = make_host(name)
    reload_cmd = f"echo reload >> {host.reload_log}; kill -HUP {host.proc.pid}"
    return arm.add_vm(rg, name, root=host.root, env={"EZSSH_SSHD_RELOAD": reload_cmd}, **kw), host


def cert_for(context, oidc, policy_id: str, tmp_path, name: str = "id_ed25519"):
    """alice's key and a certificate issued to it by the service under `policy_id`."""
    from devstack.stack import identity_of
    from functions.core.evaluation import AccessRequest

    key, pub = user_key(tmp_path, name)
    out = context.service.issuance.request_access(identity_of(oidc, "alice"),
                                         AccessRequest(host="127.0.0.1", principal="alice", policy_id=policy_id), pub)
    assert out.status == "issued"
    return key, out.certificate.openssh, out.certificate.serial


def login_ok(host: SandboxHost, key, cert: str) -> bool:
    deadline = time.time() + 10
    while True:
        r = host.login("alice", key, cert)
        if r.returncode == 0 and r.stdout.strip() == "alice":
            return True
        if time.time() > deadline:
            print(r.stderr, host.log_text()[-1500:])
            return False
        time.sleep(0.2)


def run_posts(arm) -> int:
    return sum(1 for r in arm.requests if r.method == "POST")


def record(enrol_ctx, policy_id: str, vid: str):
    tid = enrol_ctx.settings.tenants[0]
    for t in enrol_ctx.settings.tenants:
        rec = enrol_ctx.enrolments.store.get(t, policy_id, vid)
        if rec is not None:
            return rec
    return enrol_ctx.enrolments.store.get(tid, policy_id, vid)


# ---- push by VM id ---------------------------------------------------------------------------------


def test_enrol_a_vm_by_id_runs_the_script_in_its_root_and_a_login_works(
        enrol_api, enrol_ctx, arm, make_host, auth, context, oidc, policy, tmp_path):
    vid, host = host_vm(arm, make_host, RG, "web1")
    key, cert, _ = cert_for(context, oidc, "vm-push", tmp_path)
    assert host.login("alice", key, cert).returncode == 255  # the VM does not trust the policy yet

    started = time.perf_counter()
    r = enrol_api.post("/api/policies/vm-push/enrolments", headers=auth("carol"), json={"vm_id": vid})
    answered = time.perf_counter() - started
    assert r.status_code == 202, r.text
    assert r.json()["job"]["total"] == 1 and r.json()["items"][0]["vm_id"] == vid
    job = wait_job(enrol_api, auth("carol"), "vm-push", r.json()["job"]["id"])
    took = time.perf_counter() - started
    assert job["job"]["state"] == "succeeded" and item_of(job, vid)["attempts"] == 1
    [rec] = [e for e in enrol_api.get("/api/policies/vm-push/enrolments", headers=auth("carol")).json()["enrolments"]
             if e["vm_id"] == vid]
    assert rec["state"] == "succeeded", rec
    assert rec["job_id"] == job["job"]["id"]
    assert rec["vm_id"] == vid and rec["attempts"] == 1 and rec["last_error"] is None
    assert "this host now trusts policy vm-push" in rec["output_tail"]
    assert rec["output_tail"].rstrip().endswith("ezssh-exit-status: 0")
    assert rec["ca_fingerprints"] == [c.fingerprint for c in policy.ca if c.state in ("current", "previous")]
    assert rec["requested_by"] == "carol@contoso.test" and rec["source"] == "api"
    FIGURES["push_s"].append(took)
    FIGURES["polls"].append(rec["lro_polls"])

    # the stand-in ran the very script the service rendered, once, into this VM's root
    [run] = arm.runs_on(vid)
    assert run.exit_status == 0 and "EZSSH_POLICY='vm-push'" in run.script
    assert (host.etc / "sshd_config.d" / "50-ezssh.conf").exists()
    assert host.reloads() == 1
    host.wait_reloaded()
    assert login_ok(host, key, cert)

    listed = enrol_api.get("/api/policies/vm-push/enrolments", headers=auth("dave")).json()["enrolments"]
    assert [e["state"] for e in listed if e["vm_id"] == vid] == ["succeeded"]
    audit = [e for e in context.service.store.list_audit(oidc.tenant_id("contoso"), limit=100000)
             if e.action == "enrolment.pushed" and e.host == vid]
    assert len(audit) == 1 and audit[0].actor_upn == "carol@contoso.test"
    assert audit[0].details["exit_status"] == 0
    print(f"\npush through the ARM stand-in: HTTP answer {answered:.3f}s, job done {took:.3f}s, "
          f"{rec['duration_ms']} ms in Run Command, {rec['lro_polls']} polling GETs")


def test_enrol_by_resource_group_and_tag_pushes_only_the_tagged_vms(enrol_api, arm, make_host, auth):
    a, host_a = host_vm(arm, make_host, RG, "tagged-a", tags={"role": "web"})
    b, _ = host_vm(arm, make_host, RG, "tagged-b", tags={"role": "db"})
    before_b = len(arm.runs_on(b))
    job = enrol_and_wait(enrol_api, auth("carol"), "vm-push", {"resource_group": RG, "tag": "role=web"})
    assert [(x["vm_id"], x["state"]) for x in job["items"]] == [(a, "succeeded")]
    assert len(arm.runs_on(a)) == 1 and len(arm.runs_on(b)) == before_b
    # a tag no VM has: an empty job, done at once, nothing pushed
    r = enrol_api.post("/api/policies/vm-push/enrolments", headers=auth("carol"),
                       json={"resource_group": f"/subscriptions/{SUB}/resourceGroups/{RG}", "tag": "role=none"})
    assert r.status_code == 202 and r.json()["items"] == [] and r.json()["job"]["done"]


# ---- retries and failures ----------------------------------------------------------------------------


def test_agent_not_ready_is_retried_with_backoff_and_the_record_shows_it(
        enrol_api, enrol_ctx, arm, make_host, auth, clock, context, oidc, tmp_path):
    vid, host = host_vm(arm, make_host, RG, "slow-agent")
    arm.agent_not_ready(vid, 2)
    job = enrol_and_wait(enrol_api, auth("carol"), "vm-push", {"vm_id": vid},
                         until=lambda b: b["items"][0]["state"] == "retrying")
    job_id = job["job"]["id"]
    assert not job["job"]["done"] and job["job"]["state"] == "retrying"
    item = item_of(job, vid)
    assert item["attempts"] == 1 and item["error_code"] == "agent_not_ready" and "next in 60 s" in item["last_error"]
    rec = record(enrol_ctx, "vm-push", vid)
    assert rec.state == "retrying" and rec.attempts == 1 and rec.error_code == "agent_not_ready"
    assert "agent is not ready" in rec.last_error and rec.next_attempt_at - rec.updated_at == BACKOFF
    assert arm.runs_on(vid) == []

    svc = enrol_ctx.enrolments

    def attempts(n: int) -> dict:
        return wait_job(enrol_api, auth("carol"), "vm-push", job_id, until=lambda b: b["items"][0]["attempts"] == n
                        and b["items"][0]["state"] != "running")

    posts = run_posts(arm)
    assert svc.reconcile()["retries_queued"] == 0  # not due yet: no new attempt
    time.sleep(0.3)
    assert run_posts(arm) == posts and record(enrol_ctx, "vm-push", vid).attempts == 1

    clock.advance(BACKOFF)
    assert svc.reconcile()["retries_queued"] == 1  # due: sent to the same job
    attempts(2)
    rec2 = record(enrol_ctx, "vm-push", vid)
    assert rec2.state == "retrying" and rec2.attempts == 2
    assert rec2.next_attempt_at - rec2.updated_at == 2 * BACKOFF  # exponential

    clock.advance(BACKOFF)
    assert svc.reconcile()["retries_queued"] == 0  # still not due (120 s backoff)
    assert record(enrol_ctx, "vm-push", vid).attempts == 2
    clock.advance(BACKOFF)
    svc.reconcile()
    done = wait_job(enrol_api, auth("carol"), "vm-push", job_id)
    assert done["job"]["state"] == "succeeded" and item_of(done, vid)["attempts"] == 3
    rec3 = record(enrol_ctx, "vm-push", vid)
    assert rec3.state == "succeeded" and rec3.attempts == 3 and rec3.error_code is None
    assert "now trusts policy vm-push" in rec3.output_tail
    assert len(arm.runs_on(vid)) == 1  # the script ran once, after the agent got ready

    listed = [e for e in enrol_api.get("/api/policies/vm-push/enrolments", headers=auth("carol")).json()["enrolments"]
              if e["vm_id"] == vid]
    assert listed[0]["attempts"] == 3 and listed[0]["state"] == "succeeded"
    actions = [e.action for e in context.service.store.list_audit(oidc.tenant_id("contoso"), limit=100000)
               if e.host == vid]
    # every attempt is on record when it starts and when it ends
    assert actions == ["enrolment.push_started", "enrolment.retrying", "enrolment.push_started", "enrolment.retrying",
                       "enrolment.push_started", "enrolment.pushed"]
    host.wait_reloaded()
    key, cert, _ = cert_for(context, oidc, "vm-push", tmp_path)
    assert login_ok(host, key, cert)


def test_an_agent_that_never_gets_ready_fails_after_max_attempts(enrol_api, enrol_ctx, arm, make_host, auth, clock):
    vid, _ = host_vm(arm, make_host, RG, "dead-agent")
    arm.agent_not_ready(vid, 100)
    job = enrol_and_wait(enrol_api, auth("carol"), "vm-push", {"vm_id": vid},
                         until=lambda b: b["items"][0]["state"] == "retrying")
    for n in (2, 3, 4):
        clock.advance(3600)
        enrol_ctx.enrolments.reconcile()
        job = wait_job(enrol_api, auth("carol"), "vm-push", job["job"]["id"],
                       until=lambda b, n=n: b["items"][0]["attempts"] == n and b["items"][0]["state"] != "running")
    assert job["job"]["done"] and job["job"]["state"] == "failed"
    rec = record(enrol_ctx, "vm-push", vid)
    assert rec.state == "failed" and rec.attempts == 4
    assert rec.last_error.startswith("Gave up after 4 attempts:") and "agent is not ready" in rec.last_error
    clock.advance(3600)
    posts = run_posts(arm)
    enrol_ctx.enrolments.reconcile()  # a failed record is left alone by the timer
    assert run_posts(arm) == posts


def test_a_failing_script_and_a_missing_permission_are_shown_clearly(
        enrol_api, enrol_ctx, arm, auth, tmp_path, make_host):
    # a "VM" without openssh-server: the script refuses, and says why
    empty_root = tmp_path / "bare" / "root"
    empty_root.mkdir(parents=True)
    bare = arm.add_vm(RG, "no-sshd", root=empty_root)
    [rec] = enrol_and_wait(enrol_api, auth("carol"), "vm-push", {"vm_id": bare})["items"]
    assert rec["state"] == "failed" and rec["error_code"] == "script_failed", rec
    assert "exited with status 1" in rec["last_error"]
    assert "sshd_config does not exist: is openssh-server installed?" in rec["output_tail"]

    # Run Command is forbidden for the service's identity: the record says which permission is missing
    vid, _ = host_vm(arm, make_host, RG, "locked")
    arm.forbid(vid, run_only=True)
    [rec] = enrol_and_wait(enrol_api, auth("carol"), "vm-push", {"vm_id": vid})["items"]
    assert rec["state"] == "failed" and rec["error_code"] == "forbidden"
    assert "runCommand/action" in rec["last_error"] and "lacks permission" in rec["last_error"]
    assert arm.runs_on(vid) == []

    # reading the VM is forbidden too: refused before any record or push
    arm.forbid(vid)
    r = enrol_api.post("/api/policies/vm-push/enrolments", headers=auth("carol"), json={"vm_id": vid})
    assert r.status_code == 403 and r.json()["error"] == "arm_forbidden"
    assert "lacks permission" in r.json()["message"]

    # a VM that does not exist: 404, no record
    gone = vm_id(RG, "never-was")
    r = enrol_api.post("/api/policies/vm-push/enrolments", headers=auth("carol"), json={"vm_id": gone})
    assert r.status_code == 404 and "not found" in r.json()["message"]
    assert record(enrol_ctx, "vm-push", gone) is None


# ---- bad input -----------------------------------------------------------------------------------------

BAD_IDS = [
    "web1",
    "/subscriptions/not-a-guid/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/vm",
    f"/subscriptions/{SUB}/resourceGroups/rg/providers/Microsoft.Network/networkInterfaces/nic1",
    f"/subscriptions/{SUB}/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/vm/extensions/x",
    f"/subscriptions/{SUB}/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/a b",
    f"/subscriptions/{SUB}/resourceGroups/r'g/providers/Microsoft.Compute/virtualMachines/vm",
    f"/subscriptions/{SUB}/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/vm;reboot",
    "",
]


@pytest.mark.parametrize("bad", BAD_IDS)
def test_resource_ids_that_do_not_parse_are_refused_and_nothing_is_pushed(enrol_api, enrol_ctx, arm, auth, bad):
    before = (len(arm.requests), len(enrol_ctx.enrolments.store.list(enrol_ctx.settings.tenants[0])))
    r = enrol_api.post("/api/policies/vm-push/enrolments", headers=auth("carol"), json={"vm_id": bad})
    assert r.status_code == 400, r.text
    assert r.json()["error"] == "invalid_request" and "resource id" in r.json()["message"]
    assert (len(arm.requests), len(enrol_ctx.enrolments.store.list(enrol_ctx.settings.tenants[0]))) == before


def test_bad_requests_change_nothing(enrol_api, enrol_ctx, arm, auth, fabrikam_policy, oidc):
    outside = arm.add_vm(RG_OUT, "elsewhere")
    other_sub = vm_id(RG, "x").replace(SUB, "11111111-2222-3333-4444-555555555555")
    cases = [
        ("carol", "vm-push", {"vm_id": outside}, 403, "outside_enrolment_scopes"),
        ("carol", "vm-push", {"vm_id": other_sub}, 403, "outside_enrolment_scopes"),
        ("carol", "vm-push", {"resource_group": RG_OUT, "tag": "a=b"}, 403, "outside_enrolment_scopes"),
        ("carol", "vm-push", {"resource_group": RG, "tag": "no-equals"}, 400, "invalid_request"),
        ("carol", "vm-push", {"resource_group": RG}, 400, "invalid_request"),
        ("carol", "vm-push", {"vm_id": outside, "resource_group": RG, "tag": "a=b"}, 400, "invalid_request"),
        ("carol", "vm-push", {}, 400, "invalid_request"),
        ("carol", "vm-push", {"vm_id": outside, "force": True}, 400, "invalid_request"),
        ("carol", "vm-push", {"resource_group": "../../x", "tag": "a=b"}, 400, "invalid_request"),
        ("alice", "vm-push", {"vm_id": vm_id(RG, "web1")}, 403, "forbidden"),  # a member, not an admin
        ("carol", "fab-hosts", {"vm_id": vm_id(RG, "web1")}, 404, "not_found"),  # another tenant's policy
        ("mallory", "vm-push", {"vm_id": vm_id(RG, "web1")}, 404, "not_found"),
        # fabrikam's admin on her own policy: contoso's scopes are not hers to push into
        ("mallory", "fab-hosts", {"vm_id": vm_id(RG, "web1")}, 403, "outside_enrolment_scopes"),
        ("carol", "no-such-policy", {"vm_id": vm_id(RG, "web1")}, 404, "not_found"),
    ]
    tenants = enrol_ctx.settings.tenants
    before = (run_posts(arm), len(arm.runs), [len(enrol_ctx.enrolments.store.list(t)) for t in tenants])
    for user, pid, body, status, code in cases:
        r = enrol_api.post(f"/api/policies/{pid}/enrolments", headers=auth(user), json=body)
        assert (r.status_code, r.json()["error"]) == (status, code), (user, pid, body, r.text)
        assert r.json()["message"] and "Traceback" not in r.text
    assert (run_posts(arm), len(arm.runs), [len(enrol_ctx.enrolments.store.list(t)) for t in tenants]) == before
    assert "outside the scopes" in enrol_api.post("/api/policies/vm-push/enrolments", headers=auth("carol"),
                                                  json={"vm_id": outside}).json()["message"]
    # listing: admins only, and never another tenant's
    assert enrol_api.get("/api/policies/vm-push/enrolments", headers=auth("alice")).status_code == 403
    assert enrol_api.get("/api/policies/vm-push/enrolments", headers=auth("mallory")).status_code == 404
    refused = [e for e in enrol_ctx.service.store.list_audit(oidc.tenant_id("contoso"), limit=100000)
               if e.action == "enrolment.refused"]
    assert {e.error_code for e in refused} >= {"outside_enrolment_scopes", "invalid_request", "forbidden"}


def test_the_enrolment_list_comes_in_pages(enrol_api, enrol_ctx, auth, oidc):
    """limit + continuation: every record once over the pages, each page one bounded range read."""
    from functions.storage.enrolments import Enrolment

    tid = oidc.tenant_id("contoso")
    for i in range(7):
        vid = f"/subscriptions/{SUB}/resourceGroups/{RG}/providers/Microsoft.Compute/virtualMachines/page{i}-{uuid.uuid4().hex[:6]}"
        enrol_ctx.enrolments.store.create(Enrolment(tenant_id=tid, policy_id="vm-push", vm_id=vid, state="failed",
                                                    created_at=1, updated_at=1))
    every = {r.vm_id for r in enrol_ctx.enrolments.store.list(tid, "vm-push")}
    seen: list[str] = []
    params: dict = {"limit": 3}
    while True:
        r = enrol_api.get("/api/policies/vm-push/enrolments", headers=auth("carol"), params=params)
        assert r.status_code == 200, r.text
        page = r.json()
        assert len(page["enrolments"]) <= 3
        seen += [e["vm_id"] for e in page["enrolments"]]
        if not page["next"]:
            break
        assert len(page["enrolments"]) == 3
        params = {"limit": 3, "continuation": page["next"]}
    assert sorted(seen) == sorted(every) and len(seen) == len(set(seen))
    whole = enrol_api.get("/api/policies/vm-push/enrolments", headers=auth("carol"), params={"limit": 1000}).json()
    assert whole["next"] is None and sorted(e["vm_id"] for e in whole["enrolments"]) == sorted(every)
    for bad in ({"limit": 0}, {"limit": 1001}, {"continuation": "not-a-token"},
                {"continuation": "eyJhZnRlciI6Ii4uLyJ9"}):  # {"after":"../"}
        r = enrol_api.get("/api/policies/vm-push/enrolments", headers=auth("carol"), params=bad)
        assert r.status_code == 400 and r.json()["error"] == "invalid_request", (bad, r.text)


# ---- the CLI -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def carol_cli(tmp_path_factory, enrol_api, oidc):
    from devstack.demo import cli_env, run_cli

    env = cli_env(tmp_path_factory.mktemp("carol-home"))
    r = run_cli(["configure", "--server", str(enrol_api.base_url).rstrip("/"), "--ca-bundle", str(oidc.ca_path)], env)
    assert r.returncode == 0, r.stderr
    r = run_cli(["login"], env, username="carol", ca_path=oidc.ca_path)
    assert r.returncode == 0, r.stderr
    return env


def test_cli_enrols_a_vm_and_lists_enrolments(carol_cli, arm, make_host, context, oidc, tmp_path):
    import json

    from devstack.demo import run_cli

    vid, host = host_vm(arm, make_host, RG, "cli-vm")
    r = run_cli(["hosts", "enrol", "--policy", "vm-push", "--vm", vid], carol_cli)
    assert r.returncode == 0, r.stderr
    assert "rg-ezssh/cli-vm" in r.stdout and "succeeded" in r.stdout
    r = run_cli(["hosts", "list", "--policy", "vm-push", "--json"], carol_cli)
    assert r.returncode == 0, r.stderr
    mine = [e for e in json.loads(r.stdout)["enrolments"] if e["vm_id"] == vid]
    assert mine[0]["state"] == "succeeded" and mine[0]["attempts"] == 1
    one = run_cli(["hosts", "list", "--policy", "vm-push", "--limit", "1", "--json"], carol_cli)
    assert len(json.loads(one.stdout)["enrolments"]) == 1 and json.loads(one.stdout)["next"]
    every = run_cli(["hosts", "list", "--policy", "vm-push", "--limit", "1", "--all", "--json"], carol_cli)
    assert sorted(e["vm_id"] for e in json.loads(every.stdout)["enrolments"]) == \
        sorted(e["vm_id"] for e in json.loads(r.stdout)["enrolments"])
    # --no-wait: the queued job at once; `hosts job` follows it to the end
    r = run_cli(["hosts", "enrol", "--policy", "vm-push", "--vm", vid, "--no-wait", "--json"], carol_cli)
    assert r.returncode == 6, r.stderr  # not done yet: the documented "still running" exit code
    queued = json.loads(r.stdout)
    assert queued["job"]["done"] is False and "ezssh hosts job --policy vm-push" in r.stderr
    r = run_cli(["hosts", "job", "--policy", "vm-push", queued["job"]["id"], "--wait", "60", "--json"], carol_cli)
    assert r.returncode == 0, r.stderr
    followed = json.loads(r.stdout)
    assert followed["job"]["state"] == "succeeded" and followed["items"][0]["vm_id"] == vid
    r = run_cli(["hosts", "job", "--policy", "vm-push", "0" * 32], carol_cli)
    assert r.returncode == 1 and "No enrolment job" in r.stderr
    host.wait_reloaded()
    key, cert, _ = cert_for(context, oidc, "vm-push", tmp_path)
    assert login_ok(host, key, cert)

    # failures: exit 1 with the reason and the output tail on stderr
    bare_root = tmp_path / "cli-bare"
    bare_root.mkdir()
    bare = arm.add_vm(RG, "cli-bare", root=bare_root)
    r = run_cli(["hosts", "enrol", "--policy", "vm-push", "--vm", bare], carol_cli)
    assert r.returncode == 1 and "exited with status 1" in r.stderr and "openssh-server" in r.stderr
    # bad input: a clear message, the documented exit code, nothing pushed
    runs = len(arm.runs)
    r = run_cli(["hosts", "enrol", "--policy", "vm-push", "--vm", "web1"], carol_cli)
    assert r.returncode == 1 and "is not a VM resource id" in r.stderr
    r = run_cli(["hosts", "enrol", "--policy", "vm-push", "--vm", vm_id(RG_OUT, "elsewhere")], carol_cli)
    assert r.returncode == 4 and "outside the scopes" in r.stderr
    r = run_cli(["hosts", "enrol", "--policy", "vm-push", "--resource-group", RG], carol_cli)
    assert r.returncode == 2 and "--tag" in r.stderr
    assert len(arm.runs) == runs


def test_zz_push_figures():
    if FIGURES["push_s"]:
        print(f"\npush figures: {len(FIGURES['push_s'])} push(es), median {statistics.median(FIGURES['push_s']):.3f}s, "
              f"polls {FIGURES['polls']}")
