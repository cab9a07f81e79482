"""Session fixtures: the real stand-ins, started once per test run.

Under CI=true a stand-in that cannot start FAILS the tests that need it; elsewhere they are skipped
with the reason (e.g. a laptop without sshd or root).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Callable, Iterator

import pytest

from devstack.proc import StandInError, free_port


from tests.realparts import unavailable  # one rule for every test module


@pytest.fixture(scope="session")
def state_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("stack")


@pytest.fixture(scope="session")
def softhsm_token(state_dir):
    """The one SoftHSM token of this test process (SoftHSM reads its config once per process)."""
    from devstack.softhsm import ensure_token

    try:
        return ensure_token(state_dir)
    except StandInError as exc:
        unavailable(str(exc))


def _stand_in(start: Callable, state_dir: Path) -> Iterator:
    """Start a stand-in on a free port for the session (or skip/fail by the one rule), stop it after."""
    try:
        part = start(state_dir, free_port())
    except StandInError as exc:
        unavailable(str(exc))
    yield part
    part.stop()


@pytest.fixture(scope="session")
def azurite(state_dir) -> Iterator:
    from devstack.azurite import start_azurite

    yield from _stand_in(start_azurite, state_dir)


@pytest.fixture(scope="session")
def oidc(state_dir) -> Iterator:
    from devstack.oidc import start_oidc

    # with the managed identity endpoint (App Service protocol) for workload tests
    yield from _stand_in(lambda d, port: start_oidc(d, port, mi_port=free_port()), state_dir)


@pytest.fixture(scope="session")
def api_port() -> int:
    """The API server's port, chosen first: the API's public URL (EZSSH_PUBLIC_URL) names it."""
    return free_port()


@pytest.fixture(scope="session")
def api_env(state_dir, oidc, azurite, softhsm_token, api_port) -> dict[str, str]:
    from devstack.stack import api_env as make_env

    return make_env(state_dir, oidc, azurite.port, softhsm_token, queue_port=azurite.queue_port,
                    api_port=api_port)


@pytest.fixture(scope="session")
def context(api_env):
    """The service wired in-process against the same stand-ins the API server uses."""
    from functions.settings import load_settings
    from functions.wiring import build_context

    return build_context(load_settings(api_env))


@pytest.fixture(scope="session")
def demo_policy(api_env, oidc, context):
    from devstack.stack import demo_policy_document, identity_of
    from devstack.stack import ensure_policy

    return ensure_policy(context.service, identity_of(oidc, "carol"), demo_policy_document(oidc))


@pytest.fixture(scope="session")
def api_server(state_dir, api_env, demo_policy, api_port) -> Iterator[str]:
    """The API served by uvicorn as a real HTTP server: http://127.0.0.1:<port>."""
    from devstack.stack import start_api

    port = api_port
    try:
        proc = start_api(state_dir, port, api_env)
    except StandInError as exc:
        unavailable(str(exc))
    yield f"http://127.0.0.1:{port}"
    proc.stop()


@pytest.fixture(scope="session")
def sshd(state_dir, demo_policy, context, oidc) -> Iterator:
    """The local "VM": trusts the demo policy's user CA and presents a host certificate of its host CA."""
    from devstack.sshd import host_key_file, start_sshd
    from devstack.stack import DEMO_USERS, host_certificate_for, identity_of

    try:
        cert = host_certificate_for(context.service, identity_of(oidc, "carol"), "demo", host_key_file(state_dir))
        s = start_sshd(state_dir, free_port(), users=DEMO_USERS, host_certificate=cert,
                       host_ca=demo_policy.current_host_ca.public_key)
    except (StandInError, OSError) as exc:
        unavailable(str(exc))
    s.trust(*(c.public_key for c in demo_policy.ca if c.state in ("current", "previous")))
    yield s
    s.stop()


@pytest.fixture(scope="session")
def token_for(oidc) -> Callable[[str], str]:
    """An access token for a dev user, from a real MSAL device-code sign-in (cached per user)."""
    from devstack.oidc import sign_in

    cache: dict[str, str] = {}
    lock = threading.Lock()

    def get(username: str) -> str:
        with lock:
            if username not in cache:
                cache[username] = sign_in(oidc, username)["access_token"]
            return cache[username]

    return get


@pytest.fixture(scope="session")
def client(api_server) -> Iterator:
    """An HTTP client on the API server."""
    import httpx

    with httpx.Client(base_url=api_server, timeout=60) as c:
        yield c


@pytest.fixture(scope="session")
def auth(token_for) -> Callable[[str], dict]:
    """The Authorization header of a dev user: auth("alice")."""
    return lambda user: {"Authorization": f"Bearer {token_for(user)}"}
