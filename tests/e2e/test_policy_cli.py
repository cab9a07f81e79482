"""End to end (issue 3): admins manage policies with the real CLI against the real API server
(uvicorn + Azurite + SoftHSM + the OIDC stand-in); a policy's certificates log in only where its CA
is trusted (the session sshd)."""

from __future__ import annotations

import json
import subprocess

import httpx
import pytest

from tests.e2e.signin import signed_in_home
from devstack.demo import run_cli

YAML_POLICY = """\
# a policy as an admin would write it
id: cli-yaml
name: Web servers (from YAML)
hosts:
  - cli-web-*
  - 10.20.0.0/16
principals: ["{{username}}", deploy]
rules:
  - groups: [{users}]
    action: auto
  - users: ["*"]
    action: deny
approvers:
  groups: [{approvers}]
admins:
  users: [{dave}]  # object ids, never UPNs
default_ttl: 30m
max_ttl: 4h
extensions: [permit-pty]
"""


@pytest.fixture(scope="module")
def carol(tmp_path_factory, api_server, oidc):
    return signed_in_home(tmp_path_factory, api_server, oidc, "carol")


@pytest.fixture(scope="module")
def alice(tmp_path_factory, api_server, oidc):
    return signed_in_home(tmp_path_factory, api_server, oidc, "alice")


@pytest.fixture(scope="module")
def yaml_policy(carol, oidc, tmp_path_factory):
    path = tmp_path_factory.mktemp("docs") / "web.yaml"
    path.write_text(YAML_POLICY.format(users=oidc.group_id("contoso", "ezssh-users"), dave=DAVE,
                                       approvers=oidc.group_id("contoso", "ezssh-approvers")))
    r = run_cli(["policy", "create", "-f", str(path), "--json"], carol)
    assert r.returncode == 0, r.stderr
    assert "Created policy cli-yaml" in r.stderr
    return json.loads(r.stdout)


def flags_create(env, pid: str, *extra: str) -> subprocess.CompletedProcess:
    return run_cli(["policy", "create", "--id", pid, "--name", "Made with flags", "--host", "cli-flags-*",
                    "--host", "10.30.0.0/16", "--principal", "{username}", "--principal", "ops",
                    "--rule", f"auto:user={ALICE}", "--rule", "approval:group=" + GROUPS["users"],
                    "--approver", f"user={BOB}", "--approver", f"user={DAVE}",
                    "--approvals-required", "1", "--admin", f"user={DAVE}",
                    "--default-ttl", "15m", "--max-ttl", "2h", "--extension", "permit-pty",
                    "--extension", "permit-port-forwarding", "--force-command", "/usr/bin/true",
                    "--source-address", "10.0.0.0/8", "--webhook-url", "http://127.0.0.1:9/hooks/ops",
                    *extra], env)


GROUPS: dict[str, str] = {}
# object ids of the dev users (infra/local/oidc/users.json): policies name people by these
ALICE = "ce6db6b2-527e-4502-bdc9-17a512aa3e03"
BOB = "7385a7f7-71c4-4083-94b5-8cdfd3ae6fc9"
DAVE = "25cadfc3-01ba-44cb-b834-75b5a5aceb88"


@pytest.fixture(scope="module", autouse=True)
def _groups(oidc):
    GROUPS["users"] = oidc.group_id("contoso", "ezssh-users")


def show(env, pid: str) -> dict:
    r = run_cli(["policy", "show", pid, "--json"], env)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_create_from_yaml_then_list_and_show(carol, yaml_policy):
    p = yaml_policy
    assert p["id"] == "cli-yaml" and p["name"] == "Web servers (from YAML)"
    assert p["hosts"] == ["cli-web-*", "10.20.0.0/16"] and p["principals"] == ["{username}", "deploy"]
    assert (p["default_ttl"], p["max_ttl"]) == (1800, 4 * 3600)
    assert [r["action"] for r in p["rules"]] == ["auto", "deny"]
    assert p["etag"] and [c["state"] for c in p["ca"]] == ["current"]

    r = run_cli(["policy", "list", "--json"], carol)
    assert r.returncode == 0, r.stderr
    assert "cli-yaml" in {x["id"] for x in json.loads(r.stdout)["policies"]}
    r = run_cli(["policy", "list"], carol)
    assert r.returncode == 0 and r.stdout.splitlines()[0].split()[:2] == ["ID", "NAME"]
    assert any(line.startswith("cli-yaml ") for line in r.stdout.splitlines())

    assert show(carol, "cli-yaml") == p
    r = run_cli(["policy", "show", "cli-yaml"], carol)
    assert r.returncode == 0, r.stderr
    assert "id: cli-yaml" in r.stdout and "  - cli-web-*" in r.stdout
    assert f"  - auto:group={GROUPS['users']}" in r.stdout and "  - deny:user=*" in r.stdout
    assert "max_ttl: 4h (14400 s)" in r.stdout and p["ca"][0]["fingerprint"] in r.stdout


