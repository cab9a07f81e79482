"""The only module that builds concrete adapters. Runs once per worker (the API calls it lazily)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from typing import TYPE_CHECKING, Any

from .health import Health
from .identity import TokenValidator
from .service import Service, ServiceConfig
from .service.identities import SweepConfig
from .settings import Settings, SettingsError, load_settings
from .signing.base import check_kind

if TYPE_CHECKING:
    from azure.core.credentials import AccessToken, TokenCredential
    from azure.identity import DefaultAzureCredential
    from azure.mgmt.compute import ComputeManagementClient
    from fastapi import FastAPI

    from .graph import GraphDirectory, GraphGroups
    from .service.enrolment import EnrolmentService
    from .signing.base import KeyStore, LateKeyStore
    from .storage.queue import JobQueue
    from .storage.tables import TableStore

log = logging.getLogger("ezssh.wiring")


@dataclass
class Context:
    """One worker's settings and the objects built from them, shared by the HTTP app and the
    timer, Event Grid and queue functions."""

    settings: Settings
    service: Service
    validator: TokenValidator
    enrolments: EnrolmentService | None = None  # push to Azure VMs
    _health: Health | None = field(default=None, repr=False)

    @property
    def health(self) -> Health:
        """GET /api/health's probes (functions/health.py): storage, the signing backend, the job
        queue where there is one, and each tenant's identity provider keys."""
        if self._health is None:
            probes: dict[str, Callable[[], None]] = {
                "storage": self.service.store.health,
                "signer": self.service.keys.health,
            }
            queue = getattr(self.enrolments, "queue", None)
            if queue is not None:
                probes["queue"] = queue.health
            for tid in self.settings.tenants:
                probes[f"identity:{tid}"] = partial(self.validator.check_issuer, tid)
            self._health = Health(probes)
        return self._health


def _credential(settings: Settings) -> DefaultAzureCredential:
    from azure.identity import DefaultAzureCredential

    return DefaultAzureCredential(managed_identity_client_id=settings.managed_identity_client_id)


# azure-core logs every request's and response's headers at INFO through this logger; under the
# Functions host the root logger is at INFO, so each storage and Key Vault call would format and
# ship a multi-line record. Quiet unless somebody set its level on purpose.
HTTP_LOGGER = "azure.core.pipeline.policies.http_logging_policy"


def quiet_sdk_http_logging() -> None:
    lg = logging.getLogger(HTTP_LOGGER)
    if lg.level == logging.NOTSET:
        lg.setLevel(logging.WARNING)


def build_store(settings: Settings) -> TableStore:
    from .storage.tables import TableStore

    if settings.storage_connection_string:
        store = TableStore.from_connection_string(settings.storage_connection_string, settings.table_name)
    elif settings.storage_account_url:
        store = TableStore.from_account_url(settings.storage_account_url, _credential(settings), settings.table_name)
    else:
        raise SettingsError("Set EZSSH_STORAGE_CONNECTION_STRING or EZSSH_STORAGE_ACCOUNT_URL.")
    store.ensure_table()
    return store


def _required(value: str | None, name: str) -> str:
    """A setting load_settings requires for the configured signer backend."""
    if not value:
        raise SettingsError(f"Setting {name} is required for this signer backend.")
    return value


def build_keystore(settings: Settings) -> LateKeyStore:
    """The CA key store, built on first use: a worker whose HSM login fails still starts (and
    answers 503 signer_unavailable, audited) and tries the HSM again a moment later."""
    from .signing.base import LateKeyStore

    def build() -> KeyStore:
        if settings.signer_backend == "pkcs11":
            from .signing.pkcs11 import Pkcs11KeyStore

            return Pkcs11KeyStore(
                _required(settings.pkcs11_module, "EZSSH_PKCS11_MODULE"),
                _required(settings.pkcs11_token_label, "EZSSH_PKCS11_TOKEN_LABEL"),
                _required(settings.pkcs11_pin, "EZSSH_PKCS11_PIN"),
            )
        from .signing.keyvault import KeyVaultKeyStore

        return KeyVaultKeyStore(_required(settings.keyvault_url, "EZSSH_KEYVAULT_URL"), _credential(settings))

    return LateKeyStore(build)


class _LazyCredential:
    """The managed identity, built when Graph is first asked (never at start)."""

    def __init__(self, settings: Settings, credential: TokenCredential | None = None) -> None:
        self._settings = settings
        self._cred = credential

    def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken:
        if self._cred is None:
            self._cred = _credential(self._settings)
        return self._cred.get_token(*scopes, **kwargs)


def build_graph_groups(
    settings: Settings, credential: TokenCredential | None = None, verify: bool | str = True
) -> GraphGroups:
    """Group lookups for users in too many groups for their token, with the managed identity.
    The credential is only asked for a token when such a user first signs in."""
    from .graph import GraphGroups

    return GraphGroups(settings.graph_endpoint, _LazyCredential(settings, credential), verify=verify)


def build_graph_directory(
    settings: Settings, credential: TokenCredential | None = None, verify: bool | str = True
) -> GraphDirectory:
    """Who may still sign in (the leaver sweep), with the managed identity, asked only when it runs."""
    from .graph import GraphDirectory

    return GraphDirectory(settings.graph_endpoint, _LazyCredential(settings, credential), verify=verify)


