"""Every setting functions/settings.py reads is set in Azure (the Bicep app settings) and listed in
local.settings.example.json, and neither file sets an EZSSH_* setting the service does not read."""

from __future__ import annotations

import json

import pytest

from functions.settings import SETTINGS, load_settings

from . import LOCAL_SETTINGS_EXAMPLE, app_settings

# Settings that exist for the local stack only, and must NOT be set in Azure.
LOCAL_ONLY = {
    "EZSSH_STORAGE_CONNECTION_STRING": "Azure reaches Table Storage by EZSSH_STORAGE_ACCOUNT_URL and the managed "
                                       "identity; the account allows no shared key, so no connection string exists",
    "EZSSH_PKCS11_MODULE": "Azure signs with Key Vault / Managed HSM (EZSSH_SIGNER_BACKEND=keyvault), not PKCS#11",
    "EZSSH_PKCS11_TOKEN_LABEL": "PKCS#11 backend only (SoftHSM locally)",
    "EZSSH_PKCS11_PIN": "PKCS#11 backend only; a PIN would be a secret in app settings",
    "EZSSH_OIDC_CA_BUNDLE": "Entra ID's TLS chains to public roots; only the local OIDC stand-in's dev CA needs it",
    "EZSSH_WEBHOOK_ALLOW_LOOPBACK_HTTP": "plain-http webhooks to loopback exist for a local receiver only",
}


def example_values() -> dict[str, str]:
    doc = json.loads(LOCAL_SETTINGS_EXAMPLE.read_text())
    assert doc.get("IsEncrypted") is False
    return doc["Values"]


def test_local_only_list_is_current():
    stale = sorted(set(LOCAL_ONLY) - set(SETTINGS))
    assert not stale, f"LOCAL_ONLY names settings settings.py no longer has: {stale}"


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_setting_is_in_local_settings_example(name):
    assert name in example_values(), f"{name} ({SETTINGS[name]}) is missing from local.settings.example.json"


@pytest.mark.parametrize("name", sorted(set(SETTINGS) - set(LOCAL_ONLY)))
def test_setting_is_set_by_bicep(name):
    assert name in app_settings(), (
        f"{name} ({SETTINGS[name]}) is not set in infra/modules/functionapp.bicep appSettings; "
        f"set it there, or list it in LOCAL_ONLY with the reason"
    )


@pytest.mark.parametrize("name", sorted(LOCAL_ONLY))
def test_local_only_setting_is_not_set_in_azure(name):
    assert name not in app_settings(), f"{name} is local-only: {LOCAL_ONLY[name]}"


def test_nothing_unused():
    for where, names in (("local.settings.example.json", example_values()), ("functionapp.bicep", app_settings())):
        unused = sorted(n for n in names if n.startswith("EZSSH_") and n not in SETTINGS)
        assert not unused, f"{where} sets {unused}, which functions/settings.py does not read"
    assert example_values()["FUNCTIONS_WORKER_RUNTIME"] == "python"
    assert "AzureWebJobsStorage" in example_values()


def test_bicep_settings_validate_as_the_azure_combination():
    """The app settings Bicep sets, with plausible values, load: storage by URL, keyvault signer."""
    samples = {
        "EZSSH_TENANTS": "72f988bf-86f1-41af-91ab-2d7cd011db47",
        "EZSSH_ISSUER_TEMPLATE": "https://login.microsoftonline.com/{tid}/v2.0",
        "EZSSH_API_CLIENT_ID": "11111111-2222-3333-4444-555555555555",
        "EZSSH_API_APP_ID_URI": "api://ezssh",
        "EZSSH_API_SCOPE": "access_as_user",
        "EZSSH_CLI_CLIENT_ID": "66666666-7777-8888-9999-000000000000",
        "EZSSH_STORAGE_ACCOUNT_URL": "https://stezssh.table.core.windows.net/",
        "EZSSH_TABLE_NAME": "ezssh",
        "EZSSH_KEYVAULT_URL": "https://kv-ezssh.vault.azure.net/",
        "EZSSH_CA_KEY_KIND": "EC-P256",
        "EZSSH_MAX_TTL_CEILING": "86400",
        "EZSSH_BACKDATE_SECONDS": "60",
        "AZURE_CLIENT_ID": "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee",
        "EZSSH_ENROL_SCOPES": "/subscriptions/72f988bf-86f1-41af-91ab-2d7cd011db47/resourceGroups/rg-vms",
        "EZSSH_ARM_ENDPOINT": "https://management.azure.com/",
        "EZSSH_PUBLIC_URL": "",
        "APPLICATIONINSIGHTS_CONNECTION_STRING": "InstrumentationKey=00000000-0000-0000-0000-000000000000;"
                                                 "IngestionEndpoint=https://westeurope-5.in.applicationinsights.azure.com/",
    }
    from .bicep_eval import Unsupported
    from .test_deploy_defects import deployed_setting

    env = {}
    for name, value in app_settings().items():
        if value.startswith("'") and value.endswith("'") and "${" not in value:
            env[name] = value[1:-1]  # a literal in the Bicep: use it as is
        elif name in samples:
            env[name] = samples[name]
        else:  # what the template computes for a deployment to global Azure (e.g. EZSSH_GRAPH_ENDPOINT)
            try:
                env[name] = deployed_setting(name)
            except (Unsupported, KeyError):
                pass
    assert "EZSSH_GRAPH_ENDPOINT" in env
    s = load_settings(env)
    assert s.signer_backend == "keyvault" and s.keyvault_url
    assert s.storage_account_url and s.storage_connection_string is None
    assert s.managed_identity_client_id and s.appinsights_connection_string


def test_the_queues_the_bicep_creates_are_the_ones_the_functions_read():
    from tests.functions_host import triggers

    from .bicep_types import parse_bicep
    from . import MODULES

    storage = parse_bicep(MODULES / "storage.bicep")
    name = storage["parameters"]["enrolQueueName"]["default"]
    queues = {r["config"]["name"] for r in storage["resources"].values()
              if r["type"] == "Microsoft.Storage/storageAccounts/queueServices/queues"}
    assert queues == {"enrolQueueName", "${enrolQueueName}-poison"}
    t = triggers()
    assert t["enrol_job"]["queueName"] == name
    assert t["enrol_job_poison"]["queueName"] == f"{name}-poison"  # where the host moves failed messages
    assert t["enrol_job"]["connection"] == "AzureWebJobsStorage"  # the identity-based host storage
    assert "EZSSH_QUEUE_ACCOUNT_URL" in app_settings()


def test_timeouts_agree_with_host_json():
    """Run Command's poll ends inside the function timeout; a record's lease outlives it (a killed
    worker's push is over before anyone else may push); HTTP and Event Grid only queue."""
    import inspect

    from functions.hosts.azure_vms import AzureVms
    from functions.service.enrolment import EnrolConfig
    from tests.queue_host import host_queue_settings

    host = host_queue_settings()
    poll = inspect.signature(AzureVms.__init__).parameters["timeout"].default
    lease = EnrolConfig(scopes=(), tenants=()).lease_seconds
    assert poll < host["function_timeout"] < lease, (poll, host["function_timeout"], lease)
    assert host["function_timeout"] <= 600, "keep it within what every plan allows a queue function (10 min)"
    assert 1 <= host["max_dequeue_count"] <= 10 and host["batch_size"] >= 1
    assert host["encoding"] == "base64"  # what storage/queue.py writes (TextBase64EncodePolicy)