def test_create_from_flags(carol):
    r = flags_create(carol, "cli-flags", "--json")
    assert r.returncode == 0, r.stderr
    p = json.loads(r.stdout)
    assert p["rules"] == [{"users": [ALICE], "groups": [], "action": "auto"},
                          {"users": [], "groups": [GROUPS["users"]], "action": "approval"}]
    assert p["approvers"] == {"users": [BOB, DAVE], "groups": []}
    assert p["admins"]["users"] == [DAVE]
    assert (p["default_ttl"], p["max_ttl"], p["force_command"]) == (900, 7200, "/usr/bin/true")
    assert p["extensions"] == ["permit-pty", "permit-port-forwarding"] and p["source_address"] == ["10.0.0.0/8"]
    assert p["webhook_url"] == "http://127.0.0.1:9/hooks/ops"
    # the same id again: the service's conflict message, exit 1
    again = flags_create(carol, "cli-flags")
    assert again.returncode == 1 and "already exists" in again.stderr and "request id" in again.stderr


def test_a_refused_document_shows_the_service_message(carol):
    r = run_cli(["policy", "create", "--id", "cli-bad", "--host", "cli-x", "--principal", "x",
                 "--rule", f"auto:user={ALICE}", "--extension", "permit-everything"], carol)
    assert r.returncode == 1 and "Unknown extension" in r.stderr and "invalid_request" in r.stderr
    assert "request id: " in r.stderr


def test_update_with_a_file_and_with_set(carol, yaml_policy, tmp_path):
    before = show(carol, "cli-yaml")
    # the edit-what-you-showed workflow: show --json, change it, update -f (the file's etag pins it)
    doc = {**before, "name": "Web servers (edited)", "hosts": ["cli-web-*"]}
    edited = tmp_path / "edited.json"
    edited.write_text(json.dumps(doc))
    r = run_cli(["policy", "update", "cli-yaml", "-f", str(edited), "--json"], carol)
    assert r.returncode == 0, r.stderr
    after = json.loads(r.stdout)
    assert after["name"] == "Web servers (edited)" and after["hosts"] == ["cli-web-*"]
    assert after["etag"] != before["etag"] and after["ca"] == before["ca"]

    partial = tmp_path / "partial.yaml"
    partial.write_text("principals: [deploy]\nmax_ttl: 2h\n")
    r = run_cli(["policy", "update", "cli-yaml", "-f", str(partial)], carol)
    assert r.returncode == 0, r.stderr
    assert "changed: principals, max_ttl" in r.stderr

    r = run_cli(["policy", "update", "cli-yaml", "--set", "max_ttl=3h", "--set", "default_ttl=45m",
                 "--set", "extensions=permit-pty,permit-agent-forwarding", "--set", "force_command=null"], carol)
    assert r.returncode == 0, r.stderr
    p = show(carol, "cli-yaml")
    assert (p["max_ttl"], p["default_ttl"], p["principals"]) == (3 * 3600, 45 * 60, ["deploy"])
    assert p["extensions"] == ["permit-pty", "permit-agent-forwarding"] and p["force_command"] is None

    r = run_cli(["policy", "update", "cli-yaml", "--set", "tenant_id=x"], carol)
    assert r.returncode == 2 and "set by the service" in r.stderr


