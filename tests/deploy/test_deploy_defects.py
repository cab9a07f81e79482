"""What a deployment would actually set, computed from the Bicep (pycep-parser + bicep_eval.py)
and checked against Azure's documentation (data/azure-clouds.json) and the service's own settings.

Each test here failed on the template before its fix:
- the Graph endpoint was environment().graph: the retired Azure AD Graph;
- a second Event Grid system topic was created on a subscription that already had one;
- the custom VM role was assignable on whole subscriptions, not only the scopes ezssh enrols in;
- the Key Vault name was fixed, so a redeploy collided with the soft-deleted vault;
- nothing ordered the role assignments before the Function App.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from functions.settings import SettingsError, load_settings

from . import FUNCTIONAPP_BICEP, MAIN_BICEP, MODULES, app_settings
from .bicep_eval import Scope, module_config
from .bicep_types import parse_bicep

CLOUDS = json.loads((Path(__file__).parent / "data" / "azure-clouds.json").read_text())
AZURE_CLOUD = CLOUDS["environment"]["AzureCloud"]
GRAPH_ROOTS = {k: v for k, v in CLOUDS["microsoftGraph"].items() if not k.startswith("_")}
SUB_A, SUB_B, SUB_DEPLOY = ("aaaaaaaa-0000-4000-8000-00000000000a", "bbbbbbbb-0000-4000-8000-00000000000b",
                            "dddddddd-0000-4000-8000-00000000000d")
REQUIRED = {"location": "westeurope", "tenantIds": ["72f988bf-86f1-41af-91ab-2d7cd011db47"],
            "apiClientId": "11111111-2222-3333-4444-555555555555", "cliClientId": "66666666-7777-8888-9999-000000000000"}


def main_scope(**params) -> Scope:
    return Scope.of(MAIN_BICEP, params={**REQUIRED, **params}, environment=AZURE_CLOUD)


def base_env(**over: str) -> dict[str, str]:
    env = {
        "EZSSH_TENANTS": "72f988bf-86f1-41af-91ab-2d7cd011db47", "EZSSH_API_CLIENT_ID": "x", "EZSSH_CLI_CLIENT_ID": "y",
        "EZSSH_STORAGE_ACCOUNT_URL": "https://st.table.core.windows.net/", "EZSSH_SIGNER_BACKEND": "keyvault",
        "EZSSH_KEYVAULT_URL": "https://kv.vault.azure.net/",
    }
    env.update(over)
    return env


def deployed_setting(name: str, **params) -> str:
    """The value the Function App gets for an app setting, as main.bicep + functionapp.bicep compute it."""
    expr = parse_bicep(FUNCTIONAPP_BICEP)
    entry = next(e for e in expr["variables"]["appSettings"]["value"] if e["name"] == name)
    value = entry["value"]
    fa = parse_bicep(FUNCTIONAPP_BICEP)
    main = main_scope(**params)
    if isinstance(value, str) and value in (fa.get("parameters") or {}):
        cfg, _, _ = module_config(main.doc, "functionApp")
        return main.eval(cfg["params"][value])
    return Scope(fa, environment=AZURE_CLOUD).eval(value)


# ---- Microsoft Graph, not the retired Azure AD Graph ------------------------------------------------


def test_settings_refuse_the_azure_ad_graph_that_environment_graph_names():
    retired = AZURE_CLOUD["graph"]  # what the documentation says environment().graph is
    with pytest.raises(SettingsError) as err:
        load_settings(base_env(EZSSH_GRAPH_ENDPOINT=retired))
    assert "EZSSH_GRAPH_ENDPOINT" in err.value.message and "Azure AD Graph" in err.value.message
    for root in GRAPH_ROOTS.values():  # every documented Microsoft Graph root is accepted
        assert load_settings(base_env(EZSSH_GRAPH_ENDPOINT=root)).graph_endpoint == root


def test_the_deployed_graph_endpoint_is_microsoft_graph_of_the_cloud():
    value = deployed_setting("EZSSH_GRAPH_ENDPOINT")
    assert value != AZURE_CLOUD["graph"]
    expected = GRAPH_ROOTS[CLOUDS["microsoftGraphOfCloud"][AZURE_CLOUD["name"]]]
    assert value.rstrip("/") == expected
    assert load_settings(base_env(EZSSH_GRAPH_ENDPOINT=value)).graph_endpoint == expected
    # an explicit parameter wins (US Government L5 has its own root)
    assert deployed_setting("EZSSH_GRAPH_ENDPOINT", graphEndpoint=GRAPH_ROOTS["usGovL5"]) == GRAPH_ROOTS["usGovL5"]


def test_each_cloud_the_template_knows_maps_to_its_documented_graph_root():
    table = main_scope().var("microsoftGraphByCloud")
    documented = {cloud: GRAPH_ROOTS[key] for cloud, key in CLOUDS["microsoftGraphOfCloud"].items()
                  if not cloud.startswith("_")}
    assert table == documented


def test_the_arm_endpoint_setting_is_the_documented_resource_manager():
    value = deployed_setting("EZSSH_ARM_ENDPOINT")
    assert value == AZURE_CLOUD["resourceManager"]
    assert load_settings(base_env(EZSSH_ARM_ENDPOINT=value)).arm_endpoint == value.rstrip("/")


# ---- Event Grid: one system topic per source --------------------------------------------------------


def test_an_existing_system_topic_is_reused_not_created_again():
    events = parse_bicep(MODULES / "events.bicep")
    [topic] = [r for r in events["resources"].values() if r["type"] == "Microsoft.EventGrid/systemTopics"]
    assert topic["existing"], "events.bicep subscribes on a topic it does not create"
    doc = main_scope().doc
    _, _, create_cond = module_config(doc, "eventsTopic")
    cfg, _, sub_cond = module_config(doc, "events")
    creates = [m for m, d in doc["modules"].items()
               if d["detail"]["path"] != "modules/events-topic.bicep"
               and any(r["type"] == "Microsoft.EventGrid/systemTopics" and not r["existing"]
                       for r in parse_bicep(MAIN_BICEP.parent / d["detail"]["path"]).get("resources", {}).values())]
    assert creates == [], f"only events-topic.bicep may create a system topic: {creates}"

    reuse = main_scope(enableVmEvents=True, existingVmEventsTopicName="evgt-already-there",
                       existingVmEventsTopicResourceGroup="rg-platform")
    assert reuse.eval(create_cond) is False and reuse.eval(sub_cond) is True
    assert reuse.eval(cfg["params"]["topicName"]) == "evgt-already-there"
    assert reuse.eval(cfg["scope"]["function"]["parameters"]["resource_group_name"]) == "rg-platform"

    fresh = main_scope(enableVmEvents=True)
    topic_cfg, _, _ = module_config(doc, "eventsTopic")
    assert fresh.eval(create_cond) is True
    assert cfg["params"]["topicName"] == topic_cfg["params"]["topicName"] == "vmEventsTopicName"  # the one it creates
    assert fresh.eval(cfg["scope"]["function"]["parameters"]["resource_group_name"]) == fresh.name("resourceGroupName")
    off = main_scope()
    assert off.eval(create_cond) is False and off.eval(sub_cond) is False


# ---- the VM role: assignable where ezssh enrols, nowhere else --------------------------------------


VM_SCOPES = [f"/subscriptions/{SUB_A}/resourceGroups/rg-web", f"/subscriptions/{SUB_A}/resourceGroups/rg-db",
             f"/subscriptions/{SUB_B}"]


def role_deployments(main: Scope) -> list[tuple[str, str, list[str]]]:
    """(module, the scope it deploys at, the role's assignable scopes) for each custom VM role."""
    out = []
    for symbol in ("runCommandRoles", "runCommandRolesInGroups"):
        cfg, loop, cond = module_config(main.doc, symbol)
        assert cond is None and loop is not None
        for x in main.eval(loop["array_name"]):
            one = main.with_(**{loop["item_name"]: x})
            fn = cfg["scope"]["function"]
            args = fn["parameters"]
            if fn["type"] == "subscription":
                at = f"/subscriptions/{one.eval(args['subscription_id'])}"
            else:
                assert fn["type"] == "resource_group", fn
                at = f"/subscriptions/{one.eval(args['subscription_id'])}/resourceGroups/{one.eval(args['resource_group_name'])}"
            out.append((symbol, at, one.eval(cfg["params"]["assignableScopes"])))
    return out


def test_the_custom_vm_role_is_assignable_only_on_vm_scopes_and_created_there():
    main = main_scope(vmScopes=VM_SCOPES)
    deployed = role_deployments(main)
    # one role per subscription; each assignable exactly on that subscription's vmScopes
    assert sorted((at.split("/")[2], tuple(scopes)) for _, at, scopes in deployed) == \
        [(SUB_A, tuple(VM_SCOPES[:2])), (SUB_B, tuple(VM_SCOPES[2:]))]
    for _, at, scopes in deployed:
        assert at in scopes or at.rsplit("/resourceGroups/", 1)[0] in scopes, \
            f"deployed at {at}, which vmScopes does not name: the deployer may have no rights there"
    by_group = [d for d in deployed if d[0] == "runCommandRolesInGroups"]
    assert [at for _, at, _ in by_group] == [VM_SCOPES[0]], "only resource groups named: deployed into one of them"
    for symbol, path in (("runCommandRoles", "vm-role.bicep"), ("runCommandRolesInGroups", "vm-role-rg.bicep")):
        role = parse_bicep(MODULES / path)
        assert role["resources"]["runCommandRole"]["config"]["properties"]["assignableScopes"] == "assignableScopes"
        assert module_config(main.doc, symbol)[0]["params"]["actions"] == "runCommandActions"
    # a subscription named whole: deployed at it (vmScopes names it, so the deployer has rights there)
    whole = main_scope(vmScopes=[f"/subscriptions/{SUB_B}", f"/subscriptions/{SUB_B}/resourceGroups/rg-x"])
    assert [(s, at) for s, at, _ in role_deployments(whole)] == [("runCommandRoles", f"/subscriptions/{SUB_B}")]
    # the built-in role instead: no custom role at all, assignments still only on vmScopes
    builtin = main_scope(vmScopes=VM_SCOPES, vmRole="VirtualMachineContributor")
    assert role_deployments(builtin) == []
    _, rg_loop, _ = module_config(main.doc, "vmAccessResourceGroups")
    _, sub_loop, _ = module_config(main.doc, "vmAccessSubscriptions")
    assert builtin.eval(rg_loop["array_name"]) + builtin.eval(sub_loop["array_name"]) == VM_SCOPES
    assert role_deployments(main_scope()) == [], "no vmScopes: no role definition"
    cfg, _, _ = module_config(main.doc, "vmAccessResourceGroups")
    assert {"runCommandRoles", "runCommandRolesInGroups"} <= set(cfg["dependsOn"])


# ---- the Key Vault: a new name per generation, recoverable removal ---------------------------------


def test_the_key_vault_name_changes_with_a_parameter():
    cfg, _, _ = module_config(main_scope().doc, "keyVault")
    name = cfg["params"]["name"]
    assert "uniqueString(" in name and "keyVaultGeneration" in name, name
    assert "keyVaultGeneration" in parse_bicep(MAIN_BICEP)["parameters"]
    assert len("kv-") + 9 + len("-") + 11 <= 24, "Key Vault names are at most 24 characters"


# ---- ordering: role assignments before the Function App starts -------------------------------------


def test_the_function_app_is_deployed_after_the_role_assignments():
    doc = parse_bicep(MAIN_BICEP)
    cfg, _, _ = module_config(doc, "functionApp")
    depends = set(cfg.get("dependsOn") or [])
    assignments = {m for m, d in doc["modules"].items() if d["detail"]["path"].startswith("modules/rbac")}
    assert assignments == {"rbac", "vmAccessResourceGroups", "vmAccessSubscriptions"}
    assert assignments <= depends, f"functionApp must dependOn {sorted(assignments - depends)}"


def test_app_settings_name_the_graph_endpoint_from_a_parameter():
    assert app_settings()["EZSSH_GRAPH_ENDPOINT"] == "graphEndpoint"


def test_several_tenants_get_enrolment_scopes_qualified_with_the_home_tenant():
    """Settings refuse unqualified EZSSH_ENROL_SCOPES when several tenants sign in; the VMs in
    vmScopes belong to the deployment's own tenant (the identity reaches ARM there only)."""
    doc = parse_bicep(MAIN_BICEP)
    cfg, _, _ = module_config(doc, "functionApp")
    assert cfg["params"]["enrolScopes"] == "enrolScopes"
    single = main_scope(vmScopes=VM_SCOPES)
    assert single.var("enrolScopes") == VM_SCOPES
    expr = doc["variables"]["enrolScopes"]["value"]["operator"]["operands"]
    assert Scope(doc, {**REQUIRED, "tenantIds": ["a", "b"]}).eval(expr["condition"]) is True
    lam = expr["true_value"]["function"]["parameters"]["arg_2"]["detail"]["expression"]
    assert lam == "${subscription().tenantId}=${s}", lam
