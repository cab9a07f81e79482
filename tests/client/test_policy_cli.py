"""`ezssh policy ...` without the service: durations, subjects and rules, `--set`, policy documents
(YAML, JSON, stdin), the readable view, usage errors before any network, and lazy imports.
The commands against the real API server are in tests/e2e/test_policy_cli.py."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from ezssh import durations, policydoc
from ezssh.commands import policy as policycommands
from ezssh.cli import build_parser
from ezssh.errors import CHANGED, USAGE, EzsshError

from .conftest import cli_env, run_cli
from .test_ssh import imported_modules

# ---- durations --------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, seconds", [
    ("3600", 3600), ("90s", 90), ("30m", 1800), ("8h", 28800), ("1d", 86400), ("1h30m", 5400),
    (" 2H ", 7200), ("1d2h3m4s", 93784), ("30m1h", 5400), (60, 60),
])
def test_ttl_accepts_seconds_and_units(text, seconds):
    assert durations.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "0", "0h", "-5", "1y", "h", "1.5h", "1h1h", "30m5", "5 30m", "8 h", "1h-", True, 0])
def test_ttl_refuses_what_is_not_a_duration(text):
    with pytest.raises(ValueError):
        durations.parse_duration(text)


@pytest.mark.parametrize("seconds, text", [(3600, "1h"), (5400, "1h30m"), (90, "1m30s"), (86460, "1d1m"), (45, "45s")])
def test_ttl_display_round_trips(seconds, text):
    assert durations.fmt_duration(seconds) == text
    assert durations.parse_duration(text) == seconds


# ---- subjects, rules, flags --------------------------------------------------------------------------


def test_subjects_are_user_or_group():
    assert policydoc.parse_subject("user=bob@contoso.com") == ("users", "bob@contoso.com")
    assert policydoc.parse_subject("group=0000-11") == ("groups", "0000-11")
    assert policydoc.parse_subject("Groups = g1") == ("groups", "g1")
    assert policydoc.parse_subject("bob@contoso.com") == ("users", "bob@contoso.com")
    assert policydoc.parse_subject("*") == ("users", "*")
    for bad in ("0000-11", "team=x", "user=", "group= "):
        with pytest.raises(EzsshError) as e:
            policydoc.parse_subject(bad)
        assert e.value.code == USAGE
    assert policydoc.parse_subjects(["user=a@x", "group=g,user=b@x", "user=a@x"]) == \
        {"users": ["a@x", "b@x"], "groups": ["g"]}


def test_rules_are_action_then_subjects():
    assert policydoc.parse_rule("auto:group=g1") == {"groups": ["g1"], "action": "auto"}
    assert policydoc.parse_rule("approval:user=a@x,group=g2") == \
        {"users": ["a@x"], "groups": ["g2"], "action": "approval"}
    assert policydoc.parse_rule("DENY:*") == {"users": ["*"], "action": "deny"}
    for bad in ("auto", "maybe:user=a@x", "auto:", "auto:user=", "group=g"):
        with pytest.raises(EzsshError) as e:
            policydoc.parse_rule(bad)
        assert e.value.code == USAGE, bad


def parse(*argv: str):
    return build_parser().parse_args(list(argv))


def test_create_flags_make_a_policy_document():
    args = parse("policy", "create", "--id", "web", "--name", "Web", "--host", "web-*", "--host", "10.0.0.0/16,db-*",
                 "--principal", "{username}", "--principal", "deploy", "--rule", "auto:group=g1",
                 "--rule", "approval:user=bob@x", "--approver", "group=g2", "--approvals-required", "2",
                 "--admin", "user=dave@x", "--default-ttl", "30m", "--max-ttl", "8h", "--request-ttl", "1d",
                 "--extension", "permit-pty", "--force-command", "/bin/true", "--source-address", "10.0.0.0/8",
                 "--webhook-url", "https://example.com/hook", "--webhook-format", "teams")
    assert args.func is policycommands.cmd_create
    assert policydoc.document_from_flags(args) == {
        "id": "web", "name": "Web", "hosts": ["web-*", "10.0.0.0/16", "db-*"], "principals": ["{username}", "deploy"],
        "rules": [{"groups": ["g1"], "action": "auto"}, {"users": ["bob@x"], "action": "approval"}],
        "approvers": {"groups": ["g2"]}, "approvals_required": 2, "admins": {"users": ["dave@x"]},
        "default_ttl": 1800, "max_ttl": 28800, "request_ttl": 86400, "extensions": ["permit-pty"],
        "force_command": "/bin/true", "source_address": ["10.0.0.0/8"],
        "webhook_url": "https://example.com/hook", "webhook_format": "teams",
    }


def test_flags_not_given_are_not_sent():
    assert policydoc.document_from_flags(parse("policy", "update", "p1", "--max-ttl", "2h")) == {"max_ttl": 7200}
    args = parse("policy", "update", "p1", "--if-match", 'W/"e1"', "--set", "name=x")
    assert (args.id, args.if_match, args.set) == ("p1", 'W/"e1"', ["name=x"])
    with pytest.raises(SystemExit):
        parse("policy", "update", "p1", "--id", "p2")  # an id never changes: no such flag on update


@pytest.mark.parametrize("assignment, expected", [
    ("max_ttl=8h", ("max_ttl", 28800)), ("default-ttl=600", ("default_ttl", 600)),
    ("approvals_required=2", ("approvals_required", 2)),
    ("name=Web servers = prod", ("name", "Web servers = prod")), ("force_command=null", ("force_command", None)),
    ("webhook_url=", ("webhook_url", None)),
    ("hosts=web-*, 10.0.0.0/8", ("hosts", ["web-*", "10.0.0.0/8"])), ("hosts=[\"a\"]", ("hosts", ["a"])),
    ("source_address=", ("source_address", [])),
    ("approvers=group=g1,user=a@x", ("approvers", {"users": ["a@x"], "groups": ["g1"]})),
    ("admins={}", ("admins", {})),
    ("rules=auto:group=g1;deny:*", ("rules", [{"groups": ["g1"], "action": "auto"}, {"users": ["*"], "action": "deny"}])),
    ('rules=[{"users": ["*"], "action": "auto"}]', ("rules", [{"users": ["*"], "action": "auto"}])),
    ("future_field=3", ("future_field", 3)), ("future_text=abc", ("future_text", "abc")),
])
def test_set_is_typed_by_field(assignment, expected):
    assert policydoc.parse_set(assignment) == expected


@pytest.mark.parametrize("assignment", ["max_ttl", "=1", "id=other", "etag=x", "ca=[]", "max_ttl=1y",
                                        "approvals_required=two", "hosts=[not json", "rules=sometimes:user=a@x"])
def test_set_refusals_are_usage_errors(assignment):
    with pytest.raises(EzsshError) as e:
        policydoc.parse_set(assignment)
    assert e.value.code == USAGE


# ---- documents -----------------------------------------------------------------------------------


SAMPLE_YAML = """\
id: web
name: Web servers
hosts: [web-*, 10.0.0.0/16]
principals: ["{username}"]
rules:
  - groups: [g1]
    action: auto
