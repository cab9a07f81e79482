"""`ezssh login --browser`: MSAL's authorization code + PKCE sign-in with a loopback redirect, against
the real Entra ID stand-in. The CLI runs as a subprocess; Python's `webbrowser` (inside MSAL) starts
the browser stand-in (devstack.browser) through $BROWSER, which signs in on the stand-in's login
page and posts the authorization response to the CLI's loopback listener."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from .conftest import CLIENT, DEVICE_LINE, INFRA_LOCAL, cli_env, run_cli

OPENING = "Opening your browser to sign in; if it does not open, use: ezssh login --device"


@pytest.fixture()
def configured(oidc, config_server, ezssh_home):
    r = run_cli(ezssh_home, "configure", "--server", config_server.url, "--ca-bundle", str(oidc.ca_path))
    assert r.returncode == 0, r.stderr
    return ezssh_home


def browser_env(oidc, log, user: str, password: str | None = None) -> dict:
    from devstack.browser import command

    env = {
        "BROWSER": command(),
        "PYTHONPATH": os.pathsep.join([str(CLIENT), str(INFRA_LOCAL)]),
        "DEVSTACK_BROWSER_USER": user,
        "DEVSTACK_BROWSER_CA": str(oidc.ca_path),
        "DEVSTACK_BROWSER_LOG": str(log),
    }
    if password is not None:
        env["DEVSTACK_BROWSER_PASSWORD"] = password
    return env


def test_browser_login_signs_alice_in(oidc, configured, tmp_path):
    log = tmp_path / "browser.log"
    r = run_cli(configured, "login", "--browser", "--timeout", "60", **browser_env(oidc, log, "alice"))
    blog = log.read_text() if log.exists() else "(no browser log)"
    assert r.returncode == 0, f"{r.stderr}\nbrowser: {blog}"
    assert OPENING in r.stderr
    assert "Signed in as alice@contoso.test" in r.stderr
    assert "To sign in, open" not in r.stderr  # not the device flow
    assert "signed in as alice" in blog

    r = run_cli(configured, "whoami", "--json")
    assert r.returncode == 0, r.stderr
    me = json.loads(r.stdout)
    assert me["upn"] == "alice@contoso.test"
    assert me["oid"] == oidc.user("alice")["oid"]
    assert me["tid"] == oidc.tenant_id("contoso")
    assert me["scopes"] == ["access_as_user"]

    # EZSSH_LOGIN=browser makes the browser the default, even without a display; bob replaces alice.
    r = run_cli(configured, "login", "--json", "--timeout", "60", EZSSH_LOGIN="browser",
                **browser_env(oidc, log, "bob"))
    assert r.returncode == 0, f"{r.stderr}\nbrowser: {log.read_text()}"
    assert OPENING in r.stderr
    assert json.loads(r.stdout)["upn"] == "bob@contoso.test"
    r = run_cli(configured, "whoami", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["upn"] == "bob@contoso.test", r.stderr


def test_browser_login_wrong_password_fails_within_timeout(oidc, configured, tmp_path):
    log = tmp_path / "browser.log"
    t0 = time.monotonic()
    r = run_cli(configured, "login", "--browser", "--timeout", "4", timeout=40,
                **browser_env(oidc, log, "alice", password="not-alices-password"))
    took = time.monotonic() - t0
    assert r.returncode == 3, r.stderr
    assert OPENING in r.stderr
    assert "Sign-in failed: the sign-in was not completed in the browser within 4 s." in r.stderr
    assert "ezssh login --device" in r.stderr
    assert took < 4 + 15, took
    deadline = time.monotonic() + 10
    while "failed" not in (log.read_text() if log.exists() else "") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "incorrect" in log.read_text()  # the stand-in refused the password
    r = run_cli(configured, "whoami")
    assert r.returncode == 3, r.stderr


def test_login_timeout_must_be_positive(configured):
    r = run_cli(configured, "login", "--browser", "--timeout", "0")
    assert r.returncode == 2 and "--timeout" in r.stderr


def test_default_is_device_code_without_a_display(oidc, configured):
    """No $DISPLAY/$WAYLAND_DISPLAY on Linux: plain `ezssh login` starts the device flow."""
    env = cli_env(configured, EZSSH_ALLOW_DEVICE_LOGIN="1")
    for k in ("DISPLAY", "WAYLAND_DISPLAY", "EZSSH_LOGIN"):
        env.pop(k, None)
    env["BROWSER"] = "false"  # would fail loudly if the browser path were taken
    proc = subprocess.Popen([sys.executable, "-m", "ezssh", "login"], env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        assert DEVICE_LINE.search(line), line
    finally:
        proc.kill()
        proc.communicate()


@pytest.mark.parametrize("env,platform,want", [
    ({}, "linux", "device"),
    ({"SSH_CONNECTION": "10.0.0.1 5 10.0.0.2 22"}, "linux", "device"),
    ({"DISPLAY": ":0"}, "linux", "browser"),
    ({"WAYLAND_DISPLAY": "wayland-0"}, "linux", "browser"),
    ({"DISPLAY": ":0", "EZSSH_LOGIN": "device"}, "linux", "device"),
    ({"EZSSH_LOGIN": "browser"}, "linux", "browser"),
    ({}, "darwin", "browser"),
    ({}, "win32", "browser"),
    ({"SSH_CONNECTION": "10.0.0.1 5 10.0.0.2 22"}, "darwin", "device"),
    ({"SSH_TTY": "/dev/pts/1"}, "win32", "device"),
    ({"EZSSH_LOGIN": "Browser", "SSH_TTY": "/dev/pts/1"}, "darwin", "browser"),
])
def test_login_method_rule(env, platform, want):
    from ezssh.commands.account import login_method

    assert login_method(env, platform) == want


def test_login_method_rejects_unknown_value():
    from ezssh.commands.account import login_method
    from ezssh.errors import USAGE, EzsshError

    with pytest.raises(EzsshError) as exc:
        login_method({"EZSSH_LOGIN": "carrier-pigeon"}, "linux")
    assert exc.value.code == USAGE
