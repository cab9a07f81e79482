"""End to end: `ezssh config` in a temporary HOME, then plain OpenSSH clients (ssh, scp, sftp,
rsync -e ssh, git over ssh) log in to the real test sshd as alice with certificates ezssh issued,
through an ~/.ssh/config alias (HostName, Port, User). `ezssh config --remove` restores the file
byte for byte, after which the same ssh is refused (so it was ezssh's block that let it in)."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.e2e.signin import sign_in
from devstack.demo import cli_env, run_cli

pytestmark = pytest.mark.skipif(shutil.which("rsync") is None and os.environ.get("CI") != "true",
                                reason="rsync is not installed (Debian package rsync; scripts/setup.sh)")


@pytest.fixture(scope="module")
def user(tmp_path_factory, api_server, sshd, oidc):
    """alice's HOME with her own ~/.ssh/config (an alias for the test sshd), signed in to ezssh."""
    home = tmp_path_factory.mktemp("plain-ssh-home")
    env = cli_env(home / ".ezssh", HOME=str(home))
    env.pop("SSH_AUTH_SOCK", None)
    sign_in(env, api_server, oidc, "alice")
    ssh_dir = home / ".ssh"
    ssh_dir.mkdir(mode=0o700)
    host_key = (sshd.dir / "ssh_host_ed25519_key.pub").read_text().split()
    known = ssh_dir / "known_hosts"
    known.write_text(f"[127.0.0.1]:{sshd.port} {host_key[0]} {host_key[1]}\n")
    config = ssh_dir / "config"
    original = (f"# my own settings\nHost e2e-box\n    HostName 127.0.0.1\n    Port {sshd.port}\n    User alice\n\n"
                f"Host *\n    BatchMode yes\n    StrictHostKeyChecking yes\n    UserKnownHostsFile {known}\n"
                f"    LogLevel ERROR\n").encode()
    config.write_bytes(original)
    config.chmod(0o640)
    return {"home": home, "env": env, "config": config, "original": original}


def plain(user, *argv: str, cwd: Path | None = None, **extra: str) -> subprocess.CompletedProcess:
    env = {**user["env"], **extra}
    return subprocess.run(list(argv), env=env, cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=120)


