"""Workload identities (service principals, managed identities, federated CI jobs) against the real
local stack: their app-only tokens come from the dev identity provider through azure-identity's own
credentials, as in Azure."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest

SCOPE = "api://ezssh/.default"


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
