"""An approval policy for the local sshd's 127.0.0.1, and waiting for a request to show up pending:
shared by the CLI's and the web page's approval tests."""

from __future__ import annotations

import time
from typing import Iterator

import httpx

from devstack.stack import ensure_policy, identity_of


def approval_policy(context, oidc, sshd, demo_policy,  # type: ignore[no-untyped-def]
                    pid: str, hosts: list[str]) -> Iterator:
    """A policy (made by carol) under which contoso's users need one approver's approval; the sshd
    trusts its CA until the generator resumes. Use from a fixture: `yield from approval_policy(...)`."""
    doc = {
        "id": pid,
        "rules": [{"groups": [oidc.group_id("contoso", "ezssh-users")], "action": "approval"}],
        "hosts": hosts,
        "principals": ["{username}"],
        "approvers": {"groups": [oidc.group_id("contoso", "ezssh-approvers")]},
    }
    p = ensure_policy(context.service, identity_of(oidc, "carol"), doc)
    original = sshd.trusted_ca_file.read_text()
    sshd.trust(*(c.public_key for c in demo_policy.ca), *(c.public_key for c in p.ca))
    yield p
    sshd.trusted_ca_file.write_text(original)


def wait_pending(api_server: str, token: str, policy: str, principal: str, seen: set[str],
                 timeout: float = 30) -> str:
    """The id of a request under `policy` for `principal` that the approver (`token`) sees pending."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        r = httpx.get(f"{api_server}/api/requests", params={"state": "pending", "role": "approver"},
                      headers={"Authorization": f"Bearer {token}"}, timeout=10)
        for req in r.json()["requests"]:
            if req["policy"] == policy and req["principal"] == principal and req["id"] not in seen:
                return req["id"]
        time.sleep(0.2)
    raise AssertionError(f"no request under {policy} for {principal} showed up as pending")
