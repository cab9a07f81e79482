"""Everyday CLI pieces without the service: shell completion (run by a real bash), service errors in
the CLI's words, server URL hints, `ezssh ls`'s reading of a policy, `ezssh doctor` offline, and the
agent-mode setting."""

from __future__ import annotations

import json
import subprocess

import pytest

from ezssh.api import check_server_url, in_cli_words
from ezssh.commands.ls import access_for, logins_for
from ezssh.errors import EzsshError

from .conftest import run_cli


def complete(script: str, *words: str) -> list[str]:
    """What bash's completion function offers after `words` (the last one being completed)."""
    line = " ".join(words)
    argv = " ".join(f"'{w}'" for w in words)
    r = subprocess.run(["bash", "-c", f"{script}\nCOMP_WORDS=({argv}); COMP_CWORD={len(words) - 1}; "
                                      f"COMP_LINE='{line}'; _ezssh; printf '%s\\n' \"${{COMPREPLY[@]}}\""],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    return r.stdout.split()


def test_bash_completion_is_generated_from_the_parser(tmp_path):
    r = run_cli(tmp_path / "h", "completion", "bash")
    assert r.returncode == 0, r.stderr
    script = r.stdout
    assert complete(script, "ezssh", "po") == ["policy"]
    assert complete(script, "ezssh", "policy", "rot") == ["rotate-ca"]
    assert "--max-ttl" in complete(script, "ezssh", "policy", "create", "--max")
    assert complete(script, "ezssh", "cert", "pr") == ["prune"]
    assert "--agent" in complete(script, "ezssh", "ssh", "--ag")
    assert set(complete(script, "ezssh", "c")) == {"configure", "config", "certs", "completion"}


@pytest.mark.parametrize("shell, marker", [("zsh", "#compdef ezssh"), ("fish", "complete -c ezssh")])
def test_zsh_and_fish_scripts(tmp_path, shell, marker):
    r = run_cli(tmp_path / "h", "completion", shell)
    assert r.returncode == 0 and r.stdout.startswith(marker if shell == "zsh" else "# fish")
    assert "rotate-ca" in r.stdout and marker in r.stdout


def test_service_messages_in_the_cli_words():
    """From the error's code and details (what the service sends with its message), not its text."""
    assert in_cli_words("ttl_too_long", "ttl_seconds 90000 is over policy 'demo''s maximum of 28800 seconds.",
                        {"requested": 90000, "max_ttl": 28800, "policy": "demo"}) == \
        "--ttl 1d1h is over policy 'demo''s maximum of 8h."
    assert in_cli_words("invalid_request", "ttl_seconds must be a whole number of at least 60.",
                        {"field": "ttl_seconds", "min": 60}) == \
        "--ttl must be a whole number of at least 60."
    assert in_cli_words("invalid_request", "'ttl_seconds' must be between 60 and 86400.",
                        {"field": "ttl_seconds", "min": 60, "max": 86400}) == "--ttl must be between 1m and 1d."


@pytest.mark.parametrize("url, hint", [
    ("https://ezssh.example.com/api", "ezssh configure --server https://ezssh.example.com"),
    ("https://ezssh.example.com/api/", "ezssh configure --server https://ezssh.example.com"),
    ("ftp://x", "https://ezssh.example.com"),
])
def test_server_url_hints(url, hint):
    with pytest.raises(EzsshError) as ei:
        check_server_url(url)
    assert ei.value.code == 2 and hint in ei.value.render()


def test_wrong_scheme_gets_a_hint(tmp_path, config_server):
    """https:// against a server that speaks plain HTTP: TLS's WRONG_VERSION_NUMBER becomes advice."""
    url = config_server.url.replace("http://", "https://")
    r = run_cli(tmp_path / "h", "configure", "--server", url)
    assert r.returncode == 6, r.stderr
    assert "does not answer with TLS" in r.stderr and "http://" in r.stderr
    assert "Traceback" not in r.stderr


POLICY = {"principals": ["{username}", "deploy"], "rules": [
    {"users": ["bob@contoso.test"], "action": "deny"},
    {"groups": ["g-ops"], "action": "approval"},
    {"users": ["*"], "action": "auto"}]}


@pytest.mark.parametrize("me, access", [
    ({"upn": "bob@contoso.test", "oid": "o1", "groups": {"g-ops"}}, "deny"),      # first match wins
    ({"upn": "alice@contoso.test", "oid": "o2", "groups": {"g-ops"}}, "approval"),
    ({"upn": "carol@contoso.test", "oid": "o3", "groups": set()}, "auto"),
])
def test_ls_reads_the_first_matching_rule(me, access):
    assert access_for(POLICY, me) == access
    assert logins_for(POLICY, me) == [me["upn"].split("@")[0], "deploy"]
    assert access_for({"rules": []}, me) == "deny"


def test_doctor_offline(tmp_path):
    r = run_cli(tmp_path / "h", "doctor", "--json")
    assert r.returncode == 1
    rows = {row["check"]: row for row in json.loads(r.stdout)}
    assert rows["config"]["status"] == "fail" and "ezssh configure" in rows["config"]["fix"]
    assert rows["ssh"]["status"] in ("ok", "warn") and "OpenSSH" in rows["ssh"]["detail"]


def test_doctor_names_an_unreachable_service(tmp_path):
    from devstack.proc import free_port
    from ezssh.home import save_config

    home = tmp_path / "h"
    home.mkdir(mode=0o700)
    save_config({"server": f"http://127.0.0.1:{free_port()}", "authority": "x", "client_id": "x", "scopes": ["s"]}, home)
    r = run_cli(home, "doctor")
    assert r.returncode == 1
    assert "fail  service" in r.stdout and "connection refused" in r.stdout


def test_agent_setting(tmp_path):
    from ezssh.home import load_config, save_config

    home = tmp_path / "h"
    home.mkdir(mode=0o700)
    save_config({"server": "http://127.0.0.1:9", "authority": "x", "client_id": "x", "scopes": ["s"]}, home)
    r = run_cli(home, "configure", "--agent", "on")
    assert r.returncode == 0 and load_config(home)["agent"] is True
    r = run_cli(home, "configure", "--agent", "off")
    assert r.returncode == 0 and load_config(home)["agent"] is False
    r = run_cli(home, "configure")
    assert r.returncode == 2 and "--server" in r.stderr


def test_group_display_names_where_known():
    from ezssh.issue import describe_approvers
    from ezssh.policydoc import render_policy

    names = {"g1": "web-admins"}
    assert describe_approvers({"groups": ["g1", "g2"]}, "p", names) == \
        " from a member of group web-admins (g1) or a member of group g2"
    text = render_policy({"id": "p", "approvers": {"groups": ["g1"]}, "group_names": names})
    assert "  - group=g1  # web-admins\n" in text


def test_bash_completion_works_in_a_bash_without_the_bash_completion_package(tmp_path):
    """Sourced as the README says, in a bash that loaded no rc file and no bash-completion."""
    script = tmp_path / "ezssh-completion.bash"
    script.write_text(run_cli(tmp_path / "h", "completion", "bash").stdout)
    r = subprocess.run(["bash", "--norc", "--noprofile", "-c",
                        f". {script}; complete -p ezssh; declare -F _init_completion _get_comp_words_by_ref || true; "
                        "COMP_WORDS=(ezssh whoa); COMP_CWORD=1; _ezssh; echo \"${COMPREPLY[@]}\""],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "complete -o default -F _ezssh ezssh" and lines[-1] == "whoami", r.stdout
    assert "_init_completion" not in r.stdout  # none of bash-completion's helpers was there to lean on


def test_the_client_readme_lists_every_command():
    """Every command and subcommand of the parser has a row in client/README.md's command table."""
    from pathlib import Path

    from ezssh.commands.completion import command_tree

    readme = (Path(__file__).resolve().parents[2] / "client" / "README.md").read_text()
    rows = [line for line in readme.splitlines() if line.startswith("| `ezssh ")]
    missing = []
    for cmd, node in command_tree().items():
        for sub in node["subs"] or [None]:
            want = f"ezssh {cmd}" + (f" {sub}" if sub else "")
            alt = f"ezssh cert {sub}" if cmd == "certs" and sub else want
            if not any(f"`{want}" in r or f"`{alt}" in r for r in rows):
                missing.append(want)
    assert not missing, f"client/README.md has no row for: {missing}"