def service_config(settings: Settings, **overrides: Any) -> ServiceConfig:
    """The service's configuration from the settings (one place; `overrides` for another backend)."""
    return replace(
        ServiceConfig(
            signer_backend=settings.signer_backend,
            ca_key_kind=check_kind(settings.ca_key_kind),
            max_ttl_ceiling=settings.max_ttl_ceiling,
            backdate_seconds=settings.backdate_seconds,
            webhook_allow_loopback_http=settings.webhook_allow_loopback_http,
            max_pending_requests=settings.max_pending_requests,
            request_rate=settings.request_rate,
            host_namespaces=settings.host_namespaces,
            public_url=settings.public_url,
        ),
        **overrides,
    )


def build_context(settings: Settings | None = None) -> Context:
    settings = settings or load_settings()
    quiet_sdk_http_logging()
    store = build_store(settings)
    from .notify import WebhookNotifier

    service = Service(
        store,
        build_keystore(settings),
        service_config(settings),
        notifier=WebhookNotifier(store.add_audit, allow_loopback_http=settings.webhook_allow_loopback_http),
        directory=build_graph_directory(settings),
        sweep=SweepConfig(settings.leaver_interval, settings.leaver_risk_level),
    )
    validator = TokenValidator(settings, groups=build_graph_groups(settings))
    validator.warm()
    log.info("ezssh ready: tenants=%s signer=%s", ",".join(settings.tenants), settings.signer_backend)
    return Context(
        settings=settings, service=service, validator=validator, enrolments=build_enrolments(settings, service, store)
    )


_context: list[Context] = []
_context_lock = threading.Lock()


def shared_context() -> Context:
    """The worker's one context, shared by the HTTP app and the timer/Event Grid functions."""
    if not _context:
        with _context_lock:
            if not _context:
                _context.append(build_context())
    return _context[0]


_monitoring: list[bool] = []


def configure_monitoring() -> None:
    """Switch on Azure Monitor OpenTelemetry when APPLICATIONINSIGHTS_CONNECTION_STRING is set.

    It must run before the FastAPI app is created so that its instrumentation sees the app; so it
    reads that one variable at import time instead of waiting for Settings. The exporter reads
    APPLICATIONINSIGHTS_AUTHENTICATION_STRING itself (Entra auth with the managed identity)."""
    import os

    if _monitoring or not os.environ.get("APPLICATIONINSIGHTS_CONNECTION_STRING", "").strip():
        return
    from azure.monitor.opentelemetry import configure_azure_monitor

    configure_azure_monitor(logger_name="ezssh")
    _monitoring.append(True)


def asgi_app() -> FastAPI:
    """The ASGI app with production wiring (uvicorn: `functions.wiring:asgi_app --factory`)."""
    from .api.app import create_app

    configure_monitoring()
    ezssh_log = logging.getLogger("ezssh")
    ezssh_log.setLevel(logging.INFO)
    if not logging.getLogger().handlers and not ezssh_log.handlers:
        # Under uvicorn nobody configures the root logger; the Functions worker does.
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
        ezssh_log.addHandler(handler)
    return create_app(shared_context)


def build_compute_client_factory(
    settings: Settings, credential: TokenCredential | None = None, connection_verify: str | None = None
) -> Callable[[str], ComputeManagementClient]:
    """subscription id -> ComputeManagementClient, each built on first use and kept for the worker."""
    clients: dict[str, ComputeManagementClient] = {}
    lock = threading.Lock()

    def client_for(subscription: str) -> ComputeManagementClient:
        with lock:
            if subscription not in clients:
                from azure.mgmt.compute import ComputeManagementClient

                kw: dict[str, Any] = {"connection_verify": connection_verify} if connection_verify else {}
                clients[subscription] = ComputeManagementClient(
                    credential or _credential(settings),
                    subscription,
                    base_url=settings.arm_endpoint,
                    credential_scopes=[f"{settings.arm_endpoint}/.default"],
                    **kw,
                )
            return clients[subscription]

    return client_for


def build_job_queue(settings: Settings, credential: TokenCredential | None = None) -> JobQueue | None:
    """The enrolment job queue (and its poison queue), or None when no queue is configured."""
    from .storage.queue import JobQueue

    if settings.queue_account_url:
        queue = JobQueue.from_account_url(settings.queue_account_url, credential or _credential(settings))
    elif settings.queue_configured and settings.storage_connection_string:
        queue = JobQueue.from_connection_string(settings.storage_connection_string)
    else:
        log.warning("no enrolment job queue configured (EZSSH_QUEUE_ACCOUNT_URL): enrolment is off")
        return None
    queue.ensure()
    return queue


def build_enrolments(
    settings: Settings,
    service: Service,
    store: TableStore,
    *,
    credential: TokenCredential | None = None,
    connection_verify: str | None = None,
    polling_interval: float | None = None,
    queue: JobQueue | None = None,
) -> EnrolmentService:
    """The enrolment service; its compute client (and credential) are built on first use."""
    from .hosts.azure_vms import AzureVms
    from .hosts.vm_hostcerts import VmHostCerts
    from .service.enrolment import EnrolConfig, EnrolmentService
    from .storage.enrolmentjobs import JobStore
    from .storage.enrolments import EnrolmentStore

    factory = build_compute_client_factory(settings, credential, connection_verify)
    return EnrolmentService(
        service.base,
        service.hosts,
        EnrolmentStore(store),
        lambda: AzureVms(factory, polling_interval=polling_interval),
        EnrolConfig(scopes=settings.enrol_scopes, tenants=settings.tenants, public_url=settings.public_url),
        clock=service.clock,
        jobs=JobStore(store),
        queue=queue if queue is not None else build_job_queue(settings),
        host_certs=VmHostCerts(service.hostcerts) if settings.vm_host_certs else None,
    )
