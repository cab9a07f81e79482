"""Structural checks of infra/*.bicep, standing in for the compiler we cannot run here.

They catch what a reviewer would: a module path or parameter that does not exist, an output read
from a module that does not declare it, role ids as bare literals, role assignment names that are
not deterministic, a secret or account key in app settings, a vault without RBAC or purge
protection, the wrong runtime, and an Event Grid subscription that would not reach enrol_vm_event.
"""

from __future__ import annotations

import json
import re

import pytest

from . import (
    FUNCTIONAPP_BICEP,
    INFRA,
    MAIN_BICEP,
    MODULES,
    PARAMETERS_JSON,
    Bicep,
    all_bicep,
    app_settings,
)

# Built-in role definition ids, from Microsoft's "Azure built-in roles" reference.
ROLE_IDS = {
    "storageTableDataContributorRoleId": "0a9a7e1f-b9d0-4cc4-a60d-0319b160aaa3",  # Storage Table Data Contributor
    "keyVaultCryptoOfficerRoleId": "14b46e9e-c2b7-41b4-b07b-48a6ebf60603",  # Key Vault Crypto Officer
    "virtualMachineContributorRoleId": "9980e02c-c2be-4d73-94e8-173b1dc7cf3c",  # Virtual Machine Contributor
    "storageBlobDataOwnerRoleId": "b7e6dc6d-f1e8-4753-8033-0f276bb0955b",  # Storage Blob Data Owner
    "monitoringMetricsPublisherRoleId": "3913510d-42f4-4e42-8a64-420c390055eb",  # Monitoring Metrics Publisher
    "storageQueueDataContributorRoleId": "974c5e8b-45b9-4653-ba55-5f855dd0fb88",  # Storage Queue Data Contributor
}
GUID = r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"

FILES = all_bicep()
BY_PATH = {b.path.resolve(): b for b in FILES}
MAIN = Bicep(MAIN_BICEP)
FUNCAPP = Bicep(FUNCTIONAPP_BICEP)


def ids(files):
    return [str(b.path.relative_to(INFRA)) for b in files]


def test_layout():
    assert MAIN_BICEP.is_file() and (MODULES / "rbac.bicep").is_file()
    assert MAIN.target_scope == "subscription", "main.bicep creates the resource group, so it deploys at subscription scope"


def test_lexer_sees_balanced_blocks():
    from . import block_end, lex

    code, masked = lex("var a = '${x ? 'b{' : '}c'}' // }\nvar b = { k: [ '}' ] }\n")
    assert "//" not in code and "}" not in masked.splitlines()[0]
    assert block_end(masked, masked.index("{")) == len(masked.rstrip("\n"))


@pytest.mark.parametrize("bicep", FILES, ids=ids(FILES))
def test_modules_exist_and_get_only_their_parameters(bicep: Bicep):
    for mod in bicep.modules:
        assert mod["path"].is_file(), f"{bicep.path.name}: module {mod['symbol']} names {mod['ref']}, which does not exist"
        target = BY_PATH.get(mod["path"]) or Bicep(mod["path"])
        unknown = sorted(set(mod["params"]) - set(target.params))
        assert not unknown, f"{bicep.path.name}: module {mod['symbol']} passes {unknown}, not params of {mod['ref']}"
        missing = sorted(p for p, has_default in target.params.items() if not has_default and p not in mod["params"])
        assert not missing, f"{bicep.path.name}: module {mod['symbol']} omits required params {missing} of {mod['ref']}"


@pytest.mark.parametrize("bicep", FILES, ids=ids(FILES))
def test_module_outputs_read_exist(bicep: Bicep):
    symbols = {m["symbol"]: BY_PATH.get(m["path"]) or Bicep(m["path"]) for m in bicep.modules}
    for sym, out in re.findall(r"\b(\w+)!?\.outputs\.(\w+)", bicep.code):
        assert sym in symbols, f"{bicep.path.name}: {sym}.outputs.{out} reads a module that is not declared"
        assert out in symbols[sym].outputs, f"{bicep.path.name}: {sym}.outputs.{out}: {symbols[sym].path.name} has no output {out}"


def test_every_module_file_is_used():
    used = {m["path"] for b in FILES for m in b.modules}
    orphans = sorted(p.name for p in MODULES.glob("*.bicep") if p.resolve() not in used)
    assert not orphans, f"modules nothing deploys: {orphans}"


