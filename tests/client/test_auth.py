"""`ezssh configure / login / whoami / logout` as a user runs them: the CLI as a subprocess, against
the real Entra ID stand-in (oidc-provider) and a real HTTP server serving /api/client-config."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
import time

import pytest

from devstack.oidc import complete_device_code, password_for

from .conftest import DEVICE_LINE, ConfigServer, cli_env, client_config_for, run_cli


def device_login(home, oidc, username: str = "alice", *extra: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run `ezssh login`, read the device-code line from its stderr, sign in as `username` in the
    browser stand-in, and return the finished process (stderr holds everything the CLI wrote)."""
    proc = subprocess.Popen([sys.executable, "-m", "ezssh", "login", *extra],
                            env=cli_env(home, EZSSH_ALLOW_DEVICE_LOGIN="1"),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 30
        match = None
        while match is None:
            line = proc.stderr.readline()
            if not line:
                pytest.fail(f"ezssh login ended without a device code: rc={proc.wait()} stderr={''.join(lines)}")
            lines.append(line)
            match = DEVICE_LINE.search(line)
            assert time.monotonic() < deadline
        complete_device_code(match["uri"], match["code"], username, password_for(username), oidc.ca_path)
        out, rest = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "".join(lines) + rest)


def test_configure_login_whoami_logout(oidc, config_server, ezssh_home):
    r = run_cli(ezssh_home, "configure", "--server", config_server.url, "--ca-bundle", str(oidc.ca_path), "--json")
    assert r.returncode == 0, r.stderr
    saved = json.loads(r.stdout)
    assert saved["server"] == config_server.url
    assert saved["authority"] == oidc.issuer("contoso")
    assert saved["authority_type"] == "oidc"
    assert saved["client_id"] == oidc.cli_client_id
    assert config_server.hits == ["/api/client-config"]
    assert stat.S_IMODE(ezssh_home.stat().st_mode) == 0o700
    cfg = json.loads((ezssh_home / "config.json").read_text())
    assert cfg["ca_bundle"] == str(ezssh_home / "ca-bundle.pem")
    assert (ezssh_home / "ca-bundle.pem").read_text() == oidc.ca_path.read_text()

    # Not signed in yet, no terminal and no EZSSH_ALLOW_DEVICE_LOGIN: exit 3 with the hint.
    r = run_cli(ezssh_home, "whoami")
    assert r.returncode == 3, r.stderr
    assert "ezssh login" in r.stderr

    r = device_login(ezssh_home, oidc, "alice")
    assert r.returncode == 0, r.stderr
    assert "Signed in as alice@contoso.test" in r.stderr
    assert r.stdout == ""  # messages go to stderr
    cache = ezssh_home / "token_cache.bin"
    assert cache.exists() and stat.S_IMODE(cache.stat().st_mode) == 0o600

    r = run_cli(ezssh_home, "whoami", "--json")
    assert r.returncode == 0, r.stderr
    me = json.loads(r.stdout)
    alice = oidc.user("alice")
    assert me["upn"] == "alice@contoso.test"
    assert me["oid"] == alice["oid"]
    assert me["tid"] == oidc.tenant_id("contoso")
    assert me["groups"] == [oidc.group_id("contoso", "ezssh-users")]
    assert me["roles"] == []
    assert me["scopes"] == ["access_as_user"]
    assert me["expires_at"] > time.time() + 3000
    assert me["token_cache"]  # where the cache lives and whether it is encrypted
    if "plaintext" in me["token_cache"]:
        assert "0600" in me["token_cache"]

    r = run_cli(ezssh_home, "whoami")
    assert r.returncode == 0 and "alice@contoso.test" in r.stdout and "token cache:" in r.stdout

    # A cached certificate dir must go at logout too.
    (ezssh_home / "certs" / "abc" / "alice@h").mkdir(parents=True)
    r = run_cli(ezssh_home, "logout")
    assert r.returncode == 0, r.stderr
    assert "alice@contoso.test" in r.stderr
    assert not (ezssh_home / "certs").exists()
    r = run_cli(ezssh_home, "whoami", "--json")
    assert r.returncode == 3, r.stderr
    assert r.stdout == ""
    assert "ezssh login" in r.stderr