def test_a_stale_update_is_refused_and_changes_nothing(carol, yaml_policy, api_server, token_for, tmp_path):
    snapshot = tmp_path / "snapshot.json"
    r = run_cli(["policy", "show", "cli-yaml", "--json"], carol)
    snapshot.write_text(r.stdout)
    old_etag = json.loads(r.stdout)["etag"]
    # someone else edits it through the API in between
    edit = httpx.patch(f"{api_server}/api/policies/cli-yaml", json={"name": "Edited by someone else"},
                       headers={"Authorization": f"Bearer {token_for('carol')}", "If-Match": old_etag}, timeout=30)
    assert edit.status_code == 200, edit.text
    current = edit.json()

    r = run_cli(["policy", "update", "cli-yaml", "--if-match", old_etag, "--set", "max_ttl=1h"], carol)
    assert r.returncode == 7, r.stderr
    assert "was changed by someone else since it was read" in r.stderr and "nothing was changed" in r.stderr
    assert "precondition_failed" in r.stderr and "request id: " in r.stderr
    # the edited `show --json` of before the change carries the old etag: refused too
    r = run_cli(["policy", "update", "cli-yaml", "-f", str(snapshot), "--set", "name=Mine"], carol)
    assert r.returncode == 7, r.stderr
    r = run_cli(["policy", "delete", "cli-yaml", "--yes", "--if-match", old_etag], carol)
    assert r.returncode == 7, r.stderr

    now = show(carol, "cli-yaml")
    assert now["etag"] == current["etag"] and now["name"] == "Edited by someone else"
    assert now["max_ttl"] == current["max_ttl"]


def test_a_member_who_is_not_an_admin_cannot_create_or_change(alice, carol):
    r = flags_create(alice, "cli-alice")
    assert r.returncode == 4, r.stderr
    assert "Only tenant admins" in r.stderr and "request id: " in r.stderr
    r = run_cli(["policy", "show", "cli-alice"], carol)
    assert r.returncode == 1 and "was not found" in r.stderr


def test_rotate_ca_lists_two_ca_keys(carol):
    assert flags_create(carol, "cli-rotate").returncode == 0
    first = run_cli(["policy", "ca", "cli-rotate"], carol).stdout.splitlines()
    r = run_cli(["policy", "rotate-ca", "cli-rotate"], carol)
    assert r.returncode == 0, r.stderr
    assert "Rotated the CA of policy cli-rotate" in r.stderr
    lines = run_cli(["policy", "ca", "cli-rotate"], carol).stdout.splitlines()
    assert len(first) == 1 and len(lines) == 2
    assert lines[1] == first[0] and lines[0] != first[0]  # new key first, the previous one still trusted
    assert r.stdout.splitlines() == lines
    p = show(carol, "cli-rotate")
    assert [c["state"] for c in p["ca"]] == ["current", "previous"]


def test_delete_asks_for_yes_then_the_policy_is_gone(carol):
    assert flags_create(carol, "cli-delete").returncode == 0
    r = run_cli(["policy", "delete", "cli-delete"], carol)  # no terminal, no --yes: refused
    assert r.returncode == 2 and "--yes" in r.stderr
    assert show(carol, "cli-delete")["id"] == "cli-delete"
    r = run_cli(["policy", "delete", "cli-delete", "--yes"], carol)
    assert r.returncode == 0, r.stderr
    r = run_cli(["policy", "show", "cli-delete"], carol)
    assert r.returncode == 1
    assert "Policy 'cli-delete' was not found." in r.stderr and "not_found" in r.stderr and "request id: " in r.stderr


def test_each_policy_certificate_logs_in_only_where_its_ca_is_trusted(carol, alice, sshd):
    """The session sshd trusts only the demo policy's CA. A certificate from a new policy is refused
    there until that policy's CA lines are added to sshd's trust file."""
    r = run_cli(["policy", "create", "--id", "cli-trust", "--host", "127.0.0.1", "--principal", "{username}",
                 "--rule", f"auto:user={ALICE}", "--max-ttl", "1h", "--default-ttl", "10m"], carol)
    assert r.returncode == 0, r.stderr
    ca_lines = run_cli(["policy", "ca", "cli-trust"], carol).stdout
    assert ca_lines.count("\n") == 1
    # The session sshd's host, asked for under this policy (the demo policy covers it too).
    login = ["ssh", "--policy", "cli-trust", "alice@127.0.0.1", "-p", str(sshd.port),
             "-o", "BatchMode=yes", "-o", "LogLevel=ERROR", "whoami"]
    original = sshd.trusted_ca_file.read_text()
    try:
        refused = run_cli(["ssh", "-e", *login[1:]], alice)
        assert refused.returncode == 255 and "Permission denied" in refused.stderr, refused.stderr
        assert "policy:     cli-trust" in refused.stderr and "ezssh/cli-trust/" in refused.stderr
        sshd.trusted_ca_file.write_text(original + ca_lines)
        ok = run_cli(["ssh", "-e", *login[1:]], alice)
        assert ok.returncode == 0, ok.stderr
        assert ok.stdout.strip() == "alice" and "cached certificate" in ok.stderr
    finally:
        sshd.trusted_ca_file.write_text(original)
        run_cli(["policy", "delete", "cli-trust", "--yes"], carol)
