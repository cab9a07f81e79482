"""Sign-in for machines: a managed identity, workload identity federation, or a service principal
with a certificate, through azure-identity (no browser, no prompt, no secret on disk for the first
two). The token is an app-only token for the service (`<app id uri>/.default`); the service knows
the workload by its service principal's object id and maps it to logins in a policy.

Imported only when the configuration says a workload signs in (`cfg["workload"]`): azure-identity
is not loaded for people.

The access token is kept in the ezssh directory (0600, `workload-token.json`) until 5 minutes
before it expires, so a job running several ssh/scp commands asks the identity endpoint once.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from .errors import NOT_SIGNED_IN, UNAVAILABLE, USAGE, EzsshError
from .home import write_private

if TYPE_CHECKING:
    from azure.core.credentials import TokenCredential

TOKEN_FILE = "workload-token.json"
MARGIN = 300
KINDS = ("managed-identity", "workload-identity", "service-principal")


def app_scope(cfg: dict) -> str:
    """The service's `.default` scope: the app id URI of its delegated scope (api://x/access_as_user)."""
    scope = cfg["scopes"][0]
    return scope.rsplit("/", 1)[0] + "/.default"


def settings_from_args(
    kind: str, client_id: str | None, certificate: str | None, tenant: str | None, cfg: dict, env=None
) -> dict:
    """What `ezssh login --managed-identity|--workload-identity|--service-principal` stores."""
    env = os.environ if env is None else env
    w: dict = {"kind": kind}
    if kind == "managed-identity":
        if client_id:
            w["client_id"] = client_id  # a user-assigned identity; else the system-assigned one
    elif kind == "workload-identity":
        missing = [v for v in ("AZURE_FEDERATED_TOKEN_FILE",) if not env.get(v)]
        if not (client_id or env.get("AZURE_CLIENT_ID")):
            missing.append("AZURE_CLIENT_ID (or --client-id)")
        if missing:
            raise EzsshError(
                f"--workload-identity needs {', '.join(missing)} in the environment "
                "(GitHub Actions, Azure DevOps and AKS workload identity set them).",
                USAGE,
            )
        if client_id:
            w["client_id"] = client_id
    else:
        if not client_id or not certificate:
            raise EzsshError(
                "--service-principal needs --client-id APP_ID and --certificate PEM "
                "(the private key and certificate in one PEM file).",
                USAGE,
            )
        path = Path(certificate).expanduser().resolve()
        if not path.is_file():
            raise EzsshError(f"--certificate {path}: no such file.", USAGE)
        w["client_id"], w["certificate"] = client_id, str(path)
    if tenant:
        w["tenant_id"] = tenant
    elif not (cfg.get("tenant_id") or env.get("AZURE_TENANT_ID")) and kind != "managed-identity":
        raise EzsshError("Give --tenant TID (the service serves several tenants).", USAGE)
    return w


def _authority(cfg: dict) -> tuple[str, str | None]:
    """(authority host, tenant) from the configured authority https://<host>/<tenant>."""
    parts = urlsplit(cfg["authority"])
    return parts.netloc, (parts.path.strip("/").split("/")[0] or None)


def credential(cfg: dict, env: Mapping[str, str] | None = None) -> TokenCredential:
    """The azure-identity credential the stored settings describe."""
    from azure.identity import CertificateCredential, ManagedIdentityCredential, WorkloadIdentityCredential

    env = os.environ if env is None else env
    w = cfg["workload"]
    host, tenant = _authority(cfg)
    tenant = w.get("tenant_id") or env.get("AZURE_TENANT_ID") or cfg.get("tenant_id") or tenant
    kw: dict = {}
    if cfg.get("ca_bundle"):
        kw["connection_verify"] = cfg["ca_bundle"]
    if w["kind"] == "managed-identity":
        return ManagedIdentityCredential(client_id=w.get("client_id"), **kw)
    kw.update(authority=host, disable_instance_discovery=cfg.get("authority_type") == "oidc")
    if w["kind"] == "workload-identity":
        return WorkloadIdentityCredential(
            tenant_id=tenant,
            client_id=w.get("client_id") or env.get("AZURE_CLIENT_ID"),
            token_file_path=env.get("AZURE_FEDERATED_TOKEN_FILE"),
            **kw,
        )
    if not tenant:
        raise EzsshError("Give --tenant TID (the service serves several tenants).", USAGE)
    return CertificateCredential(tenant, w["client_id"], certificate_path=w["certificate"], **kw)


def _cached(home: Path, cfg: dict, now: float) -> str | None:
    try:
        data = json.loads((home / TOKEN_FILE).read_text())
    except (OSError, ValueError):
        return None
    if (
        not isinstance(data, dict)
        or data.get("settings") != cfg["workload"]
        or data.get("authority") != cfg["authority"]
    ):
        return None
    if not isinstance(data.get("expires_on"), int) or data["expires_on"] - MARGIN <= now:
        return None
    return data.get("token") if isinstance(data.get("token"), str) else None


def token(cfg: dict, home: Path, force_refresh: bool = False) -> str:
    """An app-only access token for the service."""
    now = time.time()
    if not force_refresh:
        hit = _cached(home, cfg, now)
        if hit:
            return hit
    from azure.core.exceptions import AzureError, ClientAuthenticationError

    try:
        cred = credential(cfg)
        at = cred.get_token(app_scope(cfg))
    except ClientAuthenticationError as exc:
        first = (exc.message or str(exc)).splitlines()[0][:300]
        raise EzsshError(
            f"The workload could not sign in ({cfg['workload']['kind']}): {first}", NOT_SIGNED_IN
        ) from None
    except (AzureError, OSError, ValueError) as exc:
        raise EzsshError(
            f"The workload's identity endpoint cannot be reached: {type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:200] if str(exc) else ''}",
            UNAVAILABLE,
        ) from None
    write_private(
        home / TOKEN_FILE,
        json.dumps(
            {
                "settings": cfg["workload"],
                "authority": cfg["authority"],
                "token": at.token,
                "expires_on": int(at.expires_on),
            }
        ),
        0o600,
    )
    return at.token


def forget(home: Path) -> None:
    try:
        (home / TOKEN_FILE).unlink()
    except FileNotFoundError:
        pass
