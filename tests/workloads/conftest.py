"""Workload identities (service principals, managed identities, federated CI jobs) against the real
local stack: their app-only tokens come from the dev identity provider through azure-identity's own
credentials, as in Azure."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest

from devstack.proc import StandInError, free_port
from devstack.stack import ensure_policy, host_certificate_for, identity_of
from tests.realparts import unavailable

SCOPE = "api://ezssh/.default"
APPS = ("deploy-pipeline", "web1-identity", "config-mgmt")
PEOPLE = ("lee",)
LOGIN = "dave"  # an account of the test sshd; the policy maps each workload (and lee) to it by object id


def credential_kwargs(oidc) -> dict:
    return dict(authority=oidc.base_url.removeprefix("https://"), disable_instance_discovery=True,
                connection_verify=str(oidc.ca_path))


@pytest.fixture(scope="session")
def app_token(oidc, tmp_path_factory) -> Callable[[str], str]:
    """An app-only token for a dev app, through the azure-identity credential its kind uses."""
    from azure.identity import CertificateCredential, ClientSecretCredential, ManagedIdentityCredential, \
        WorkloadIdentityCredential

    cache: dict[str, str] = {}
    tmp: Path = tmp_path_factory.mktemp("federated")

    def get(name: str) -> str:
        if name in cache:
            return cache[name]
        app = oidc.app(name)
        kw = credential_kwargs(oidc)
        if app.get("secret"):
            cred = ClientSecretCredential(app["tid"], app["client_id"], app["secret"], **kw)
        elif app.get("certificate"):
            cred = CertificateCredential(app["tid"], app["client_id"], certificate_path=str(oidc.app_certificate(name)), **kw)
        elif app.get("federated"):
            f = tmp / f"{name}.jwt"
            f.write_text(oidc.ci_token(app["federated"][0]["subject"]))
            cred = WorkloadIdentityCredential(tenant_id=app["tid"], client_id=app["client_id"], token_file_path=str(f), **kw)
        else:
            import os

            os.environ["IDENTITY_ENDPOINT"], os.environ["IDENTITY_HEADER"] = oidc.mi_endpoint, oidc.mi_header
            try:
                cred = ManagedIdentityCredential(client_id=app["client_id"])
                cache[name] = cred.get_token(SCOPE).token
            finally:
                del os.environ["IDENTITY_ENDPOINT"], os.environ["IDENTITY_HEADER"]
            return cache[name]
        cache[name] = cred.get_token(SCOPE).token
        return cache[name]

    return get


@pytest.fixture(scope="session")
def app_auth(app_token) -> Callable[[str], dict]:
    return lambda name: {"Authorization": f"Bearer {app_token(name)}"}


@pytest.fixture(scope="session")
def pub() -> Callable[[], str]:
    """A fresh ed25519 public key line (OpenSSH format), one per call."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    return lambda: ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()


@pytest.fixture(scope="session")
def wl_sshd(state_dir, context, oidc):
    from devstack.sshd import host_key_file, start_sshd

    oids = [oidc.app(a)["oid"] for a in APPS] + [oidc.user(u)["oid"] for u in PEOPLE]
    carol = identity_of(oidc, "carol")
    policy = ensure_policy(context.service, carol, {
        "id": "wl-e2e",
        "rules": [{"users": oids, "action": "auto"}],
        "hosts": ["127.0.0.1", "localhost"],
        "logins": [{"oid": o, "logins": [LOGIN], "display": a} for o, a in zip(oids, APPS + PEOPLE)],
        "max_ttl": 3600,
    })
    try:
        cert = host_certificate_for(context.service, carol, "wl-e2e", host_key_file(state_dir, "sshd-wl"))
        s = start_sshd(state_dir, free_port(), name="sshd-wl", users=[LOGIN], host_certificate=cert,
                       host_ca=policy.current_host_ca.public_key)
    except (StandInError, OSError) as exc:
        unavailable(str(exc))
    s.trust(*(c.public_key for c in policy.ca if c.state in ("current", "previous")))
    yield s
    s.stop()


def install_krl(client, headers: dict, sshd, policy_id: str = "wl-e2e") -> bytes:
    """What a host's KRL update does: the policy's current KRL (from the API) into sshd's RevokedKeys."""
    r = client.get(f"/api/policies/{policy_id}/krl", headers=headers)
    assert r.status_code == 200, r.text
    sshd.revoked_keys_file.write_bytes(r.content)
    return r.content
