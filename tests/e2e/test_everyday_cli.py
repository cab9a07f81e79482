"""End to end, against the real API and sshd: `ezssh ls`, `ezssh doctor`, durations for --ttl (and the
service's refusal said in the CLI's words), and a new certificate obtained with the token read from
the cache without MSAL."""

from __future__ import annotations

import json
import subprocess
import sys

from devstack.demo import run_cli

from .test_ssh_login import signed_in as alice, ssh_opts  # noqa: F401 - the signed-in alice fixture


def test_ls_shows_where_alice_may_log_in(alice, demo_policy):
    r = run_cli(["ls", "--json"], alice)
    assert r.returncode == 0, r.stderr
    rows = {row["policy"]: row for row in json.loads(r.stdout)}
    demo = rows["demo"]
    assert demo["hosts"] == list(demo_policy.hosts)
    assert demo["logins"] == ["alice"] and demo["access"] == "auto"
    text = run_cli(["ls"], alice)
    assert "demo" in text.stdout and "yes, at once" in text.stdout


def test_doctor_is_green_for_a_signed_in_user(alice):
    r = run_cli(["doctor", "--json"], alice)
    rows = {row["check"]: row for row in json.loads(r.stdout)}
    assert r.returncode == 0, r.stdout
    assert rows["service"]["status"] == "ok" and rows["sign-in"]["status"] == "ok"
    assert "alice@contoso.test" in rows["sign-in"]["detail"]
    assert rows["clock"]["status"] == "ok"


def test_ttl_takes_durations_and_refusals_use_the_cli_words(alice, sshd):
    r = run_cli(["ssh", "-e", "--new", "--ttl", "30m", "alice@127.0.0.1", *ssh_opts(sshd), "whoami"], alice)
    assert r.returncode == 0 and r.stdout.strip() == "alice", r.stderr
    listed = json.loads(run_cli(["certs", "list", "--json"], alice).stdout)
    meta = json.loads((__import__("pathlib").Path(listed[0]["dir"]) / "meta.json").read_text())
    assert meta["valid_before"] - meta["valid_after"] == 30 * 60 + 60  # 30 min plus the 60 s backdate
    r = run_cli(["ssh", "--new", "--ttl", "1d", "alice@127.0.0.1", *ssh_opts(sshd), "true"], alice)
    assert r.returncode == 1
    assert "--ttl 1d is over policy 'demo''s maximum of 8h" in r.stderr and "ttl_seconds" not in r.stderr


def test_a_new_certificate_with_a_cached_token_needs_no_msal(alice, sshd):
    """The access token comes from the cache file; msal, requests and cryptography stay unloaded."""
    argv = [sys.executable, "-X", "importtime", "-m", "ezssh", "ssh", "--new", "alice@127.0.0.1", *ssh_opts(sshd),
            "whoami"]
    r = subprocess.run(argv, env=alice, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert r.returncode == 0 and r.stdout.strip() == "alice", r.stderr[-2000:]
    mods = {line.rsplit("|", 1)[1].strip() for line in r.stderr.splitlines() if line.startswith("import time:")}
    assert "ezssh.issue" in mods  # the slow path did run
    assert {m.split(".")[0] for m in mods} & {"msal", "msal_extensions", "requests", "cryptography"} == set()