def test_login_as_another_user_and_tenant(oidc, ezssh_home):
    """bob is an approver in contoso; mallory lives in fabrikam (configure --tenant)."""
    srv = ConfigServer(client_config_for(oidc, "contoso"))
    try:
        fab = oidc.tenant_id("fabrikam")
        r = run_cli(ezssh_home, "configure", "--server", srv.url, "--ca-bundle", str(oidc.ca_path), "--tenant", fab)
        assert r.returncode == 0, r.stderr
        r = device_login(ezssh_home, oidc, "mallory", "--json")
        assert r.returncode == 0, r.stderr
        me = json.loads(r.stdout)
        assert me["tid"] == fab
        assert me["roles"] == ["EZSSH.Admin"]
        assert me["issuer"] == oidc.issuer(fab)
    finally:
        srv.stop()


def test_configure_over_https_with_ca_bundle(oidc, ezssh_home):
    srv = ConfigServer(client_config_for(oidc))
    srv.wrap_tls(oidc.ca.server_cert, oidc.ca.server_key)
    url = f"https://127.0.0.1:{srv.httpd.server_address[1]}"
    try:
        # Without the bundle the dev CA is not trusted (REQUESTS_CA_BUNDLE is the system store here).
        r = run_cli(ezssh_home, "configure", "--server", url)
        assert r.returncode == 6, r.stderr
        assert "TLS" in r.stderr and "--ca-bundle" in r.stderr
        r = run_cli(ezssh_home, "configure", "--server", url, "--ca-bundle", str(oidc.ca_path))
        assert r.returncode == 0, r.stderr
    finally:
        srv.stop()


def test_configure_refusals(ezssh_home, tmp_path):
    r = run_cli(ezssh_home, "configure", "--server", "http://ezssh.example.com")
    assert r.returncode == 2 and "http" in r.stderr
    r = run_cli(ezssh_home, "configure", "--server", "ftp://127.0.0.1")
    assert r.returncode == 2
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate")
    r = run_cli(ezssh_home, "configure", "--server", "http://127.0.0.1:1", "--ca-bundle", str(bad))
    assert r.returncode == 2 and "PEM" in r.stderr
    # Nothing listens on this port: service unavailable.
    from devstack.proc import free_port

    r = run_cli(ezssh_home, "configure", "--server", f"http://127.0.0.1:{free_port()}")
    assert r.returncode == 6, r.stderr
    assert not (ezssh_home / "config.json").exists()


def test_configure_shows_service_error_and_request_id(ezssh_home):
    srv = ConfigServer({"error": "unavailable", "message": "The service is starting.", "request_id": "req-42"}, status=503)
    try:
        r = run_cli(ezssh_home, "configure", "--server", srv.url)
        assert r.returncode == 6
        assert "The service is starting." in r.stderr and "req-42" in r.stderr
    finally:
        srv.stop()


def test_commands_need_configuration(ezssh_home):
    for args in (["whoami"], ["login"], ["requests", "list"], ["policy", "ca", "p1"], ["ssh", "alice@127.0.0.1"]):
        r = run_cli(ezssh_home, *args)
        assert r.returncode == 3, (args, r.stderr)
        assert "ezssh configure" in r.stderr


def test_api_command_without_sign_in_exits_3(oidc, config_server, ezssh_home):
    r = run_cli(ezssh_home, "configure", "--server", config_server.url, "--ca-bundle", str(oidc.ca_path))
    assert r.returncode == 0, r.stderr
    r = run_cli(ezssh_home, "requests", "list")
    assert r.returncode == 3, r.stderr
    assert "ezssh login" in r.stderr


def test_without_an_encrypted_store_the_cache_says_why_in_words(tmp_path, monkeypatch):
    """No libsecret bindings here: whoami's `token cache` line says so, not msal-extensions' ImportError."""
    from ezssh.auth import token_cache

    monkeypatch.delenv("EZSSH_PLAINTEXT_TOKEN_CACHE", raising=False)
    try:
        import gi  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("PyGObject is installed here: the encrypted store may work")
    _, desc = token_cache(tmp_path)
    assert desc.startswith(f"plaintext file {tmp_path / 'token_cache.bin'} (mode 0600")
    assert "PyGObject" in desc and "ImportError" not in desc and "Unable to import" not in desc
