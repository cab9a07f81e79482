"""`ezssh config`'s pieces without the service: host patterns, the block as OpenSSH reads it (`ssh -G`
with the real parser), the Include added and removed byte for byte, `cert ensure` on a cached
certificate, `certs list|prune`, and start-up cost of `--version` and `cert ensure`."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ezssh import certs, sshconfig

from .conftest import cli_env, run_cli
from .test_ssh import SERVER, fake_ssh_out, fast_home, heavy, imported_modules, make_cached  # noqa: F401


@pytest.mark.parametrize("hosts, patterns, skipped", [
    (["web*", "localhost", "DB-1"], ["web*", "localhost", "db-1"], []),
    (["127.0.0.0/8", "10.1.0.0/16", "192.168.1.0/24", "10.0.0.4/32"], ["127.*", "10.1.*", "192.168.1.*", "10.0.0.4"], []),
    (["10.2.0.0/23"], ["10.2.0.*", "10.2.1.*"], []),
    (["tag:env=prod", "/subscriptions/x/resourceGroups/rg", "fd00::/8", "10.0.0.0/1"], [],
     ["tag:env=prod", "/subscriptions/x/resourceGroups/rg", "fd00::/8", "10.0.0.0/1"]),
])
def test_host_patterns(hosts, patterns, skipped):
    assert sshconfig.host_patterns(hosts) == (patterns, skipped)


def test_install_and_uninstall_are_exact(tmp_path):
    cfg = tmp_path / "config"
    original = b"Host a\n  User x\n# no newline at the end"
    cfg.write_bytes(original)
    cfg.chmod(0o604)
    owned = tmp_path / "ezssh home" / "ssh_config"
    assert sshconfig.install(cfg, owned) == (True, False)
    text = cfg.read_bytes()
    assert text.endswith(original) and b'Include "' in text  # quoted: the path has a space
    assert sshconfig.install(cfg, owned) == (False, False) and cfg.read_bytes() == text
    assert cfg.stat().st_mode & 0o777 == 0o604
    assert sshconfig.uninstall(cfg, owned, created=False)
    assert cfg.read_bytes() == original
    assert not sshconfig.uninstall(cfg, owned, created=False)
    missing = tmp_path / "new" / "config"
    assert sshconfig.install(missing, owned) == (True, True)
    assert missing.stat().st_mode & 0o777 == 0o600
    assert sshconfig.uninstall(missing, owned, created=True) and not missing.exists()


def ssh_g(config: Path, dest: str, **env: str) -> dict:
    r = subprocess.run(["ssh", "-G", "-F", str(config), dest], capture_output=True, text=True,
                       env={"PATH": "/usr/bin:/bin", **env}, timeout=30)
    assert r.returncode == 0, r.stderr
    out: dict = {}
    for line in r.stdout.splitlines():
        k, _, v = line.partition(" ")
        out.setdefault(k, []).append(v)
    return out


def test_openssh_applies_the_block_after_aliases(tmp_path):
    """The real ssh parser: the block matches the alias's HostName, runs `cert ensure` with the final
    login and host, and offers that slot's key and certificate; other hosts are left alone."""
    home = tmp_path / "ez"
    slot_root = home / "certs" / "abc"
    log = tmp_path / "ensure.log"
    ensure = tmp_path / "fake-ezssh"
    ensure.write_text(f"#!/bin/sh\necho \"$EZSSH_HOME $*\" >> {log}\nexit 0\n")
    ensure.chmod(0o755)
    owned = tmp_path / "ssh_config.ezssh"
    owned.write_text(sshconfig.render_block(home=home, slot_root=slot_root, patterns=["10.9.*", "web*"],
                                            command=[str(ensure)], server=SERVER))
    cfg = tmp_path / "config"
    cfg.write_text("Host box\n    HostName 10.9.8.7\n    User deploy\n    Port 2200\n")
    sshconfig.install(cfg, owned)
    got = ssh_g(cfg, "box")
    assert got["hostname"] == ["10.9.8.7"] and got["user"] == ["deploy"]
    # (ssh -G prints them before expanding %r and %h; ssh expands them to the login and host above)
    assert got["identityfile"] == [f"{slot_root}/%r@%h/id_ed25519"]
    assert got["certificatefile"] == [f"{slot_root}/%r@%h/id_ed25519-cert.pub"]
    assert got["userknownhostsfile"][0].split()[-1] == str(home / "known_hosts")
    assert log.read_text().splitlines() == [f"{home} cert ensure deploy@10.9.8.7 -p 2200"]
    # a host the patterns do not name: no exec, no certificate
    other = ssh_g(cfg, "elsewhere.example")
    assert "certificatefile" not in other and log.read_text().count("\n") == 1
    # under `ezssh ssh` (EZSSH_IN_SSH=1) the certificate is given already: no second exec
    ssh_g(cfg, "box", EZSSH_IN_SSH="1")
    assert log.read_text().count("\n") == 1
    # a cached certificate (its reuse-until time ahead): sh answers without starting ezssh
    slot = slot_root / "deploy@10.9.8.7"
    slot.mkdir(parents=True)
    (slot / certs.EXPIRES).write_text(f"{int(time.time()) + 600}\n")
    assert "certificatefile" in ssh_g(cfg, "box") and log.read_text().count("\n") == 1
    (slot / certs.EXPIRES).write_text(f"{int(time.time()) - 1}\n")  # past: ezssh runs again
    ssh_g(cfg, "box")
    assert log.read_text().count("\n") == 2
    (slot / certs.EXPIRES).unlink()
    # a name with a character a shell reads specially never reaches the exec line (more in
    # test_no_name_with_a_shell_special_character_reaches_a_shell)
    marker = tmp_path / "ran"
    cfg.write_text(f"Host odd\n    HostName web$(touch${{IFS}}{marker})\n    User deploy\n"
                   f"Host quote\n    HostName \"web'x\"\n")
    sshconfig.install(cfg, owned)
    lines = log.read_text().count("\n")
    assert "certificatefile" not in ssh_g(cfg, "odd") and not marker.exists()
    assert "certificatefile" not in ssh_g(cfg, "quote") and log.read_text().count("\n") == lines  # left out
    cfg.write_text("Host box\n    HostName 10.9.8.7\n    User deploy\n    Port 2200\n")
    sshconfig.install(cfg, owned)
    # a failing ensure: the block does not apply
    ensure.write_text("#!/bin/sh\nexit 1\n")
    assert "certificatefile" not in ssh_g(cfg, "box")


