"""End to end, dual key: alice's `ezssh ssh` waits; bob approves from his own CLI; alice's login then
goes through the real sshd. And the deny path ends alice's wait with exit code 5."""

from __future__ import annotations

import threading

import httpx
import pytest

from tests.e2e.approvals import approval_policy, wait_pending
from tests.e2e.signin import signed_in_home
from devstack.demo import run_cli
from devstack.stack import identity_of
from devstack.stack import ensure_policy


@pytest.fixture(scope="module")
def gated_e2e(context, oidc, sshd, demo_policy):
    yield from approval_policy(context, oidc, sshd, demo_policy, "gated-e2e", ["127.0.0.1"])


def test_bob_approves_from_his_cli_and_alices_waiting_ssh_logs_in(tmp_path_factory, api_server, oidc, sshd,
                                                                    gated_e2e, token_for):
    alice = signed_in_home(tmp_path_factory, api_server, oidc, "alice")
    bob = signed_in_home(tmp_path_factory, api_server, oidc, "bob")
    result: dict = {}
    ssh = ["ssh", "--policy", "gated-e2e", "--reason", "deploy hotfix", "alice@127.0.0.1", "-p", str(sshd.port),
           "-o", "BatchMode=yes", "whoami"]
    t = threading.Thread(target=lambda: result.update(r=run_cli(ssh, alice, timeout=90)))
    t.start()
    rid = wait_pending(api_server, token_for("bob"), "gated-e2e", "alice", set())
    listed = run_cli(["requests", "list", "--pending", "--json"], bob)
    assert listed.returncode == 0 and rid in listed.stdout
    own = run_cli(["requests", "approve", rid], alice)  # alice can't approve her own request
    assert own.returncode == 4, own.stderr
    approved = run_cli(["requests", "approve", rid, "--comment", "ok"], bob)
    assert approved.returncode == 0, approved.stderr
    t.join(timeout=90)
    r = result["r"]
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "alice"
    assert rid in r.stderr  # the waiting CLI said which request it waits on
    assert f"a member of group {oidc.group_id('contoso', 'ezssh-approvers')}" in r.stderr  # and who may approve


def test_deny_ends_alices_wait_with_exit_code_5(tmp_path_factory, api_server, oidc, sshd, gated_e2e, token_for):
    alice = signed_in_home(tmp_path_factory, api_server, oidc, "alice")
    dave = signed_in_home(tmp_path_factory, api_server, oidc, "dave")
    result: dict = {}
    ssh = ["ssh", "--policy", "gated-e2e", "--new", "alice@127.0.0.1", "-p", str(sshd.port), "-o", "BatchMode=yes",
           "whoami"]
    t = threading.Thread(target=lambda: result.update(r=run_cli(ssh, alice, timeout=90)))
    t.start()
    rid = wait_pending(api_server, token_for("dave"), "gated-e2e", "alice", set())
    assert run_cli(["requests", "deny", rid, "--comment", "change freeze"], dave).returncode == 0
    t.join(timeout=90)
    r = result["r"]
    assert r.returncode == 5, r.stderr
    assert "denied" in r.stderr and r.stdout == ""


def test_the_cli_lists_requests_a_page_at_a_time_or_all(tmp_path_factory, api_server, oidc, context, token_for):
    import json

    doc = {"id": "gated-cli-pages", "rules": [{"groups": [oidc.group_id("contoso", "ezssh-users")],
                                               "action": "approval"}],
           "hosts": ["cli-pages-*"], "principals": ["{username}"],
           "approvers": {"groups": [oidc.group_id("contoso", "ezssh-approvers")]}}
    ensure_policy(context.service, identity_of(oidc, "carol"), doc)
    made = []
    for i in range(3):
        r = httpx.post(f"{api_server}/api/requests", json={"host": f"cli-pages-{i}", "principal": "alice",
                                                           "policy": "gated-cli-pages"},
                       headers={"Authorization": f"Bearer {token_for('alice')}"}, timeout=10)
        assert r.status_code == 202, r.text
        made.append(r.json()["id"])
    bob = signed_in_home(tmp_path_factory, api_server, oidc, "bob")
    one = run_cli(["requests", "list", "--limit", "1", "--json"], bob)
    assert one.returncode == 0, one.stderr
    page = json.loads(one.stdout)
    assert len(page["requests"]) == 1 and page["next"]
    every = run_cli(["requests", "list", "--all", "--limit", "1", "--json"], bob)
    assert every.returncode == 0, every.stderr
    listed = json.loads(every.stdout)
    assert listed["next"] is None
    assert [r["id"] for r in listed["requests"] if r["id"] in made] == made[::-1]
    table = run_cli(["requests", "list", "--limit", "1"], bob)
    assert table.returncode == 0 and "--all" in table.stderr
    assert run_cli(["requests", "list", "--limit", "0"], bob).returncode == 2