default_ttl: 1h
max_ttl: 28800
"""


def test_yaml_and_json_files_and_stdin(tmp_path, monkeypatch):
    y = tmp_path / "p.yaml"
    y.write_text(SAMPLE_YAML)
    doc, etag = policydoc.load_document(str(y))
    assert etag is None
    assert doc == {"id": "web", "name": "Web servers", "hosts": ["web-*", "10.0.0.0/16"], "principals": ["{username}"],
                   "rules": [{"groups": ["g1"], "action": "auto"}], "default_ttl": 3600, "max_ttl": 28800}
    j = tmp_path / "p.json"
    j.write_text(json.dumps(doc))
    assert policydoc.load_document(str(j)) == (doc, None)
    monkeypatch.setattr(sys, "stdin", io.StringIO(SAMPLE_YAML))
    assert policydoc.load_document("-") == (doc, None)


def test_a_shown_policy_file_keeps_its_etag_and_drops_what_the_service_sets(tmp_path):
    shown = {"id": "web", "name": "Web", "etag": 'W/"e1"', "tenant_id": "t", "ca": [{"state": "current"}],
             "deleted": False, "you": {"admin": True}, "max_ttl": 3600}
    f = tmp_path / "shown.json"
    f.write_text(json.dumps(shown))
    assert policydoc.load_document(str(f)) == ({"id": "web", "name": "Web", "max_ttl": 3600}, 'W/"e1"')


@pytest.mark.parametrize("name, text, needle", [
    ("list.yaml", "- a\n- b\n", "must hold one policy"),
    ("bad.yaml", "id: [unclosed\n", "neither valid JSON nor valid YAML"),
    ("bad.json", "{\"id\": ", "not valid JSON"),
    ("ttl.yaml", "id: x\nmax_ttl: forever\n", "max_ttl"),
])
def test_bad_documents_are_usage_errors(tmp_path, name, text, needle):
    f = tmp_path / name
    f.write_text(text)
    with pytest.raises(EzsshError) as e:
        policydoc.load_document(str(f))
    assert e.value.code == USAGE and needle in e.value.message


def test_a_missing_file_is_a_usage_error(tmp_path):
    with pytest.raises(EzsshError) as e:
        policydoc.load_document(str(tmp_path / "nope.yaml"))
    assert e.value.code == USAGE and "Cannot read" in e.value.message


def test_the_readme_sample_policy_reads(tmp_path):
    readme = (Path(__file__).resolve().parents[2] / "client" / "README.md").read_text()
    sample = readme.split("```yaml\n", 1)[1].split("```", 1)[0]
    f = tmp_path / "sample.yaml"
    f.write_text(sample)
    doc, _ = policydoc.load_document(str(f))
    assert set(doc) <= set(policydoc.EDITABLE_FIELDS) and doc["id"] and doc["rules"] and doc["hosts"]


# ---- rendering and errors ------------------------------------------------------------------------------


def test_the_readable_view_uses_the_flag_syntax():
    text = policydoc.render_policy({
        "id": "web", "name": "Web", "etag": "e1", "you": {"admin": True, "member": True},
        "hosts": ["web-*"], "principals": ["{username}"],
        "rules": [{"users": ["a@x"], "groups": ["g1"], "action": "auto"}],
        "approvers": {"users": [], "groups": ["g2"]}, "admins": {}, "approvals_required": 1,
        "default_ttl": 1800, "max_ttl": 28800, "request_ttl": 3600, "extensions": ["permit-pty"],
        "force_command": None, "source_address": [], "webhook_url": None,
        "ca": [{"state": "current", "fingerprint": "SHA256:new", "created_at": 0},
               {"state": "previous", "fingerprint": "SHA256:old", "created_at": 0, "retire_after": 86400}],
    })
    assert "you: admin,member\n" in text and "  - auto:user=a@x,group=g1\n" in text
    assert "approvers:\n  - group=g2\n" in text and "admins: []\n" in text
    assert "max_ttl: 8h (28800 s)\n" in text and "force_command: -\n" in text
    assert "SHA256:old" in text and "trusted until 1970-01-02 00:00 UTC" in text


def test_a_lost_race_has_its_own_exit_code_and_a_clear_message():
    exc = policycommands.lost_race(EzsshError("ETag mismatch", 1, request_id="r1", error="precondition_failed"), "web", "e1")
    assert exc.code == CHANGED == 7
    assert "changed by someone else" in exc.message and "nothing was changed" in exc.message
    assert "request id: r1" in exc.render()


# ---- the real command line, before any network ------------------------------------------------------


def test_usage_errors_come_before_any_network(tmp_path):
    home = tmp_path / "unconfigured"
    r = run_cli(home, "policy", "delete", "web")  # no terminal and no --yes
    assert r.returncode == 2 and "--yes" in r.stderr
    r = run_cli(home, "policy", "create", "--host", "web-*")
    assert r.returncode == 2 and "needs an id" in r.stderr
    r = run_cli(home, "policy", "update", "web")
    assert r.returncode == 2 and "Nothing to change" in r.stderr
    r = run_cli(home, "policy", "create", "--id", "web", "--max-ttl", "1y")
    assert r.returncode == 2 and "not a duration" in r.stderr
    r = run_cli(home, "policy", "update", "web", "--set", "id=other")
    assert r.returncode == 2 and "cannot change" in r.stderr
    # with valid arguments, the missing configuration is what stops it
    r = run_cli(home, "policy", "list")
    assert r.returncode == 3 and "ezssh configure" in r.stderr


def test_policy_create_from_stdin_parses_before_the_network(tmp_path):
    r = subprocess.run([sys.executable, "-m", "ezssh", "policy", "create", "-f", "-"], input="[1, 2]\n",
                       env=cli_env(tmp_path / "h"), capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "stdin must hold one policy" in r.stderr


@pytest.mark.parametrize("argv", [["policy", "--help"], ["policy", "create", "--help"], ["policy", "update", "--help"]])
def test_policy_help_is_light(tmp_path, argv):
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "ezssh", *argv],
                       env=cli_env(tmp_path / "h"), capture_output=True, text=True)
    assert r.returncode == 0 and "usage: ezssh policy" in r.stdout
    mods = imported_modules(r.stderr)
    assert "ezssh.commands.policy" in mods
    assert {m for m in mods if m.split(".")[0] in ("yaml", "msal", "requests", "urllib3", "cryptography")} == set()
