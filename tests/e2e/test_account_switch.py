"""End to end, one EZSSH_HOME through the real CLI, Entra ID stand-in, API and sshd: a certificate
serves only the account that got it (signing in as someone else removes it from the disk and from
ssh-agent), `--ttl` is honoured with a certificate cached, and a change of server is followed by the
ssh_config block (`ezssh doctor` says what fixes it, `ezssh login` rewrites it)."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from devstack.demo import cli_env, run_cli
from tests.e2e.signin import sign_in

from .test_ssh_login import ACCEPTED, ssh_opts


@pytest.fixture()
def agent():
    out = subprocess.run(["ssh-agent", "-s"], capture_output=True, text=True, check=True).stdout
    env = dict(line.split(";")[0].split("=", 1) for line in out.splitlines() if line.startswith("SSH_"))
    yield env
    subprocess.run(["ssh-agent", "-k"], env={**env, "PATH": "/usr/bin:/bin"}, capture_output=True)


def agent_list(agent: dict) -> str:
    return subprocess.run(["ssh-add", "-l"], env={**agent, "PATH": "/usr/bin:/bin"}, capture_output=True,
                          text=True).stdout


def cached(env: dict) -> list[dict]:
    r = run_cli(["certs", "list", "--json"], env)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout or "[]")


def accepted(sshd, user: str) -> list:
    return [m for m in ACCEPTED.finditer(sshd.log_text()) if m["user"] == user]


def test_another_account_never_uses_the_certificate_and_the_agent_is_emptied(tmp_path, api_server, oidc, sshd,
                                                                                agent):
    env = sign_in({**cli_env(tmp_path / "home"), **agent}, api_server, oidc, "alice")
    r = run_cli(["ssh", "--agent", "alice@127.0.0.1", *ssh_opts(sshd), "whoami"], env)
    assert r.returncode == 0 and r.stdout.strip() == "alice", r.stderr
    [alice_cert] = cached(env)
    assert "CERT" in agent_list(agent)

    r = run_cli(["login"], env, username="bob", ca_path=oidc.ca_path)
    assert r.returncode == 0 and "Signed in as bob@contoso.test" in r.stderr, r.stderr
    assert "removed 1 cached key and certificate of another account or server" in r.stderr, r.stderr
    assert cached(env) == [] and not Path(alice_cert["dir"]).exists()
    assert "CERT" not in agent_list(agent), "alice's certificate stayed in the agent after bob signed in"

    before = len(accepted(sshd, "alice"))
    r = run_cli(["ssh", "-e", "alice@127.0.0.1", *ssh_opts(sshd), "whoami"], env)
    assert r.returncode == 4, (r.stdout, r.stderr)  # bob may not log in as alice: the service refuses him
    assert "alice" not in r.stdout and len(accepted(sshd, "alice")) == before
    r = run_cli(["ssh", "bob@127.0.0.1", *ssh_opts(sshd), "whoami"], env)
    assert r.returncode == 0 and r.stdout.strip() == "bob", r.stderr
    [bob_cert] = cached(env)
    assert bob_cert["key_id"].endswith("/bob@contoso.test")

    r = run_cli(["logout"], env)
    assert r.returncode == 0 and cached(env) == []


def test_ttl_asked_is_honoured_with_a_certificate_cached(tmp_path, api_server, oidc, sshd):
    env = sign_in(cli_env(tmp_path / "home"), api_server, oidc, "alice")
    r = run_cli(["ssh", "alice@127.0.0.1", *ssh_opts(sshd), "true"], env)
    assert r.returncode == 0, r.stderr
    [first] = cached(env)  # the policy's default TTL (1 h)
    r = run_cli(["ssh", "-e", "--ttl", "30m", "alice@127.0.0.1", *ssh_opts(sshd), "true"], env)
    assert r.returncode == 0, r.stderr
    assert "new certificate" in r.stderr, r.stderr
    [second] = cached(env)
    assert second["serial"] != first["serial"]
    assert second["valid_before"] <= time.time() + 30 * 60 + 5
    r = run_cli(["ssh", "-e", "--ttl", "30m", "alice@127.0.0.1", *ssh_opts(sshd), "true"], env)
    assert r.returncode == 0 and "source:     cached certificate" in r.stderr, r.stderr


def test_a_new_server_is_followed_by_the_ssh_config_block(tmp_path, api_server, oidc, sshd):
    env = sign_in(cli_env(tmp_path / "home"), api_server, oidc, "alice")
    user_config = tmp_path / "ssh_config"
    r = run_cli(["config", "--ssh-config", str(user_config), "--host", "127.0.0.1"], env)
    assert r.returncode == 0, r.stderr
    assert f"Try: ssh -F {user_config} <login>@<host>" in r.stderr
    plain = ["ssh", "-F", str(user_config), *sshd.client_options(), *ssh_opts(sshd), "alice@127.0.0.1", "whoami"]
    done = subprocess.run(plain, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "alice", done.stderr

    # The same service under another address is another server to the CLI.
    other = api_server.replace("127.0.0.1", "localhost")
    r = run_cli(["configure", "--server", other, "--ca-bundle", str(oidc.ca_path)], env)
    assert r.returncode == 0, r.stderr
    assert cached(env) == []  # the certificate of the other server is gone
    rows = {row["check"]: row for row in json.loads(run_cli(["doctor", "--json"], env).stdout)}
    assert rows["ssh_config"]["status"] == "fail", rows["ssh_config"]
    assert api_server in rows["ssh_config"]["detail"] and other in rows["ssh_config"]["detail"]
    assert rows["ssh_config"]["fix"] == f"ezssh config --host 127.0.0.1 --ssh-config {user_config}"

    r = run_cli(["login"], env, username="alice", ca_path=oidc.ca_path)
    assert r.returncode == 0 and f"rewrote {tmp_path / 'home' / 'ssh_config'} for {other}" in r.stderr, r.stderr
    rows = {row["check"]: row for row in json.loads(run_cli(["doctor", "--json"], env).stdout)}
    assert rows["ssh_config"]["status"] == "ok", rows["ssh_config"]
    done = subprocess.run(plain, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "alice", done.stderr
    assert [c["server"] for c in cached(env)] == [other]


def test_agent_forwarding_works_on_the_demo_sshd(tmp_path, api_server, oidc, sshd, agent):
    """The demo policy's certificates permit agent forwarding: with --agent and -A, the remote session
    sees the forwarded agent holding the certificate."""
    env = sign_in({**cli_env(tmp_path / "home"), **agent}, api_server, oidc, "alice")
    r = run_cli(["ssh", "--agent", "alice@127.0.0.1", *ssh_opts(sshd), "-A", "ssh-add -l"], env)
    assert r.returncode == 0, r.stderr
    assert "ED25519-CERT" in r.stdout, (r.stdout, r.stderr)
    [cert] = cached(env)
    listing = subprocess.run(["ssh-keygen", "-L", "-f", str(Path(cert["dir"]) / "id_ed25519-cert.pub")],
                             capture_output=True, text=True, check=True).stdout
    assert "permit-agent-forwarding" in listing


def test_a_certificate_obtained_while_another_account_signed_in_is_not_kept(tmp_path, api_server, oidc, sshd,
                                                                          monkeypatch):
    """alice's `ezssh ssh` is on its way when bob signs in to the same EZSSH_HOME: her certificate is
    neither cached nor allowed to make alice the signed-in account again."""
    from ezssh import certs, issue
    from ezssh.context import Ctx
    from ezssh.errors import EzsshError
    from ezssh.home import load_config, save_config
    from ezssh.sshargs import SshInvocation

    sign_in(cli_env(tmp_path / "home"), api_server, oidc, "alice")
    home = tmp_path / "home"
    monkeypatch.setenv("EZSSH_HOME", str(home))
    ctx = Ctx()  # alice's, as her command read it when it started
    alice_account = ctx.cfg["account"]
    bob = oidc.user("bob")
    on_disk = load_config(home)
    save_config({**on_disk, "account": f"{bob['oid']}.{bob['tid']}"}, home)  # bob's login, meanwhile
    inv = SshInvocation(destination="alice@127.0.0.1", host="127.0.0.1", principal="alice")
    with pytest.raises(EzsshError, match="signed-in account changed"):
        issue.obtain(ctx.cfg, home, inv, ctx.api)
    assert list(certs.slots(home)) == []
    assert load_config(home)["account"] == f"{bob['oid']}.{bob['tid']}" != alice_account
