"""Fixtures for the host tests: sandbox hosts with a real sshd, tokens, a second policy, another tenant."""

from __future__ import annotations

import os
import shutil

import pytest

from devstack.proc import StandInError

from .sandbox import SandboxHost


from tests.realparts import unavailable  # noqa: E402


@pytest.fixture
def make_host(tmp_path, sshd):
    """A factory of sandbox hosts (root prefix + a real sshd reading its sshd_config), stopped after."""
    if os.geteuid() != 0 or (shutil.which("sshd") is None and not os.path.exists("/usr/sbin/sshd")):
        unavailable("sandbox hosts need root and sshd")
    hosts: list[SandboxHost] = []

    def make(name: str = "host", *, with_dropin_dir: bool = True, start: bool = True) -> SandboxHost:
        h = SandboxHost(tmp_path / name / "root", with_dropin_dir=with_dropin_dir).create()
        hosts.append(h)
        if start:
            try:
                h.start()
            except (StandInError, OSError) as exc:
                unavailable(f"sandbox sshd did not start: {exc}")
        return h

    yield make
    for h in hosts:
        h.stop()


def _doc(oidc, pid: str, tenant: str) -> dict:
    return {
        "id": pid,
        "name": f"Host tests: {pid}",
        "rules": [{"groups": [oidc.group_id(tenant, "ezssh-users")], "action": "auto"}],
        "hosts": ["127.0.0.0/8"],
        "principals": ["{username}"],
        "admins": {"groups": [oidc.group_id(tenant, "ezssh-admins")]},
        "default_ttl": 3600,
        "max_ttl": 8 * 3600,
        "extensions": ["permit-pty"],
    }


@pytest.fixture(scope="session")
def second_policy(context, oidc, demo_policy):
    """A second contoso policy with its own CA, covering the same hosts as the demo policy."""
    from devstack.stack import identity_of
    from devstack.stack import ensure_policy

    return ensure_policy(context.service, identity_of(oidc, "carol"), _doc(oidc, "hosts-b", "contoso"))


@pytest.fixture(scope="session")
def fabrikam_policy(context, oidc):
    """A policy of another tenant (fabrikam), created by its admin mallory."""
    from devstack.stack import identity_of
    from devstack.stack import ensure_policy

    return ensure_policy(context.service, identity_of(oidc, "mallory"), _doc(oidc, "fab-hosts", "fabrikam"))


@pytest.fixture(scope="module")
def arm(request):
    """The ARM compute stand-in for one test module, serving that module's own subscription `SUB`
    (so one module's VMs and records stay out of another's scopes)."""
    from tests.standins.arm import ArmStandIn

    a = ArmStandIn(subscription=request.module.SUB).start()
    yield a
    a.stop()
