"""Auto-enrolment: real-shaped Event Grid events (AZURE-REST.md section 3) fed through the Functions
wrapper in function_app.py, and the reconcile timer; both only queue jobs, which the queue-triggered
function (driven by tests/queue_host.py on Azurite's queue service) pushes through the ARM stand-in,
whose Run Command runs the setup script into sandbox roots with a real sshd."""

from __future__ import annotations

from dataclasses import replace

import json
import time
import uuid

import pytest

from tests.functions_host import user_functions
from tests.standins.arm import StaticTokenCredential

from .test_enrolment import Clock, cert_for, host_vm, login_ok, queue_worker, run_posts

SUB = "5c0a3e9d-6f42-4b7e-9d1c-2a8f7e6b4c31"  # not the other module's: its records stay out of scope here
RG_TAGS, RG_PATTERN, RG_OUT = "rg-events", "rg-pattern", "rg-elsewhere"
CONTOSO = "1ff8d19a-512a-4382-b7c7-72836fd919c4"  # infra/local/oidc/users.json
SCOPES = ",".join(f"{CONTOSO}={s}" for s in (f"/subscriptions/{SUB}/resourceGroups/{RG_TAGS}", f"/subscriptions/{SUB}/resourceGroups/{RG_PATTERN}"))  # contoso's VMs only
BACKOFF = 60


def functions_of_app() -> dict:
    """The user functions function_app.py registers."""
    return user_functions()


def event_for(vm_id: str, *, operation: str = "Microsoft.Compute/virtualMachines/write",
              event_type: str = "Microsoft.Resources.ResourceWriteSuccess", update: bool = False,
              tenant: str = "72f988bf-86f1-41af-91ab-2d7cd011db47") -> dict:
    """One element of the array Event Grid posts, shaped as the documented example (lower-case
    `resourcegroups` in subject/resourceUri, claims as strings)."""
    sub = vm_id.split("/")[2]
    rg = vm_id.split("/")[4]
    uri = vm_id.replace("/resourceGroups/", "/resourcegroups/")
    data = {
        "authorization": {"scope": uri, "action": operation, "evidence": {"role": "Subscription Admin"}},
        "claims": {"aud": "https://management.core.windows.net/", "iss": f"https://sts.windows.net/{tenant}/",
                   "iat": "1700000000", "nbf": "1700000000", "exp": "1700003600", "appid": str(uuid.uuid4()),
                   "appidacr": "2", "ipaddr": "203.0.113.7", "name": "Carol Admin",
                   "http://schemas.microsoft.com/identity/claims/objectidentifier": str(uuid.uuid4()),
                   "http://schemas.microsoft.com/identity/claims/tenantid": tenant,
                   "http://schemas.xmlsoap.org/ws/2005/05/identity/claims/upn": "carol@contoso.test",
                   "http://schemas.microsoft.com/identity/claims/scope": "user_impersonation",
                   "_claim_names": "{\"groups\":\"src1\"}", "uti": "abc", "ver": "1.0"},
        "correlationId": str(uuid.uuid4()),
        "resourceProvider": operation.split("/")[0],
        "resourceUri": uri,
        "operationName": operation,
        "status": "Succeeded",
        "subscriptionId": sub,
        "tenantId": tenant,
    }
    if update:
        data["httpRequest"] = {"clientRequestId": str(uuid.uuid4()), "clientIpAddress": "203.0.113.7",
                               "method": "PUT", "url": f"https://management.azure.com{vm_id}?api-version=2024-07-01"}
    return {"subject": uri, "eventType": event_type, "eventTime": "2026-11-24T05:00:04.6117357Z",
            "id": str(uuid.uuid4()), "data": data, "dataVersion": "2", "metadataVersion": "1",
            "topic": f"/subscriptions/{sub}/resourceGroups/{rg}"}


WORKER: list = []  # this module's queue host


