"""A stand-in for the user's web browser, for `ezssh login --browser` against the local Entra ID stand-in.

Python's `webbrowser` (which MSAL uses) runs it through the BROWSER environment variable:

    BROWSER="/path/to/python -m devstack.browser %s"     (PYTHONPATH must hold infra/local)
    DEVSTACK_BROWSER_USER=alice                         the dev user to sign in as (users.json)
    DEVSTACK_BROWSER_PASSWORD=...                       optional; default: the user's dev password
    DEVSTACK_BROWSER_CA=<dev CA PEM>                    the only CA trusted for the stand-in
    DEVSTACK_BROWSER_LOG=<file>                         optional; where the outcome is appended

Like a real browser launcher it returns at once (exit 0) and does the work in a detached child:
`webbrowser` waits for the command to exit before MSAL starts answering on its loopback listener,
so signing in inside the command itself would deadlock. The child opens the authorization URL,
signs in on the stand-in's login page, and posts the authorization response to the CLI's loopback
redirect URI (see devstack.oidc.complete_authorization). It contacts only 127.0.0.1.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

ENV_USER = "DEVSTACK_BROWSER_USER"
ENV_PASSWORD = "DEVSTACK_BROWSER_PASSWORD"
ENV_CA = "DEVSTACK_BROWSER_CA"
ENV_LOG = "DEVSTACK_BROWSER_LOG"


def command() -> str:
    """The BROWSER value that runs this module with the current interpreter."""
    return f"{sys.executable} -m devstack.browser %s"


def _log(msg: str) -> None:
    line = f"{time.strftime('%H:%M:%S')} devstack.browser[{os.getpid()}]: {msg}\n"
    path = os.environ.get(ENV_LOG)
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(line)
    else:
        sys.stderr.write(line)


def run(url: str) -> int:
    """Sign in at `url` as $DEVSTACK_BROWSER_USER (in this process). 0 once the app got the response."""
    from devstack.oidc import DeviceLoginError, complete_authorization, password_for

    user = os.environ.get(ENV_USER)
    ca = os.environ.get(ENV_CA)
    if not user or not ca:
        _log(f"{ENV_USER} and {ENV_CA} must be set")
        return 2
    password = os.environ.get(ENV_PASSWORD)
    if password is None:
        password = password_for(user)
    try:
        resp = complete_authorization(url, user, password, ca)
    except (DeviceLoginError, OSError) as exc:
        _log(f"sign-in as {user} failed: {exc}")
        return 1
    _log(f"signed in as {user}; the app at {resp.url} answered HTTP {resp.status_code}")
    return 0 if resp.ok else 1


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "--run":
        return run(argv[1])
    if len(argv) != 1:
        sys.stderr.write("usage: python -m devstack.browser URL\n")
        return 2
    # Detach (a new session, no inherited pipes) and return at once, as browser launchers do.
    subprocess.Popen([sys.executable, "-m", "devstack.browser", "--run", argv[0]],
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                     stderr=None if os.environ.get(ENV_LOG) is None else subprocess.DEVNULL,
                     start_new_session=True, close_fds=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