@pytest.mark.parametrize("bicep", FILES, ids=ids(FILES))
def test_parameters_are_used(bicep: Bicep):
    for p in bicep.params:
        uses = re.findall(r"\b" + re.escape(p) + r"\b", bicep.code)
        assert len(uses) > 1, f"{bicep.path.name}: param {p} is declared but never used"


def test_main_parameters_file_matches_main():
    doc = json.loads(PARAMETERS_JSON.read_text())
    given = set(doc["parameters"])
    unknown = sorted(given - set(MAIN.params))
    assert not unknown, f"main.parameters.json sets {unknown}, which main.bicep does not declare"
    required = sorted(p for p, has_default in MAIN.params.items() if not has_default)
    missing = [p for p in required if p not in given]
    assert not missing, f"main.parameters.json lacks required params {missing}"


def test_role_ids_are_named_variables_with_the_documented_guids():
    found: dict[str, set[str]] = {}
    for b in FILES:
        for name, value in b.variables.items():
            m = re.fullmatch(r"'(" + GUID + r")'", value)
            if m and name.endswith("RoleId"):
                found.setdefault(name, set()).add(m.group(1).lower())
    for name, guid in ROLE_IDS.items():
        assert found.get(name) == {guid}, f"variable {name} should be '{guid}'; found {found.get(name)}"
    rbac = Bicep(MODULES / "rbac.bicep")
    for name in ("storageTableDataContributorRoleId", "keyVaultCryptoOfficerRoleId"):
        assert name in rbac.variables, f"rbac.bicep should name {name}"


@pytest.mark.parametrize("bicep", FILES, ids=ids(FILES))
def test_role_assignments_use_guid_names_and_no_literal_role_ids(bicep: Bicep):
    for sym, _type, block in bicep.resources("Microsoft.Authorization/roleAssignments@"):
        assert re.search(r"^\s*name\s*:\s*guid\(", block, re.M), f"{bicep.path.name}: {sym} needs name: guid(...)"
        rd = re.search(r"^\s*roleDefinitionId\s*:\s*(.+)$", block, re.M)
        assert rd, f"{bicep.path.name}: {sym} has no roleDefinitionId"
        assert not re.search(GUID, rd.group(1)), f"{bicep.path.name}: {sym} uses a literal role id; name it in a variable"
        assert "principalType: 'ServicePrincipal'" in block, f"{bicep.path.name}: {sym} should say principalType ServicePrincipal"


def test_identity_gets_the_documented_roles():
    rbac = Bicep(MODULES / "rbac.bicep")
    blocks = [b for _, _, b in rbac.resources("Microsoft.Authorization/roleAssignments@")]
    for var, scope in (("storageTableDataContributorRoleId", "storageAccount"), ("keyVaultCryptoOfficerRoleId", "vault")):
        assert any(re.search(r"^\s*scope:\s*" + scope + r"$", b, re.M) and var in b for b in blocks), \
            f"rbac.bicep should assign {var} on {scope}"
    vm_assign = [b for f in FILES if f.path.name.startswith("rbac-vm") for _, _, b in f.resources("Microsoft.Authorization/roleAssignments@")]
    assert len(vm_assign) == 2, "VM access: one assignment for resource-group scopes, one for subscription scopes"
    assert "virtualMachineContributorRoleId" in MAIN.code and "vmScopes" in MAIN.params
    actions = re.search(r"^var runCommandActions = \[(.*?)^\]", MAIN.code, re.M | re.S).group(1)
    for action in ("Microsoft.Compute/virtualMachines/runCommand/action", "Microsoft.Compute/virtualMachines/read"):
        assert f"'{action}'" in actions
    assert "*" not in actions, "the custom role lists actions, no wildcards"
    for f in ("vm-role.bicep", "vm-role-rg.bicep"):
        assert "actions: actions" in Bicep(MODULES / f).code, f"{f} takes its actions from main.bicep"


