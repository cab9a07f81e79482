"""Environment -> one frozen Settings, read and validated once at start.

Every setting the service reads is listed in SETTINGS below (name, required?, meaning); a parity
test checks this list against infra/ (Bicep app settings) and local.settings.example.json.
A bad or missing value fails start-up with a message that names the setting.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

from .core.errors import EzsshError
from .core.ids import GUID, is_guid
from .core.policy import TTL_CEILING

ENTRA_ISSUER = "https://login.microsoftonline.com/{tid}/v2.0"

# name -> meaning. Keep in step with local.settings.example.json and infra/modules/functionapp.bicep.
SETTINGS: dict[str, str] = {
    "EZSSH_TENANTS": "comma-separated tenant ids (GUIDs) whose users may sign in",
    "EZSSH_ISSUER_TEMPLATE": "token issuer with {tid}; default Entra v2 https://login.microsoftonline.com/{tid}/v2.0",
    "EZSSH_API_CLIENT_ID": "the API app registration's client id: the audience of access tokens",
    "EZSSH_API_APP_ID_URI": "the API's application id URI (e.g. api://ezssh); also accepted as audience",
    "EZSSH_API_SCOPE": "the delegated scope users consent to (default access_as_user)",
    "EZSSH_CLI_CLIENT_ID": "the CLI's public client id, served by /api/client-config",
    "EZSSH_OIDC_CA_BUNDLE": "PEM file to trust when fetching the issuer's keys (local dev CA only)",
    "EZSSH_STORAGE_CONNECTION_STRING": "Table Storage connection string (Azurite locally); or use EZSSH_STORAGE_ACCOUNT_URL",
    "EZSSH_STORAGE_ACCOUNT_URL": "https://<account>.table.core.windows.net, reached with the managed identity",
    "EZSSH_QUEUE_ACCOUNT_URL": "https://<account>.queue.core.windows.net: the enrolment job queue, reached with the "
    "managed identity (Azure); locally the QueueEndpoint of EZSSH_STORAGE_CONNECTION_STRING",
    "EZSSH_TABLE_NAME": "table name (default ezssh)",
    "EZSSH_SIGNER_BACKEND": "pkcs11 or keyvault",
    "EZSSH_PKCS11_MODULE": "path of the PKCS#11 module (pkcs11 backend)",
    "EZSSH_PKCS11_TOKEN_LABEL": "label of the token holding CA keys (pkcs11 backend)",
    "EZSSH_PKCS11_PIN": "user PIN of that token (pkcs11 backend)",
    "EZSSH_KEYVAULT_URL": "https://<vault>.vault.azure.net or a Managed HSM URL (keyvault backend)",
    "EZSSH_CA_KEY_KIND": "EC-P256 (default), EC-P384 or RSA-3072: the kind of new policy CA keys",
    "EZSSH_MAX_TTL_CEILING": "seconds; no policy may allow certificates longer than this (default 86400)",
    "EZSSH_BACKDATE_SECONDS": "seconds certificates are backdated for clock skew (default 60)",
    "AZURE_CLIENT_ID": "client id of the user-assigned managed identity (Azure only)",
    "APPLICATIONINSIGHTS_CONNECTION_STRING": "switches on Azure Monitor OpenTelemetry when set",
    "EZSSH_ENROL_SCOPES": "comma-separated /subscriptions/<id> or /subscriptions/<id>/resourceGroups/<rg>: "
    "where VMs may be enrolled (Run Command push, auto-enrolment); empty: none. With "
    "several tenants each entry is <tenant id>=<scope>: only that tenant's policies push there",
    "EZSSH_ARM_ENDPOINT": "Azure Resource Manager endpoint (default https://management.azure.com)",
    "EZSSH_GRAPH_ENDPOINT": "Microsoft Graph endpoint for users in too many groups for their token "
    "(groups overage; default https://graph.microsoft.com)",
    "EZSSH_PUBLIC_URL": "the API's public base URL, rendered into setup scripts (KRL fetches, host "
    "enrolment); default https://$WEBSITE_HOSTNAME in Azure",
    "EZSSH_VM_HOST_CERTS": "on (default) or off: enrolled Azure VMs get host certificates (their host keys read "
    "with Run Command, their names from ARM) and renew them through the reconcile timer",
    "EZSSH_VERIFIED_DOMAINS": "domains verified in each tenant, whose members' UPN local part {username} may "
    "stand for: <tenant id>=contoso.com,contoso.net;<tenant id>=...; with one tenant the "
    "<tenant id>= may be left out. Empty: {username} expands for nobody",
    "EZSSH_HOST_NAMESPACES": "the DNS suffixes, host names and IP ranges each tenant's hosts live in: "
    "<tenant id>=*.contoso.internal,10.20.0.0/16;<tenant id>=...; with one tenant the "
    "<tenant id>= may be left out. Host certificates name only hosts inside them (and "
    "inside their policy's patterns); a tenant admin may replace them through the API "
    "(PUT /api/host-namespaces). Empty: no host certificates until one does",
    "EZSSH_WEBHOOK_ALLOW_LOOPBACK_HTTP": "1 lets webhooks use plain http to a loopback address (local "
    "development only); default 0: https to public addresses only",
    "EZSSH_MAX_PENDING_REQUESTS": "pending requests one user may have open per policy (default 5, at most 100)",
    "EZSSH_LEAVER_INTERVAL": "seconds between leaver sweeps: identities holding live certificates are checked in "
    "Microsoft Graph and revoked when disabled or deleted (default 300; 0: off)",
    "EZSSH_LEAVER_RISK_LEVEL": "none (default), low, medium or high: also revoke users Entra ID Protection rates at "
    "this risk level or above (needs Entra ID P2 and IdentityRiskyUser.Read.All)",
    "EZSSH_REQUEST_RATE": "access requests one user may make per minute on one worker (default 30; bursts "
    "up to this many)",
}


class SettingsError(EzsshError):
    status, code = 500, "misconfigured"


@dataclass(frozen=True)
class Settings:
    tenants: tuple[str, ...]
    issuer_template: str
    api_client_id: str
    api_app_id_uri: str | None
    api_scope: str
    cli_client_id: str
    oidc_ca_bundle: str | None
    storage_connection_string: str | None
    storage_account_url: str | None
    table_name: str
    signer_backend: str
    pkcs11_module: str | None
    pkcs11_token_label: str | None
    pkcs11_pin: str | None
    keyvault_url: str | None
    ca_key_kind: str
    max_ttl_ceiling: int
    backdate_seconds: int
    managed_identity_client_id: str | None
    appinsights_connection_string: str | None
    enrol_scopes: tuple[str, ...] = ()
    arm_endpoint: str = "https://management.azure.com"
    graph_endpoint: str = "https://graph.microsoft.com"
    public_url: str | None = None
    queue_account_url: str | None = None
    vm_host_certs: bool = True

    @property
    def queue_configured(self) -> bool:
        """Enrolment jobs have a queue: an account URL (Azure), or a connection string naming one."""
        conn = self.storage_connection_string or ""
        return bool(self.queue_account_url) or "QueueEndpoint=" in conn or "UseDevelopmentStorage=true" in conn

    verified_domains: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (tid, domains) pairs
    host_namespaces: tuple[
        tuple[str, tuple[str, ...]], ...
    ] = ()  # (tid, namespaces) pairs, until a tenant admin sets them
    webhook_allow_loopback_http: bool = False
    max_pending_requests: int = 5
    request_rate: int = 30
    leaver_interval: int = 300
    leaver_risk_level: str | None = None

    def verified_domains_for(self, tid: str) -> tuple[str, ...]:
        tid = tid.lower()
        return next((d for t, d in self.verified_domains if t == tid), ())

    @property
    def authority_type(self) -> str:
        return "entra" if self.issuer_template.startswith("https://login.microsoftonline.com/") else "oidc"

    def issuer_for(self, tid: str) -> str:
        return self.issuer_template.replace("{tid}", tid)

    @property
    def scopes(self) -> list[str]:
        prefix = self.api_app_id_uri or f"api://{self.api_client_id}"
        return [f"{prefix}/{self.api_scope}"]

    @property
    def audiences(self) -> list[str]:
        return [a for a in (self.api_client_id, self.api_app_id_uri) if a]


def _get(env: Mapping[str, str], name: str) -> str | None:
    if name not in SETTINGS:  # pragma: no cover - guards the parity list itself
        raise KeyError(name)
    v = env.get(name)
    return v.strip() if v and v.strip() else None


def _need(env: Mapping[str, str], name: str, why: str = "") -> str:
    v = _get(env, name)
    if v is None:
        raise SettingsError(f"Setting {name} is required{why}: {SETTINGS[name]}.")
    return v


def _risk_level(env: Mapping[str, str]) -> str | None:
    level = (_get(env, "EZSSH_LEAVER_RISK_LEVEL") or "none").lower()
    if level not in ("none", "low", "medium", "high"):
        raise SettingsError(f"Setting EZSSH_LEAVER_RISK_LEVEL must be none, low, medium or high, not {level!r}.")
    return None if level == "none" else level


def _int(env: Mapping[str, str], name: str, default: int, lo: int, hi: int, unit: str = "seconds") -> int:
    raw = _get(env, name)
    if raw is None:
        return default
    try:
        v = int(raw)
    except ValueError:
        raise SettingsError(f"Setting {name} must be a whole number of {unit}; got {raw!r}.") from None
    if not lo <= v <= hi:
        raise SettingsError(f"Setting {name} must be between {lo} and {hi}; got {v}.")
    return v


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    env = os.environ if env is None else env
    tenants = tuple(t.strip() for t in _need(env, "EZSSH_TENANTS").split(",") if t.strip())
    bad = [t for t in tenants if not is_guid(t)]
    if bad or not tenants:
        raise SettingsError(
            f"Setting EZSSH_TENANTS must list tenant id GUIDs; not GUIDs: {', '.join(bad) or '(none)'}."
        )
    issuer_template = _get(env, "EZSSH_ISSUER_TEMPLATE") or ENTRA_ISSUER
    if "{tid}" not in issuer_template or not issuer_template.startswith("https://"):
        raise SettingsError("Setting EZSSH_ISSUER_TEMPLATE must be an https URL containing {tid}.")
    api_client_id = _need(env, "EZSSH_API_CLIENT_ID")
    cli_client_id = _need(env, "EZSSH_CLI_CLIENT_ID")

    conn = _get(env, "EZSSH_STORAGE_CONNECTION_STRING")
    account_url = _get(env, "EZSSH_STORAGE_ACCOUNT_URL")
    if bool(conn) == bool(account_url):
        raise SettingsError(
            "Set exactly one of EZSSH_STORAGE_CONNECTION_STRING (local Azurite) and "
            "EZSSH_STORAGE_ACCOUNT_URL (Azure, with the managed identity)."
        )
    if account_url and not account_url.startswith("https://"):
        raise SettingsError("Setting EZSSH_STORAGE_ACCOUNT_URL must be an https URL.")
    queue_url = _get(env, "EZSSH_QUEUE_ACCOUNT_URL")
    if queue_url and not queue_url.startswith("https://"):
        raise SettingsError("Setting EZSSH_QUEUE_ACCOUNT_URL must be an https URL.")
    table = _get(env, "EZSSH_TABLE_NAME") or "ezssh"
    if not re.match(r"^[A-Za-z][A-Za-z0-9]{2,62}$", table):
        raise SettingsError("Setting EZSSH_TABLE_NAME must be 3-63 letters and digits, starting with a letter.")

    backend = (_get(env, "EZSSH_SIGNER_BACKEND") or "pkcs11").lower()
    module = label = pin = vault = None
    if backend == "pkcs11":
        module = _need(env, "EZSSH_PKCS11_MODULE", " when EZSSH_SIGNER_BACKEND=pkcs11")
        if not os.path.exists(module):
            raise SettingsError(f"Setting EZSSH_PKCS11_MODULE names {module}, which does not exist.")
        label = _need(env, "EZSSH_PKCS11_TOKEN_LABEL", " when EZSSH_SIGNER_BACKEND=pkcs11")
        pin = _need(env, "EZSSH_PKCS11_PIN", " when EZSSH_SIGNER_BACKEND=pkcs11")
    elif backend == "keyvault":
        vault = _need(env, "EZSSH_KEYVAULT_URL", " when EZSSH_SIGNER_BACKEND=keyvault")
        if not vault.startswith("https://"):
            raise SettingsError("Setting EZSSH_KEYVAULT_URL must be an https URL.")
    else:
        raise SettingsError(f"Setting EZSSH_SIGNER_BACKEND must be pkcs11 or keyvault; got {backend!r}.")
    kind = _get(env, "EZSSH_CA_KEY_KIND") or "EC-P256"
    if kind not in ("EC-P256", "EC-P384", "RSA-3072"):
        raise SettingsError("Setting EZSSH_CA_KEY_KIND must be EC-P256, EC-P384 or RSA-3072.")
    ca_bundle = _get(env, "EZSSH_OIDC_CA_BUNDLE")
    if ca_bundle and not os.path.exists(ca_bundle):
        raise SettingsError(f"Setting EZSSH_OIDC_CA_BUNDLE names {ca_bundle}, which does not exist.")

    return Settings(
        tenants=tenants,
        issuer_template=issuer_template.rstrip("/"),
        api_client_id=api_client_id,
        api_app_id_uri=_get(env, "EZSSH_API_APP_ID_URI"),
        api_scope=_get(env, "EZSSH_API_SCOPE") or "access_as_user",
        cli_client_id=cli_client_id,
        oidc_ca_bundle=ca_bundle,
        storage_connection_string=conn,
        storage_account_url=account_url,
        table_name=table,
        signer_backend=backend,
        pkcs11_module=module,
        pkcs11_token_label=label,
        pkcs11_pin=pin,
        keyvault_url=vault,
        ca_key_kind=kind,
        max_ttl_ceiling=_int(env, "EZSSH_MAX_TTL_CEILING", TTL_CEILING, 60, 7 * 24 * 3600),
        backdate_seconds=_int(env, "EZSSH_BACKDATE_SECONDS", 60, 0, 600),
        managed_identity_client_id=_get(env, "AZURE_CLIENT_ID"),
        appinsights_connection_string=_get(env, "APPLICATIONINSIGHTS_CONNECTION_STRING"),
        queue_account_url=queue_url,
        verified_domains=_verified_domains(env, tenants),
        host_namespaces=_host_namespaces(env, tenants),
        webhook_allow_loopback_http=_flag(env, "EZSSH_WEBHOOK_ALLOW_LOOPBACK_HTTP"),
        max_pending_requests=_int(env, "EZSSH_MAX_PENDING_REQUESTS", 5, 1, 100, unit="requests"),
        request_rate=_int(env, "EZSSH_REQUEST_RATE", 30, 1, 10000, unit="requests a minute"),
        leaver_interval=_int(env, "EZSSH_LEAVER_INTERVAL", 300, 0, 24 * 3600),
        leaver_risk_level=_risk_level(env),
        **_enrolment_settings(env, tenants),
    )


# Azure AD Graph (retired; Bicep's environment().graph) in the global, US Government, China and Germany
# clouds. Microsoft Graph lives elsewhere: graph.microsoft.com, graph.microsoft.us, ...
AZURE_AD_GRAPH_HOSTS = frozenset(
    {"graph.windows.net", "graph.chinacloudapi.cn", "graph.cloudapi.de", "graph.microsoftazure.de"}
)
DOMAIN_RE = re.compile(r"^(?=.{1,253}$)(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z][a-z0-9-]{0,61}[a-z0-9]$")


def _flag(env: Mapping[str, str], name: str) -> bool:
    raw = (_get(env, name) or "0").lower()
    if raw not in ("0", "1", "true", "false"):
        raise SettingsError(f"Setting {name} must be 1 or 0; got {raw!r}.")
    return raw in ("1", "true")


def _per_tenant(env: Mapping[str, str], name: str, tenants: tuple[str, ...], example: str) -> dict[str, list[str]]:
    """A per-tenant list setting: `<tid>=a,b;<tid>=c`, or `a,b` with one tenant."""
    raw = _get(env, name) or ""
    known = {t.lower() for t in tenants}
    out: dict[str, list[str]] = {}
    for part in (p.strip() for p in raw.split(";") if p.strip()):
        tid, sep, items = part.partition("=")
        if not sep:
            if len(known) != 1:
                raise SettingsError(
                    f"Setting {name}: this deployment serves several tenants, so each entry must "
                    f"name its tenant, as <tenant id>={example};<tenant id>=..."
                )
            tid, items = next(iter(known)), tid
        tid = tid.strip().lower()
        if tid not in known:
            raise SettingsError(f"Setting {name} names tenant {tid!r}, which is not in EZSSH_TENANTS.")
        out.setdefault(tid, []).extend(x.strip() for x in items.split(",") if x.strip())
    return out


def _verified_domains(env: Mapping[str, str], tenants: tuple[str, ...]) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """EZSSH_VERIFIED_DOMAINS: `<tid>=a.com,b.com;<tid>=c.com`, or `a.com,b.com` with one tenant."""
    out = _per_tenant(env, "EZSSH_VERIFIED_DOMAINS", tenants, "contoso.com,contoso.net")
    for d in (x.lower().rstrip(".") for ds in out.values() for x in ds):
        if not DOMAIN_RE.match(d):
            raise SettingsError(f"Setting EZSSH_VERIFIED_DOMAINS: {d!r} is not a domain name.")
    return tuple((t, tuple(dict.fromkeys(x.lower().rstrip(".") for x in ds))) for t, ds in out.items())


def _host_namespaces(env: Mapping[str, str], tenants: tuple[str, ...]) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """EZSSH_HOST_NAMESPACES: `<tid>=*.contoso.internal,10.20.0.0/16;<tid>=...` (core.namespaces)."""
    from .core.errors import InvalidRequest
    from .core.namespaces import parse_namespaces
    from .publicsuffix import is_public_suffix

    out = []
    for tid, items in _per_tenant(env, "EZSSH_HOST_NAMESPACES", tenants, "*.contoso.internal,10.20.0.0/16").items():
        try:
            out.append((tid, tuple(str(n) for n in parse_namespaces(items, is_public_suffix))))
        except InvalidRequest as exc:
            raise SettingsError(f"Setting EZSSH_HOST_NAMESPACES: {exc.message}") from None
    return tuple(out)


ENROL_SCOPE_RE = re.compile(
    rf"^/subscriptions/{GUID}"
    r"(?:/resourceGroups/[-\w.()]{1,90})?$",
    re.IGNORECASE,
)


def _enrolment_settings(env: Mapping[str, str], tenants: tuple[str, ...] = ()) -> dict:
    """EZSSH_ENROL_SCOPES, EZSSH_ARM_ENDPOINT and EZSSH_PUBLIC_URL (hosts: push and auto-enrolment).

    A scope may be qualified with the one tenant whose policies may push into it
    (`<tenant id>=/subscriptions/...`); with several tenants every scope must be, so that one
    tenant's admins can never push their CA onto another tenant's VMs."""
    raw = _get(env, "EZSSH_ENROL_SCOPES") or ""
    scopes = tuple(s.strip().rstrip("/") for s in raw.split(",") if s.strip())
    known = {t.lower() for t in tenants}
    bad = []
    for entry in scopes:
        tid, sep, scope = entry.partition("=")
        scope = scope if sep else tid
        if not ENROL_SCOPE_RE.match(scope.strip()) or scope.endswith(".") or (sep and tid.strip().lower() not in known):
            bad.append(entry)
    if bad:
        raise SettingsError(
            "Setting EZSSH_ENROL_SCOPES must list /subscriptions/<guid> or /subscriptions/<guid>/resourceGroups/<name>, "
            f"each optionally as <tenant id>=<scope> with a tenant from EZSSH_TENANTS; not valid: {', '.join(bad)}."
        )
    if len(known) > 1 and any("=" not in s for s in scopes):
        raise SettingsError(
            "Setting EZSSH_ENROL_SCOPES: this deployment serves several tenants, so each scope must name the tenant "
            "whose policies may push into it, as <tenant id>=/subscriptions/..."
        )
    arm = (_get(env, "EZSSH_ARM_ENDPOINT") or "https://management.azure.com").rstrip("/")
    if not arm.startswith("https://"):
        raise SettingsError("Setting EZSSH_ARM_ENDPOINT must be an https URL.")
    public = _get(env, "EZSSH_PUBLIC_URL")
    if public is None and env.get("WEBSITE_HOSTNAME", "").strip():  # set by the Functions platform
        public = f"https://{env['WEBSITE_HOSTNAME'].strip()}"
    if public is not None:
        public = public.rstrip("/")
        if not re.match(r"^https?://[A-Za-z0-9.\-\[\]:]+$", public):
            raise SettingsError(
                "Setting EZSSH_PUBLIC_URL must be an http(s) URL with no path, e.g. https://ezssh.example.net."
            )
    graph = (_get(env, "EZSSH_GRAPH_ENDPOINT") or "https://graph.microsoft.com").rstrip("/")
    if not graph.startswith("https://"):
        raise SettingsError("Setting EZSSH_GRAPH_ENDPOINT must be an https URL.")
    host = graph[len("https://") :].split("/", 1)[0].split(":", 1)[0].lower()
    if host in AZURE_AD_GRAPH_HOSTS:
        raise SettingsError(
            f"Setting EZSSH_GRAPH_ENDPOINT names {host}, the retired Azure AD Graph (what Bicep's environment().graph "
            "returns); use the Microsoft Graph root of your cloud, e.g. https://graph.microsoft.com."
        )
    vm_host_certs = (_get(env, "EZSSH_VM_HOST_CERTS") or "on").strip().lower()
    if vm_host_certs not in ("on", "off"):
        raise SettingsError("Setting EZSSH_VM_HOST_CERTS must be on or off.")
    return {
        "enrol_scopes": scopes,
        "arm_endpoint": arm,
        "public_url": public,
        "graph_endpoint": graph,
        "vm_host_certs": vm_host_certs == "on",
    }
