"""`ezssh ssh` without the API service: argument splitting, the certificate cache (reuse, expiry sweep,
file modes), the ssh command line (checked by the real `ssh -G`), exit-code propagation and the
lazy imports of the cached fast path."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ezssh import certs, keys, sshargs
from ezssh.errors import EzsshError
from ezssh.home import save_config

from .conftest import cli_env, run_cli

SERVER = "https://ezssh.test"
ACCOUNT = "00000000-0000-4000-8000-0000000a11ce.11111111-1111-4111-8111-111111111111"  # <oid>.<tid>
OTHER = "00000000-0000-4000-8000-000000000b0b.11111111-1111-4111-8111-111111111111"
HEAVY = ("msal", "msal_extensions", "requests", "urllib3", "cryptography")


# ---- argument splitting ---------------------------------------------------------------------------


def parse(*argv: str) -> sshargs.SshInvocation:
    inv = sshargs.parse(list(argv), local_user="localme")
    assert inv is not None
    return inv


def test_user_at_host_and_options_after_host_go_verbatim():
    inv = parse("alice@127.0.0.1", "-p", "2222", "whoami", "-l", "x")
    assert (inv.principal, inv.host, inv.destination) == ("alice", "127.0.0.1", "alice@127.0.0.1")
    assert inv.ssh_args == ["-p", "2222", "whoami", "-l", "x"]
    assert inv.pre_args == [] and not inv.explain


def test_ezssh_options_before_host():
    inv = parse("-e", "--policy", "web", "--ttl=600", "--reason", "deploy 42", "--new", "web1", "uptime")
    assert (inv.explain, inv.policy, inv.ttl, inv.reason, inv.new) == (True, "web", 600, "deploy 42", True)
    assert (inv.principal, inv.host, inv.ssh_args) == ("localme", "web1", ["uptime"])
    # -e after the host belongs to ssh (its escape character option)
    inv = parse("web1", "-e", "none")
    assert not inv.explain and inv.ssh_args == ["-e", "none"]


@pytest.mark.parametrize("argv, principal", [
    (["web1", "-l", "bob"], "bob"),
    (["web1", "-lbob", "-p", "22"], "bob"),
    (["web1", "-vl", "bob"], "bob"),
    (["web1", "-o", "User=carol"], "carol"),
    (["web1", "-oUser carol"], "carol"),
    (["web1", "-p", "22", "id", "-l", "notme"], "localme"),  # -l after the remote command is the command's
    (["web1", "--", "-l", "notme"], "localme"),
    (["alice@web1", "-l", "bob"], "alice"),  # ssh: the first one given wins
    (["-l", "bob", "alice@web1"], "bob"),
    (["-p", "2222", "web1"], "localme"),
    (["web1"], "localme"),
    (["a@b@web1"], "a@b"),
])
def test_principal(argv, principal):
    assert parse(*argv).principal == principal


def test_ssh_options_before_host_are_kept_in_order():
    inv = parse("-p", "2222", "-4", "-oStrictHostKeyChecking=no", "alice@h", "ls")
    assert inv.pre_args == ["-p", "2222", "-4", "-oStrictHostKeyChecking=no"]
    assert inv.ssh_args == ["ls"]


@pytest.mark.parametrize("argv", [[], ["-e"], ["--ttl", "x", "h"], ["--ttl", "0", "h"], ["--bogus", "h"],
                                  ["-Z", "h"], ["@h"], ["alice@"], ["-p"], ["--policy"]])
def test_usage_errors(argv):
    with pytest.raises(EzsshError) as ei:
        sshargs.parse(argv, local_user="me")
    assert ei.value.code == 2


def test_help():
    assert sshargs.parse(["--help"]) is None
    assert sshargs.parse(["-h"]) is None


def test_ssh_argv(monkeypatch):
    monkeypatch.delenv("EZSSH_SSH", raising=False)
    inv = parse("-4", "alice@127.0.0.1", "-p", "2222", "whoami")
    assert sshargs.ssh_argv(inv, "/k", "/c") == [
        "ssh", "-i", "/k", "-o", "CertificateFile=/c", "-o", "IdentitiesOnly=yes", "-o", "IdentityAgent=none",
        "-4", "alice@127.0.0.1", "-p", "2222", "whoami"]
    monkeypatch.setenv("EZSSH_SSH", "/opt/ssh -F '/my config'")
    assert sshargs.ssh_argv(inv, "/k", "/c")[:3] == ["/opt/ssh", "-F", "/my config"]


# ---- keys, certificates, the cache ----------------------------------------------------------------


CA = ec.generate_private_key(ec.SECP256R1())


def sign_cert(public_line: str, principals: list[str], valid_before: int, serial: int = 4242,
              key_id: str = "ezssh/web/req1/alice@contoso.test") -> str:
    pub = serialization.load_ssh_public_key(" ".join(public_line.split()[:2]).encode())
    cert = (serialization.SSHCertificateBuilder()
            .public_key(pub).serial(serial).type(serialization.SSHCertificateType.USER).key_id(key_id.encode())
            .valid_principals([p.encode() for p in principals])
            .valid_after(min(int(time.time()) - 60, valid_before - 60)).valid_before(valid_before)
            .add_extension(b"permit-pty", b"")
            .sign(CA))
    return cert.public_bytes().decode()


def make_cached(home: Path, principal: str, host: str, valid_before: int, *, server: str = SERVER,
                policy: str = "web", account: str = ACCOUNT) -> certs.Cached:
    private, public = keys.new_keypair()
    cert = sign_cert(public, [principal], valid_before)
    meta = {**keys.inspect_certificate(cert, public, principal), "policy": policy, "request_id": "req1",
            "host": host, "principal": principal, "server": server, "account": account}
    return certs.store(home, principal, host, private, public, cert, meta)


def test_store_layout_and_modes(tmp_path):
    home = tmp_path / "h"
    home.mkdir(mode=0o700)
    c = make_cached(home, "alice", "127.0.0.1", int(time.time()) + 600)
    assert c.dir == home / "certs" / "alice@127.0.0.1"  # no server, no account: ssh_config's block names it
    assert sorted(p.name for p in c.dir.iterdir()) == ["id_ed25519", "id_ed25519-cert.pub", "id_ed25519.pub", "meta.json",
                                                       "reuse-until"]
    assert int((c.dir / "reuse-until").read_text()) == c.valid_before - certs.REUSE_MARGIN
    assert stat.S_IMODE(c.key.stat().st_mode) == 0o600
    assert stat.S_IMODE(c.dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((home / "certs").stat().st_mode) == 0o700
    meta = json.loads((c.dir / "meta.json").read_text())
    assert meta["serial"] == "4242" and meta["key_id"] == "ezssh/web/req1/alice@contoso.test"
    assert meta["policy"] == "web" and meta["principals"] == ["alice"]
    # OpenSSH reads the key file and the certificate
    pub = subprocess.run(["ssh-keygen", "-y", "-f", str(c.key)], capture_output=True, text=True, check=True).stdout
    assert pub.split()[:2] == (c.dir / "id_ed25519.pub").read_text().split()[:2]
    listing = subprocess.run(["ssh-keygen", "-L", "-f", str(c.cert)], capture_output=True, text=True, check=True).stdout
    assert "Serial: 4242" in listing and "alice" in listing
    # a new certificate replaces the slot with a new key
    c2 = make_cached(home, "alice", "127.0.0.1", int(time.time()) + 600)
    assert c2.dir == c.dir and (c2.dir / "id_ed25519.pub").read_text() != pub
    assert [p.name for p in c.dir.parent.iterdir()] == ["alice@127.0.0.1"]


def test_inspect_certificate_refuses_foreign_key_and_wrong_principal():
    _, mine = keys.new_keypair()
    _, other = keys.new_keypair()
    good = sign_cert(mine, ["alice"], int(time.time()) + 60)
    assert keys.inspect_certificate(good, mine, "alice")["principals"] == ["alice"]
    with pytest.raises(EzsshError, match="not for the key"):
        keys.inspect_certificate(sign_cert(other, ["alice"], int(time.time()) + 60), mine, "alice")
    with pytest.raises(EzsshError, match="does not name the login"):
        keys.inspect_certificate(good, mine, "root")
    with pytest.raises(EzsshError, match="plain public key"):
        keys.inspect_certificate(mine, mine, "alice")


def find(home, principal="alice", host="web1", **kw):
    kw.setdefault("server", SERVER)
    kw.setdefault("account", ACCOUNT)
    return certs.find_valid(home, principal, host, **kw)


def test_reuse_window_and_policy(tmp_path):
    home = tmp_path
    now = time.time()
    make_cached(home, "alice", "web1", int(now) + 100)
    assert find(home, now=now) is not None
    assert find(home, now=now + 69) is not None
    assert find(home, now=now + 71) is None  # within 30 s of expiry
    assert find(home, policy="web", now=now) is not None
    assert find(home, policy="other", now=now) is None
    assert find(home, "bob", now=now) is None
    assert find(home, server="https://other.test", now=now) is None
    # a private key that others can read is never handed to ssh
    c = find(home, now=now)
    os.chmod(c.key, 0o644)
    assert find(home, now=now) is None


def test_a_certificate_serves_only_the_account_that_got_it(tmp_path):
    home = tmp_path
    now = time.time()
    c = make_cached(home, "alice", "web1", int(now) + 3600)
    assert find(home, now=now) is not None
    assert find(home, account=OTHER, now=now) is None
    assert find(home, account=None, now=now) is None  # not signed in: nothing is anyone's
    # a slot whose meta names another login or host than its directory is not used for this one
    meta = json.loads((c.dir / "meta.json").read_text())
    (c.dir / "meta.json").write_text(json.dumps({**meta, "principal": "root"}))
    assert find(home, now=now) is None


def test_a_cached_certificate_is_used_only_within_the_ttl_asked(tmp_path):
    home = tmp_path
    now = time.time()
    make_cached(home, "alice", "web1", int(now) + 59 * 60)
    assert find(home, now=now) is not None  # nothing asked: any time left will do
    assert find(home, ttl=30 * 60, now=now) is None  # would outlive the 30 minutes asked
    assert find(home, ttl=60 * 60, now=now) is not None
    assert find(home, ttl=8 * 3600, now=now) is None  # far shorter than the 8 hours asked
    assert find(home, ttl=59 * 60, now=now + 20 * 60) is not None  # 39 of 59 minutes left


def test_forget_others_keeps_only_this_account_on_this_server(tmp_path):
    home = tmp_path
    now = int(time.time())
    mine = make_cached(home, "alice", "web1", now + 600)
    theirs = make_cached(home, "bob", "web1", now + 600, account=OTHER)
    elsewhere = make_cached(home, "alice", "web2", now + 600, server="https://other.test")
    assert certs.forget_others(home, SERVER + "/", ACCOUNT) == 2
    assert mine.dir.exists() and not theirs.dir.exists() and not elsewhere.dir.exists()
    assert certs.forget_others(home, SERVER, None) == 1 and not mine.dir.exists()


def test_sweep_removes_expired_everywhere_and_keeps_valid(tmp_path):
    home = tmp_path
    now = int(time.time())
    keep = make_cached(home, "alice", "web1", now + 600)
    gone1 = make_cached(home, "alice", "web2", now - 1)
    gone2 = make_cached(home, "root", "db", now - 5000, server="https://other.test")
    debris = home / "certs" / ".new-1-2"
    debris.mkdir()
    os.utime(debris, (now - 3600, now - 3600))
    fresh_partial = home / "certs" / ".new-3-4"
    fresh_partial.mkdir()
    legacy = home / "certs" / "0123456789ab" / "alice@web1"  # the earlier per-server layout
    legacy.mkdir(parents=True)
    removed = certs.sweep(home)
    assert set(removed) == {gone1.dir, gone2.dir, debris, legacy.parent}
    assert keep.dir.exists() and fresh_partial.exists()
    assert not certs.remove_if_expired(keep.dir)
    assert certs.remove_if_expired(keep.dir, now=now + 601) and not keep.dir.exists()


def test_slot_names_are_safe(tmp_path):
    d = certs.slot_dir(tmp_path, "../x", "a/b")
    assert d.parent == tmp_path / "certs"
    assert "/" not in d.name and not d.name.startswith(".")


# ---- the CLI fast path: a cached certificate and a stand-in ssh program ----------------------------


FAKE_SSH = textwrap.dedent("""\
    #!{python}
    import json, os, signal, sys
    out = {{"argv": sys.argv[1:], "sigint_ignored": signal.getsignal(signal.SIGINT) is signal.SIG_IGN}}
    print("FAKE-SSH " + json.dumps(out), flush=True)
    sys.exit(int(os.environ.get("FAKE_SSH_RC", "0")))
    """)


@pytest.fixture()
def fast_home(tmp_path):
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    save_config({"server": SERVER, "authority": "https://127.0.0.1:1/none", "authority_type": "oidc",
                 "client_id": "x", "scopes": ["api://ezssh/access_as_user"], "account": ACCOUNT}, home)
    fake = tmp_path / "fake-ssh"
    fake.write_text(FAKE_SSH.format(python=sys.executable))
    fake.chmod(0o755)
    return home, fake


def fake_ssh_out(stdout: str) -> dict:
    [line] = [l for l in stdout.splitlines() if l.startswith("FAKE-SSH ")]
    return json.loads(line[len("FAKE-SSH "):])


def test_cached_path_runs_ssh_with_exact_argv_and_exit_code(fast_home):
    home, fake = fast_home
    c = make_cached(home, "alice", "127.0.0.1", int(time.time()) + 600)
    expired = make_cached(home, "alice", "old", int(time.time()) - 10)
    r = run_cli(home, "ssh", "-e", "alice@127.0.0.1", "-p", "2222", "whoami", EZSSH_SSH=str(fake), FAKE_SSH_RC="42")
    assert r.returncode == 42, r.stderr
    got = fake_ssh_out(r.stdout)
    assert got["argv"] == ["-i", str(c.key), "-o", f"CertificateFile={c.cert}", "-o", "IdentitiesOnly=yes",
                           "-o", "IdentityAgent=none", "alice@127.0.0.1", "-p", "2222", "whoami"]
    assert got["sigint_ignored"] is False  # ssh must be able to handle Ctrl-C itself
    # --explain on stderr: policy, principal, key id, serial, validity, command line
    for text in ("policy:     web", "principal:  alice", "key id:     ezssh/web/req1/alice@contoso.test",
                 "serial:     4242", "valid:", "cached certificate", f"command:    {fake} -i {c.key}"):
        assert text in r.stderr, (text, r.stderr)
    assert not expired.dir.exists()  # swept
    assert c.dir.exists()


def test_ssh_program_not_found(fast_home):
    home, _ = fast_home
    make_cached(home, "alice", "h", int(time.time()) + 600)
    r = run_cli(home, "ssh", "alice@h", EZSSH_SSH="/nonexistent/ssh")
    assert r.returncode == 1 and "not found" in r.stderr


def test_argv_accepted_by_real_openssh(fast_home):
    """`ssh -G` parses the full command line and prints the effective options without connecting."""
    home, _ = fast_home
    c = make_cached(home, "alice", "127.0.0.1", int(time.time()) + 600)
    r = run_cli(home, "ssh", "alice@127.0.0.1", "-p", "2222", EZSSH_SSH="ssh -G -F /dev/null")
    assert r.returncode == 0, r.stderr
    opts = {}
    for line in r.stdout.splitlines():
        k, _, v = line.partition(" ")
        opts.setdefault(k, []).append(v)
    assert opts["user"] == ["alice"] and opts["port"] == ["2222"] and opts["hostname"] == ["127.0.0.1"]
    assert opts["identitiesonly"] == ["yes"] and opts["identityagent"] == ["none"]
    assert str(c.key) in opts["identityfile"]
    assert str(c.cert) in opts["certificatefile"]


def test_local_user_and_dash_l_pick_the_cached_slot(fast_home):
    home, fake = fast_home
    c = make_cached(home, "bob", "web1", int(time.time()) + 600)
    r = run_cli(home, "ssh", "web1", "-l", "bob", "id", EZSSH_SSH=str(fake))
    assert r.returncode == 0, r.stderr
    assert fake_ssh_out(r.stdout)["argv"][1] == str(c.key)


def test_ssh_help_and_usage(fast_home):
    home, _ = fast_home
    r = run_cli(home, "ssh", "--help")
    assert r.returncode == 0 and "usage: ezssh ssh" in r.stdout
    r = run_cli(home, "ssh")
    assert r.returncode == 2 and "missing the host" in r.stderr


# ---- lazy imports ---------------------------------------------------------------------------------


def imported_modules(importtime_stderr: str) -> set[str]:
    mods = set()
    for line in importtime_stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            name = line.rsplit("|", 1)[1].strip()
            if name != "imported package":
                mods.add(name)
    return mods


def heavy(mods: set[str]) -> set[str]:
    return {m for m in mods if m.split(".")[0] in HEAVY}


def test_import_cli_is_light():
    r = subprocess.run([sys.executable, "-X", "importtime", "-c", "import ezssh.cli"],
                       env=cli_env(Path("/nonexistent")), capture_output=True, text=True, check=True)
    mods = imported_modules(r.stderr)
    assert "ezssh.cli" in mods
    assert heavy(mods) == set()


def test_help_is_light(tmp_path):
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "ezssh", "--help"],
                       env=cli_env(tmp_path / "h"), capture_output=True, text=True)
    assert r.returncode == 0 and "exit codes:" in r.stdout
    assert heavy(imported_modules(r.stderr)) == set()


def test_cached_fast_path_is_light(fast_home):
    home, fake = fast_home
    make_cached(home, "alice", "127.0.0.1", int(time.time()) + 600)
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "ezssh", "ssh", "alice@127.0.0.1", "true"],
                       env=cli_env(home, EZSSH_SSH=str(fake)), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert fake_ssh_out(r.stdout)["argv"][-2:] == ["alice@127.0.0.1", "true"]
    mods = imported_modules(r.stderr)
    assert "ezssh.sshargs" in mods and "ezssh.certs" in mods
    assert heavy(mods) == set(), sorted(heavy(mods))


def test_a_pending_request_says_who_may_approve():
    from ezssh.issue import describe_approvers

    assert describe_approvers({"users": ["bob@contoso.test", "*"], "groups": ["9f3c"]}, "p") == \
        " from bob@contoso.test, anyone in your tenant or a member of group 9f3c"
    assert describe_approvers({"users": [], "groups": []}, "gated") == " from an approver of policy gated"