def deliver(evt: dict) -> float:
    """What the Functions host does for one array element: decode it, call enrol_vm_event. Then wait
    for the queue worker to finish what it queued. Returns how long the Event Grid call took."""
    from azure.functions import meta
    from azure.functions.eventgrid import EventGridEventInConverter

    event = EventGridEventInConverter.decode(meta.Datum(json.dumps(evt), "json"), trigger_metadata=None)
    host, arm = WORKER
    with host.paused():  # nothing else may push while the invocation runs
        runs = len(arm.runs)
        started = time.perf_counter()
        functions_of_app()["enrol_vm_event"](event)
        took = time.perf_counter() - started
        assert len(arm.runs) == runs, "the Event Grid invocation ran Run Command itself; it must only queue"
    host.drain()
    return took


def posts_to(arm, vm_name: str) -> int:
    return sum(1 for r in arm.requests if r.method == "POST" and r.path.split("/")[8:9] == [vm_name])


def setup_runs(arm, vid: str) -> list:
    """The setup-script pushes to a VM (not the Run Command that reads its host keys for host certificates)."""
    return [r for r in arm.runs_on(vid) if "EZSSH_POLICY=" in r.script]


def timer_tick() -> None:
    from azure.functions.timer import TimerRequest

    functions_of_app()["reconcile_enrolments"](TimerRequest(past_due=False))
    WORKER[0].drain()


@pytest.fixture(scope="module")
def clock():
    return Clock()


@pytest.fixture(scope="module")
def ev_policy(context, oidc):
    from devstack.stack import identity_of
    from devstack.stack import ensure_policy

    return ensure_policy(context.service, identity_of(oidc, "carol"), {
        "id": "vm-ev",
        "name": "Auto-enrolment tests",
        "rules": [{"groups": [oidc.group_id("contoso", "ezssh-users")], "action": "auto"}],
        "hosts": ["127.0.0.0/8", f"/subscriptions/{SUB}/resourceGroups/{RG_PATTERN}", "tag:fleet=blue"],
        "principals": ["{username}"],
        "max_ttl": 3600,
    })


@pytest.fixture
def wired(api_env, azurite, context, arm, clock, ev_policy):
    """function_app's shared_context() answers with the service wired to this module's stand-in."""
    from functions import wiring
    from functions.wiring import Context
    from functions.settings import load_settings

    settings = load_settings({**api_env, "EZSSH_ENROL_SCOPES": SCOPES, "EZSSH_ARM_ENDPOINT": arm.url,
                              "EZSSH_PUBLIC_URL": "https://ezssh.contoso.test"})
    enrolments = wiring.build_enrolments(settings, context.service, context.service.store,
                                         credential=StaticTokenCredential(arm.token), connection_verify=arm.ca_path,
                                         polling_interval=0)
    enrolments.config = replace(enrolments.config, backoff_base=BACKOFF)
    enrolments.clock = clock
    ctx = Context(settings=settings, service=context.service, validator=context.validator, enrolments=enrolments)
    with queue_worker(ctx, azurite) as host:  # also points function_app's shared context at ctx
        WORKER[:] = [host, arm]
        yield ctx
    WORKER.clear()


def rec_of(ctx, policy_id: str, vid: str):
    return ctx.enrolments.store.get(ctx.settings.tenants[0], policy_id, vid)


def test_a_vm_create_event_enrols_the_tagged_vm_and_an_update_event_changes_nothing(
        wired, arm, make_host, context, oidc, tmp_path):
    vid, host = host_vm(arm, make_host, RG_TAGS, "ev-web1", tags={"ezssh-policy": "vm-ev", "env": "dev"})
    took = deliver(event_for(vid))
    rec = rec_of(wired, "vm-ev", vid)
    assert rec is not None and rec.state == "succeeded" and rec.attempts == 1 and rec.source == "event"
    assert len(arm.runs_on(vid)) == 1
    host.wait_reloaded()
    key, cert, _ = cert_for(context, oidc, "vm-ev", tmp_path)
    assert login_ok(host, key, cert)

    # a VM update fires the same event type: the VM already trusts the policy's CA and KRL
    posts = run_posts(arm)
    deliver(event_for(vid, update=True))
    deliver(event_for(vid, update=True))
    assert run_posts(arm) == posts and len(arm.runs_on(vid)) == 1
    again = rec_of(wired, "vm-ev", vid)
    assert again.attempts == 1 and again.updated_at == rec.updated_at
    print(f"\nevent -> Event Grid invocation {took:.3f}s (queues only); push {rec.duration_ms} ms, "
          f"{rec.lro_polls} polling GETs")