def _hostile_names(marker: Path) -> list[str]:
    """Names that would run `touch MARKER` if a shell read them unquoted or broke out of the single
    quotes around %r@%h: one per shell-special character."""
    m = str(marker)
    return [f"web'$(touch {m})'", f"web'`touch {m}`'", f"web';touch {m};'", f"web\\'$(touch {m})\\'",
            f"web$(touch {m})", f"web`touch {m}`", f"web;touch {m}", f"web|touch {m}", f"web&touch {m}&",
            f"web>{m}", f"web<{m}", f"web'{{touch,{m}}}'", f"web!touch {m}", f"web%touch {m}", f"web~ {m}",
            f"web#{m}", f"web^{m}", f"web(touch {m})"]


def test_no_name_with_a_shell_special_character_reaches_a_shell(tmp_path):
    """The installed OpenSSH, every way a name reaches the Match block: `ssh -G` with a config
    `HostName` and `User` line, `-o HostName=` and `-o User=`, and git over ssh. A name with a
    shell-special character leaves the block out (no exec, no certificate): nothing runs, on any
    shell, and ezssh is not even started."""
    home = tmp_path / "ez"
    log = tmp_path / "ensure.log"
    ensure = tmp_path / "fake-ezssh"
    ensure.write_text(f"#!/bin/sh\necho \"$*\" >> {log}\nexit 0\n")
    ensure.chmod(0o755)
    owned = tmp_path / "ssh_config.ezssh"
    owned.write_text(sshconfig.render_block(home=home, slot_root=home / "certs" / "abc", patterns=["web*"],
                                            command=[str(ensure)], server=SERVER))
    marker = tmp_path / "pwned"
    cfg = tmp_path / "config"
    names = _hostile_names(marker)

    def config(name: str, field: str = "HostName") -> None:
        quoted = name.replace('"', "")  # a config value in double quotes holds the rest literally
        other = "User deploy" if field == "HostName" else "HostName web1"
        cfg.write_text(f'Host target\n    {field} "{quoted}"\n    {other}\n')
        sshconfig.install(cfg, owned)

    for name in names:
        for field in ("HostName", "User"):
            config(name, field)
            subprocess.run(["ssh", "-G", "-F", str(cfg), "target"], capture_output=True, timeout=30,
                           env={"PATH": "/usr/bin:/bin"})
            config("web1")
            subprocess.run(["ssh", "-G", "-F", str(cfg), "-o", f'{field}="{name}"', "target"],
                           capture_output=True, timeout=30, env={"PATH": "/usr/bin:/bin"})
        assert not marker.exists(), name
    # git runs ssh with the alias; the alias's HostName holds the hostile name
    config(names[0])
    subprocess.run(["git", "ls-remote", "target:repo.git"], capture_output=True, timeout=60, cwd=tmp_path,
                   env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path),
                        "GIT_SSH_COMMAND": f"ssh -F {cfg} -o BatchMode=yes -o ConnectTimeout=2"})
    assert not marker.exists()
    assert not log.exists() or "touch" not in log.read_text()  # ezssh never saw a hostile name
    # and an ordinary name still gets its certificate: the block is not simply off
    config("web1")
    assert "certificatefile" in ssh_g(cfg, "target") and "cert ensure deploy@web1 -p 22" in log.read_text()