def test_no_secrets_or_account_keys():
    for b in FILES:
        for bad in ("AccountKey", "listKeys(", "listSecrets(", "listConnectionStrings(", "SharedAccessSignature",
                    "InstrumentationKey=", "AccountEndpoint=", "@secure()"):
            assert bad not in b.code, f"{b.path.name} contains {bad}"
    settings = app_settings()
    assert settings, "functionapp.bicep: var appSettings not found"
    assert "AzureWebJobsStorage" not in settings, "host storage must use the identity (AzureWebJobsStorage__*ServiceUri)"
    assert settings.get("AzureWebJobsStorage__credential") == "'managedidentity'"
    assert "AzureWebJobsStorage__clientId" in settings
    # the service URIs of the account itself (sovereign clouds): never the account name, which the
    # host turns into a global-cloud core.windows.net address
    assert "AzureWebJobsStorage__accountName" not in settings
    assert {settings.get(f"AzureWebJobsStorage__{s}ServiceUri") for s in ("blob", "queue", "table")} == \
        {"blobEndpoint", "queueEndpoint", "tableEndpoint"}
    for name, value in settings.items():
        assert not re.search(r"(?i)password|secret|pin\b", name), f"app setting {name} looks like a secret"
    assert settings["APPLICATIONINSIGHTS_AUTHENTICATION_STRING"] == "'ClientId=${identityClientId};Authorization=AAD'"
    assert settings["AZURE_CLIENT_ID"] == "identityClientId"


def test_storage_account_is_locked_down():
    code = Bicep(MODULES / "storage.bicep").code
    for line in ("allowSharedKeyAccess: false", "minimumTlsVersion: 'TLS1_2'", "allowBlobPublicAccess: false",
                 "supportsHttpsTrafficOnly: true"):
        assert line in code, f"storage.bicep should set {line}"
    assert "Microsoft.Storage/storageAccounts/tableServices/tables@" in code


def test_key_vault_is_premium_rbac_with_purge_protection():
    code = Bicep(MODULES / "keyvault.bicep").code
    for line in ("enableRbacAuthorization: true", "enablePurgeProtection: true", "enableSoftDelete: true",
                 "name: 'premium'"):
        assert line in code, f"keyvault.bicep should set {line}"
    assert "accessPolicies" not in code
    assert "managedHsmUrl" in MAIN.params, "an existing Managed HSM can replace the vault"


def test_function_app_is_python_311_on_linux_flex_consumption():
    code = FUNCAPP.code
    assert "kind: 'functionapp,linux'" in code
    assert "reserved: true" in code
    assert re.search(r"name:\s*'FC1'\s*\n\s*tier:\s*'FlexConsumption'", code)
    assert re.search(r"runtime:\s*\{\s*name:\s*'python'\s*\n\s*version:\s*'3\.11'", code)
    assert "type: 'blobContainer'" in code and "type: 'UserAssignedIdentity'" in code, "run from the package container, by identity"
    assert "httpsOnly: true" in code and "minTlsVersion: '1.2'" in code
    assert "type: 'UserAssigned'" in code
    settings = app_settings()
    for flex_refuses in ("FUNCTIONS_WORKER_RUNTIME", "FUNCTIONS_EXTENSION_VERSION", "WEBSITE_RUN_FROM_PACKAGE"):
        assert flex_refuses not in settings, f"{flex_refuses} is not an app setting on Flex Consumption"
    assert settings["EZSSH_SIGNER_BACKEND"] == "'keyvault'"


def test_application_insights_uses_entra_auth_only():
    code = Bicep(MODULES / "monitoring.bicep").code
    assert "DisableLocalAuth: true" in code and "WorkspaceResourceId: workspace.id" in code


def test_event_grid_subscription_reaches_enrol_vm_event_for_vm_writes_only():
    topic = Bicep(MODULES / "events-topic.bicep").code
    assert "topicType: 'Microsoft.Resources.Subscriptions'" in topic and "source: subscription().id" in topic
    events = Bicep(MODULES / "events.bicep")
    code = events.code
    assert re.search(r"resource topic 'Microsoft.EventGrid/systemTopics@[\d-]+' existing", code)
    assert "endpointType: 'AzureFunction'" in code
    assert "resourceId: '${functionAppId}/functions/${functionName}'" in code
    assert re.search(r"^param functionName string = 'enrol_vm_event'$", code, re.M)
    assert "'Microsoft.Resources.ResourceWriteSuccess'" in code
    assert re.search(r"operatorType:\s*'StringIn'\s*\n\s*key:\s*'data.operationName'\s*\n\s*values:\s*\[\s*\n\s*"
                     r"'Microsoft.Compute/virtualMachines/write'\s*\n\s*\]", code)


def test_outputs_give_users_the_server_url():
    assert {"apiUrl", "configureCommand", "clientConfig", "managedIdentityPrincipalId"} <= MAIN.outputs
    assert "output apiUrl string = 'https://${functionApp.outputs.defaultHostName}'" in MAIN.code