def test_a_vm_is_covered_by_resource_group_pattern_and_by_tag_pattern(wired, arm, make_host):
    by_rg, _ = host_vm(arm, make_host, RG_PATTERN, "ev-rg")
    by_tag, _ = host_vm(arm, make_host, RG_TAGS, "ev-fleet", tags={"fleet": "blue"})
    deliver(event_for(by_rg))
    deliver(event_for(by_tag))
    assert rec_of(wired, "vm-ev", by_rg).state == "succeeded"
    assert rec_of(wired, "vm-ev", by_tag).state == "succeeded"


def test_events_that_are_not_for_covered_vms_in_scope_are_ignored(wired, arm, make_host):
    uncovered, _ = host_vm(arm, make_host, RG_TAGS, "ev-plain", tags={"env": "dev"})
    outside = arm.add_vm(RG_OUT, "ev-outside", tags={"ezssh-policy": "vm-ev"})
    tagged, _ = host_vm(arm, make_host, RG_TAGS, "ev-nic-owner", tags={"ezssh-policy": "vm-ev"})
    nic = f"/subscriptions/{SUB}/resourceGroups/{RG_TAGS}/providers/Microsoft.Network/networkInterfaces/nic1"
    before = (len(arm.requests), len(arm.runs))
    deliver(event_for(outside))  # tagged, but outside EZSSH_ENROL_SCOPES: not even read
    deliver(event_for(tagged, operation="Microsoft.Compute/virtualMachines/extensions/write"))
    deliver(event_for(tagged, event_type="Microsoft.Resources.ResourceDeleteSuccess",
                      operation="Microsoft.Compute/virtualMachines/delete"))
    deliver(event_for(nic, operation="Microsoft.Network/networkInterfaces/write"))
    deliver({**event_for(tagged), "subject": "not a resource id",
             "data": {**event_for(tagged)["data"], "resourceUri": "not a resource id"}})
    assert (len(arm.requests), len(arm.runs)) == before
    deliver(event_for(uncovered))  # read (for its tags), covered by no policy: nothing pushed
    assert len(arm.runs) == before[1] and not any(r.method == "POST" and "ev-plain" in r.path for r in arm.requests)
    for v in (uncovered, outside, tagged):
        assert rec_of(wired, "vm-ev", v) is None


def test_an_agent_that_is_not_ready_is_retried_by_the_timer_not_by_repeated_events(
        wired, arm, make_host, clock, context, oidc, tmp_path):
    vid, host = host_vm(arm, make_host, RG_TAGS, "ev-new", tags={"ezssh-policy": "vm-ev"})
    arm.agent_not_ready(vid, 1)
    deliver(event_for(vid))
    rec = rec_of(wired, "vm-ev", vid)
    assert rec.state == "retrying" and rec.attempts == 1 and rec.error_code == "agent_not_ready"
    posts = posts_to(arm, "ev-new")
    deliver(event_for(vid, update=True))  # within the backoff: left alone
    timer_tick()
    assert posts_to(arm, "ev-new") == posts == 1
    clock.advance(BACKOFF)
    timer_tick()
    rec = rec_of(wired, "vm-ev", vid)
    assert rec.state == "succeeded" and rec.attempts == 2 and len(arm.runs_on(vid)) == 1
    host.wait_reloaded()
    key, cert, _ = cert_for(context, oidc, "vm-ev", tmp_path)
    assert login_ok(host, key, cert)