@pytest.fixture()
def home(fast_home):
    return fast_home[0]


def test_cert_ensure_uses_the_cache_and_stays_light(home):
    make_cached(home, "alice", "web1", int(time.time()) + 600)
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "ezssh", "cert", "ensure", "alice@web1", "-p", "22"],
                       env=cli_env(home), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    mods = imported_modules(r.stderr)
    assert heavy(mods) == set() and "argparse" not in mods
    # no cached certificate and no sign-in: it fails (exit 3), saying why
    r = run_cli(home, "cert", "ensure", "alice@web2")
    assert r.returncode == 3 and "ezssh login" in r.stderr
    r = run_cli(home, "cert", "ensure", "web2")
    assert r.returncode == 2 and "login@host" in r.stderr


def test_version_builds_no_parser(tmp_path):
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "ezssh", "--version"],
                       env=cli_env(tmp_path / "h"), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.startswith("ezssh ")
    assert "argparse" not in imported_modules(r.stderr)


def test_certs_list_and_prune(home):
    now = int(time.time())
    make_cached(home, "alice", "web1", now + 600)
    make_cached(home, "bob", "web2", now - 5)
    r = run_cli(home, "certs", "list", "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert [(x["login"], x["host"], x["expired"]) for x in rows] == [("alice", "web1", False), ("bob", "web2", True)]
    r = run_cli(home, "certs", "list")
    assert "alice@web1" in r.stdout and "SERIAL" in r.stdout
    r = run_cli(home, "certs", "prune")
    assert r.returncode == 0 and "Removed 1 expired" in r.stderr
    assert [d.name for d in certs.slots(home)] == ["alice@web1"]
    r = run_cli(home, "cert", "prune", "--all")
    assert r.returncode == 0 and list(certs.slots(home)) == []


def test_ezssh_ssh_takes_durations(home, tmp_path):
    from ezssh import sshargs

    assert sshargs.parse(["--ttl", "30m", "h"], local_user="me").ttl == 1800
    assert sshargs.parse(["--ttl=1h", "h"], local_user="me").ttl == 3600
    r = run_cli(home, "ssh", "--ttl", "10x", "h")
    assert r.returncode == 2 and "not a duration" in r.stderr


def test_ezssh_ssh_asks_for_the_host_and_login_ssh_resolves(home, tmp_path):
    """An alias in the ssh_config: the cached slot of its HostName and User is used."""
    c = make_cached(home, "deploy", "10.9.8.7", int(time.time()) + 600)
    cfg = tmp_path / "config"
    cfg.write_text("Host box\n    HostName 10.9.8.7\n    User deploy\n")
    r = run_cli(home, "ssh", "-e", "box", "uptime", EZSSH_SSH=f"ssh -F {cfg} -G")
    assert r.returncode == 0, r.stderr
    assert f"identityfile {c.key}" in r.stdout and "hostname 10.9.8.7" in r.stdout
    assert "host:       10.9.8.7 (from box)" in r.stderr and "principal:  deploy" in r.stderr


def test_agent_mode_leaves_the_agent_reachable(home, tmp_path):
    """Agent mode: ssh-add -t gets the key and certificate for their time left; ssh may use the agent."""
    c = make_cached(home, "alice", "127.0.0.1", int(time.time()) + 600)
    agent = subprocess.run(["ssh-agent", "-s"], capture_output=True, text=True, check=True).stdout
    env = dict(line.split(";")[0].split("=", 1) for line in agent.splitlines() if line.startswith("SSH_"))
    try:
        fake = tmp_path / "fake-ssh"
        fake.write_text("#!" + sys.executable + "\nimport json,sys\nprint('FAKE-SSH ' + json.dumps({'argv': sys.argv[1:]}))\n")
        fake.chmod(0o755)
        r = run_cli(home, "ssh", "--agent", "alice@127.0.0.1", "true", EZSSH_SSH=str(fake), **env)
        assert r.returncode == 0, r.stderr
        argv = fake_ssh_out(r.stdout)["argv"]
        assert "IdentityAgent=none" not in argv
        listed = subprocess.run(["ssh-add", "-l"], env={**env, "PATH": "/usr/bin:/bin"}, capture_output=True,
                                text=True).stdout
        keygen = subprocess.run(["ssh-keygen", "-l", "-f", str(c.cert)], capture_output=True, text=True).stdout
        fingerprint = keygen.split()[1]
        assert listed.count(fingerprint) == 2, listed  # the key and its certificate
        assert "CERT" in listed
        assert json.loads((c.dir / "meta.json").read_text())["agent_sock"] == env["SSH_AUTH_SOCK"]
        # prune --all takes them out of the agent too, from a shell with no agent of its own
        r = run_cli(home, "certs", "prune", "--all")
        assert r.returncode == 0 and "from ssh-agent too" in r.stderr, r.stderr
        listed = subprocess.run(["ssh-add", "-l"], env={**env, "PATH": "/usr/bin:/bin"}, capture_output=True,
                                text=True).stdout
        assert fingerprint not in listed, listed
    finally:
        subprocess.run(["ssh-agent", "-k"], env={**env, "PATH": "/usr/bin:/bin"}, capture_output=True)


@pytest.mark.parametrize("how", [["logout"], ["certs", "prune", "--all"]])
def test_signing_out_and_pruning_empty_the_agent_they_were_added_to(home, tmp_path, how):
    """Two slots in an agent; the command runs without SSH_AUTH_SOCK and still empties that agent."""
    agent = subprocess.run(["ssh-agent", "-s"], capture_output=True, text=True, check=True).stdout
    env = dict(line.split(";")[0].split("=", 1) for line in agent.splitlines() if line.startswith("SSH_"))
    plain = {**env, "PATH": "/usr/bin:/bin"}
    try:
        for login in ("alice", "bob"):
            c = make_cached(home, login, "127.0.0.1", int(time.time()) + 600)
            r = run_cli(home, "cert", "ensure", "--agent", f"{login}@127.0.0.1", **env)
            assert r.returncode == 0, r.stderr
        before = subprocess.run(["ssh-add", "-l"], env=plain, capture_output=True, text=True).stdout
        assert before.count("CERT") == 2, before
        r = run_cli(home, *how, EZSSH_PLAINTEXT_TOKEN_CACHE="1")
        assert r.returncode == 0 and re.search(r"[Rr]emoved (all )?2 cached", r.stderr) and "ssh-agent" in r.stderr, r.stderr
        after = subprocess.run(["ssh-add", "-l"], env=plain, capture_output=True, text=True)
        assert after.returncode == 1 and "no identities" in after.stdout, after.stdout
        assert list(certs.slots(home)) == [] and not c.dir.exists()
    finally:
        subprocess.run(["ssh-agent", "-k"], env=plain, capture_output=True)