def test_plain_openssh_clients_use_ezssh_certificates(user, sshd, tmp_path):
    cfg, ssh_f = user["config"], ["-F", str(user["config"])]
    r = run_cli(["config"], user["env"])
    assert r.returncode == 0, r.stderr
    written = cfg.read_bytes()
    assert written.endswith(user["original"]) and written != user["original"]
    assert cfg.stat().st_mode & 0o777 == 0o640  # the file keeps its mode
    assert run_cli(["config"], user["env"]).returncode == 0
    assert cfg.read_bytes() == written  # idempotent: one Include, however often it runs

    # ssh through the alias: the certificate is for the HostName (127.0.0.1) and the alias's User
    r = plain(user, "ssh", *ssh_f, "e2e-box", "whoami")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "alice"
    listed = json.loads(run_cli(["certs", "list", "--json"], user["env"]).stdout)
    assert [(c["login"], c["host"], c["policy"]) for c in listed] == [("alice", "127.0.0.1", "demo")]
    serial = listed[0]["serial"]
    assert f"(serial {serial})" in sshd.log_text()

    alice = pwd.getpwnam("alice")
    # scp both ways
    src = tmp_path / "hello.txt"
    src.write_text("hello from scp\n")
    name = f"ezssh-e2e-{os.getpid()}"
    r = plain(user, "scp", *ssh_f, str(src), f"e2e-box:{name}.txt")
    assert r.returncode == 0, r.stderr
    assert Path(alice.pw_dir, f"{name}.txt").read_text() == "hello from scp\n"
    r = plain(user, "scp", *ssh_f, f"e2e-box:{name}.txt", str(tmp_path / "back.txt"))
    assert r.returncode == 0 and (tmp_path / "back.txt").read_text() == "hello from scp\n", r.stderr

    # sftp (the sshd's sftp subsystem)
    batch = tmp_path / "sftp.batch"
    batch.write_text(f"put {src} {name}-sftp.txt\nls {name}-sftp.txt\n")
    r = plain(user, "sftp", *ssh_f, "-b", str(batch), "e2e-box")
    assert r.returncode == 0, r.stderr
    assert Path(alice.pw_dir, f"{name}-sftp.txt").read_text() == "hello from scp\n"

    # rsync -e ssh
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "a.txt").write_text("rsync a\n")
    (tree / "b.txt").write_text("rsync b\n")
    r = plain(user, "rsync", "-a", "-e", f"ssh -F {cfg}", f"{tree}/", f"e2e-box:{name}-rsync/")
    assert r.returncode == 0, r.stderr
    assert Path(alice.pw_dir, f"{name}-rsync", "sub", "a.txt").read_text() == "rsync a\n"

    # git over ssh: clone alice's bare repository, commit, push
    repo = Path(alice.pw_dir, f"{name}.git")
    subprocess.run(["git", "init", "-q", "--bare", str(repo)], check=True)
    subprocess.run(["chown", "-R", "alice:", str(repo)], check=True)
    git_env = {"GIT_SSH_COMMAND": f"ssh -F {cfg}", "GIT_AUTHOR_NAME": "a", "GIT_AUTHOR_EMAIL": "a@x",
               "GIT_COMMITTER_NAME": "a", "GIT_COMMITTER_EMAIL": "a@x"}
    r = plain(user, "git", "clone", "-q", f"e2e-box:{repo}", str(tmp_path / "clone"), **git_env)
    assert r.returncode == 0, r.stderr
    (tmp_path / "clone" / "README").write_text("pushed over ssh\n")
    for argv in (["add", "README"], ["commit", "-qm", "first"], ["push", "-q", "origin", "HEAD"]):
        r = plain(user, "git", *argv, cwd=tmp_path / "clone", **git_env)
        assert r.returncode == 0, (argv, r.stderr)
    log = subprocess.run(["git", "--git-dir", str(repo), "log", "--format=%s"], capture_output=True, text=True,
                         env={**os.environ, "GIT_CONFIG_COUNT": "1", "GIT_CONFIG_KEY_0": "safe.directory",
                              "GIT_CONFIG_VALUE_0": "*"})
    assert log.stdout.strip() == "first", log.stderr

    # one certificate served all of them
    listed = json.loads(run_cli(["certs", "list", "--json"], user["env"]).stdout)
    assert [c["serial"] for c in listed] == [serial]

    # --remove: the file is byte for byte what it was, and ssh no longer gets in
    r = run_cli(["config", "--remove"], user["env"])
    assert r.returncode == 0, r.stderr
    assert cfg.read_bytes() == user["original"]
    assert not (user["home"] / ".ezssh" / "ssh_config").exists()
    r = plain(user, "ssh", *ssh_f, "e2e-box", "true")
    assert r.returncode == 255 and "Permission denied" in r.stderr


def test_ezssh_ssh_resolves_an_alias_like_ssh(user, sshd):
    """`ezssh ssh ALIAS`: the certificate is for the alias's HostName and User, as ssh -G says."""
    r = run_cli(["ssh", "-e", "-F", str(user["config"]), "e2e-box", "whoami"], user["env"])
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "alice"
    assert "host:       127.0.0.1 (from e2e-box)" in r.stderr and "principal:  alice" in r.stderr


def test_config_then_remove_without_a_file_leaves_none(user, tmp_path):
    target = tmp_path / "fresh" / "config"
    r = run_cli(["config", "--ssh-config", str(target)], user["env"])
    assert r.returncode == 0, r.stderr
    assert "Include" in target.read_text()
    r = run_cli(["config", "--remove"], user["env"])
    assert r.returncode == 0, r.stderr
    assert not target.exists()