def test_reconcile_enrols_missing_vms_and_repushes_after_rotation_and_revocation(
        wired, arm, make_host, context, oidc, tmp_path):
    from devstack.stack import identity_of

    svc = context.service
    carol = identity_of(oidc, "carol")
    policy = svc.policies.get(carol, "vm-ev")
    # a VM that appeared without an event (e.g. created before the subscription existed)
    quiet, host = host_vm(arm, make_host, RG_PATTERN, "rc-quiet")
    timer_tick()
    assert rec_of(wired, "vm-ev", quiet).state == "succeeded" and len(setup_runs(arm, quiet)) == 1
    enrolled = [r.vm_id for r in wired.enrolments.store.list(policy.tenant_id, "vm-ev") if r.state == "succeeded"]
    runs_before = {v: len(setup_runs(arm, v)) for v in enrolled}
    timer_tick()  # nothing changed: nothing pushed
    assert {v: len(setup_runs(arm, v)) for v in enrolled} == runs_before

    # a CA rotation: every enrolled VM gets the new key (and keeps the previous one during the window)
    rotated = svc.policies.rotate_ca(carol, "vm-ev", policy.etag)
    timer_tick()
    assert {v: len(setup_runs(arm, v)) for v in enrolled} == {v: n + 1 for v, n in runs_before.items()}
    rec = rec_of(wired, "vm-ev", quiet)
    assert rec.ca_fingerprints == (rotated.current_ca.fingerprint,
                                   next(c.fingerprint for c in rotated.ca if c.state == "previous"))
    host.wait_reloaded()
    key, cert, serial = cert_for(context, oidc, "vm-ev", tmp_path, "new-ca-key")
    assert login_ok(host, key, cert)  # a certificate from the new CA

    # a revocation: the KRL version moves, the timer re-pushes, sshd refuses that certificate
    other_key, other_cert, _ = cert_for(context, oidc, "vm-ev", tmp_path, "other-key")
    svc.hosts.revoke_certificate(carol, "vm-ev", serial, "test")
    timer_tick()
    rec2 = rec_of(wired, "vm-ev", quiet)
    assert rec2.krl_version > (rec.krl_version or 0) and len(setup_runs(arm, quiet)) == 3
    assert host.login("alice", key, cert).returncode == 255
    assert login_ok(host, other_key, other_cert)


def test_reconcile_looks_listed_vms_up_in_the_records_it_read(wired, arm, make_host, azurite, context):
    """No point read per VM: the records of each policy are one range read, and every VM ARM lists
    is looked up in those rows (the timer used to read each listed VM's record again)."""
    from functions.storage.enrolments import EnrolmentStore
    from tests.readcount import counting_store

    quiet, _ = host_vm(arm, make_host, RG_PATTERN, "rc-count")
    timer_tick()  # enrolled: every listed VM of the policy has a record now
    store, counter = counting_store(azurite.connection_string, context.settings.table_name)
    real = wired.enrolments.store
    wired.enrolments.store = EnrolmentStore(store)
    try:
        counts = wired.enrolments.reconcile()
    finally:
        wired.enrolments.store = real
    recorded = [r for r in real.list(context.settings.tenants[0], "vm-ev")]
    assert counts["vms_seen"] >= 1 and any(r.vm_id == quiet for r in recorded)
    assert counter.point_reads("enr|") == 0, [u for u, _ in counter.reads if "enr|" in u]
    assert counts["jobs"] == 0  # nothing new to enrol


def test_an_event_builds_only_the_krl_of_the_policy_that_covers_the_vm(wired, arm, make_host, context, monkeypatch):
    """The tenant has other policies; an event for one VM reads revocations of its policy only, and
    an event that changes nothing rebuilds no KRL at all (each is kept by its version)."""
    store = context.service.store
    built: list[str] = []
    real = store.list_revoked
    monkeypatch.setattr(store, "list_revoked", lambda tid, pid, **kw: built.append(pid) or real(tid, pid, **kw))
    assert len(store.list_policies(context.settings.tenants[0])) > 1
    vid, _ = host_vm(arm, make_host, RG_TAGS, "ev-krl", tags={"ezssh-policy": "vm-ev"})
    deliver(event_for(vid))
    assert rec_of(wired, "vm-ev", vid).state == "succeeded"
    assert set(built) <= {"vm-ev"} and len(built) <= 1, built
    built.clear()
    deliver(event_for(vid))  # an update: nothing due, nothing rebuilt
    assert built == []
