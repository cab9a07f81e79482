"""docs/DEPLOY.md walked as a shell session: every variable is set before it is used, the app
registration documents it writes are valid JSON with what multi-tenant consent needs, and the
parameters it deploys with agree with the template and with infra/main.parameters.json."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from . import MAIN_BICEP, PARAMETERS_JSON, REPO
from .bicep_types import parse_bicep

GUIDE = REPO / "docs" / "DEPLOY.md"
SHELL_GIVEN = {"HOME", "PATH", "PWD", "USER", "SHELL"}  # set by any login shell
NAME = r"[A-Za-z_][A-Za-z0-9_]*"


def shell_blocks(text: str) -> list[tuple[int, str]]:
    """(line number, body) of each ```sh block, in order."""
    out = []
    for m in re.finditer(r"^```sh\n(.*?)^```", text, re.M | re.S):
        out.append((text[: m.start()].count("\n") + 1, m.group(1)))
    return out


def expanded_parts(line: str, in_heredoc: str | None) -> str:
    """The parts of one line the shell expands: outside single quotes (a quoted heredoc: nothing)."""
    if in_heredoc == "quoted":
        return ""
    if in_heredoc == "plain":
        return line
    out, quote = [], None
    i = 0
    while i < len(line):
        c = line[i]
        if quote is None and c == "#" and (i == 0 or line[i - 1] in " \t"):
            break  # a comment
        if c == "\\" and quote != "'":
            out.append(line[i: i + 2])
            i += 2
            continue
        if c == "'" and quote != '"':
            quote = None if quote == "'" else "'"
        elif c == '"' and quote != "'":
            quote = None if quote == '"' else '"'
        elif quote != "'":
            out.append(c)
        i += 1
    return "".join(out)


def walk(text: str) -> tuple[list[tuple[int, str]], dict[str, int]]:
    """([(line, name) of each use before its assignment], {name: line first assigned})."""
    assigned: dict[str, int] = {}
    early: list[tuple[int, str]] = []
    for start, body in shell_blocks(text):
        heredoc: tuple[str, str] | None = None  # (delimiter, quoted|plain)
        for k, line in enumerate(body.splitlines()):
            lineno = start + 1 + k
            if heredoc is not None:
                if line.strip() == heredoc[0]:
                    heredoc = None
                    continue
                part = expanded_parts(line, heredoc[1])
            else:
                part = expanded_parts(line, None)
                m = re.search(r"<<-?\s*(['\"]?)(\w+)\1", line)
                if m:
                    heredoc = (m.group(2), "quoted" if m.group(1) else "plain")
            # uses first (VAR=$(... $VAR ...) uses the old value), then this line's assignments
            for name in re.findall(r"\$\{?(" + NAME + r")", part.replace("\\$", "")):
                if name not in assigned and name not in SHELL_GIVEN:
                    early.append((lineno, name))
            for name in re.findall(r"(?:^\s*|[;&|(]\s*|\bexport\s+)(" + NAME + r")=", part):
                assigned.setdefault(name, lineno)
            for name in re.findall(r"\bfor\s+(" + NAME + r")\s+in\b", part):
                assigned.setdefault(name, lineno)
            for name in re.findall(r"\bread\s+(?:-\w+\s+)*(" + NAME + r")", part):
                assigned.setdefault(name, lineno)
            # a function's positional parameters ($1) are not variables of the session
    return early, assigned


def test_every_variable_is_set_before_it_is_used():
    early, assigned = walk(GUIDE.read_text())
    assert not early, "used before being set: " + ", ".join(f"${n} (line {ln})" for ln, n in early)
    for needed in ("IDENTITY_NAME", "PRINCIPAL", "RG", "KV_NAME", "CLI_APP_ID", "ADMIN_ROLE_ID", "GRAPH_ROLE_ID"):
        assert needed in assigned, f"the guide never sets ${needed}"


def test_the_walker_catches_a_use_before_its_assignment():
    early, _ = walk("```sh\necho \"$LATER\" '$QUOTED'\nLATER=1\ncat <<'EOF'\n$NOT_EXPANDED\nEOF\n"
                    "cat <<EOF\n$EXPANDED\nEOF\n```\n")
    assert [n for _, n in early] == ["LATER", "EXPANDED"]


def test_no_variable_is_assigned_twice_with_different_meanings():
    """ROLE_ID once meant the EZSSH.Admin app role and then a Graph permission, which broke 2.3."""
    text = GUIDE.read_text()
    counts: dict[str, set[str]] = {}
    for _, body in shell_blocks(text):
        for m in re.finditer(r"^\s*(?:export\s+)?(" + NAME + r")=(.*)$", body, re.M):
            counts.setdefault(m.group(1), set()).add(m.group(2).strip())
    clashes = {n: v for n, v in counts.items() if len(v) > 1 and n not in ("ADMIN_ID", "API_SP_ID")}
    assert not clashes, f"assigned more than once with different values: {clashes}"


def heredoc_json(text: str, path: str) -> dict | list:
    """The JSON a `cat > path <<EOF` in the guide writes, with each $VAR replaced by <VAR>."""
    m = re.search(r"cat > " + re.escape(path) + r" <<EOF\n(.*?)\nEOF", text, re.S)
    assert m, f"the guide does not write {path}"
    body = re.sub(r"\\\$", "$", m.group(1))
    body = re.sub(r"\$(?:\{(" + NAME + r")\}|(" + NAME + r"))",
                  lambda v: "$schema" if v.group(2) == "schema" else f"<{v.group(1) or v.group(2)}>", body)
    body = re.sub(r'("value":\s*)(<\w+>)', r'\1"\2"', body)  # a value the shell writes whole (e.g. a JSON array)
    return json.loads(body)


def test_the_api_registration_knows_its_client_for_consent_in_other_tenants():
    text = GUIDE.read_text()
    api = heredoc_json(text, "/tmp/ezssh-api.json")
    clients = heredoc_json(text, "/tmp/ezssh-api-clients.json")
    assert clients["api"]["knownClientApplications"] == ["<CLI_APP_ID>"]
    assert clients["api"]["preAuthorizedApplications"][0]["appId"] == "<CLI_APP_ID>"
    assert api["api"]["requestedAccessTokenVersion"] == 2
    assert api["appRoles"][0]["value"] == "EZSSH.Admin" and api["appRoles"][0]["id"] == "<ADMIN_ROLE_ID>"
    assert "knownClientApplications" in text.split("### 2.4", 1)[1].split("## 3.", 1)[0], \
        "the multi-tenant section says why consent needs it"
    assert "AzureADMultipleOrgs" in text and "adminconsent?client_id=$CLI_APP_ID" in text


def test_the_guide_deploys_with_parameters_the_template_takes_and_one_app_id_uri():
    text = GUIDE.read_text()
    params = heredoc_json(text, "/tmp/ezssh.parameters.json")["parameters"]
    template = parse_bicep(MAIN_BICEP)["parameters"]
    assert set(params) <= set(template), sorted(set(params) - set(template))
    required = {n for n, p in template.items() if "default" not in p}
    assert required <= set(params), sorted(required - set(params))
    # every tenant the guide names goes into tenantIds, and {username} gets its verified domains
    assert params["tenantIds"]["value"] == "<TENANT_IDS_JSON>" and params["verifiedDomains"]["value"] == "<VERIFIED_DOMAINS>"
    assert re.search(r'^TENANT_LIST=\$\(printf \'"%s",\' \$TENANT_ID \$OTHER_TENANT_IDS\)', text, re.M)
    api = heredoc_json(text, "/tmp/ezssh-api.json")
    assert params["apiAppIdUri"]["value"] == api["identifierUris"][0] == "<API_APP_ID_URI>"
    assert re.search(r"^API_APP_ID_URI=api://\$API_APP_ID$", text, re.M)
    # infra/main.parameters.json follows the same rule: api://<apiClientId> (or empty, which means it)
    sample = json.loads(PARAMETERS_JSON.read_text())["parameters"]
    assert sample["apiAppIdUri"]["value"] in ("", f"api://{sample['apiClientId']['value']}")
    for m in re.finditer(r"--parameters (?!@)((?:\w+=\S+\s*)+)", text):
        for name in re.findall(r"(\w+)=", m.group(1)):
            assert name in template, f"the guide overrides {name}, which main.bicep does not declare"


def test_the_guide_grants_what_bring_your_own_keys_and_group_admins_need():
    text = GUIDE.read_text()
    byo = re.search(r'az role assignment create --role "Key Vault Crypto User" --assignee-object-id "\$PRINCIPAL"'
                    r'.*?--scope "\$BYO_VAULT_ID"', text, re.S)
    assert byo, "a step grants the identity Key Vault Crypto User on a bring-your-own key's vault"
    assert re.search(r"app role to a group needs \*\*Microsoft Entra ID P1\*\*", text)
    assert "existingVmEventsTopicName" in text and "az keyvault recover" in text and "keyVaultGeneration=2" in text


@pytest.mark.parametrize("name", ["IDENTITY_NAME", "KV_NAME", "PRINCIPAL"])
def test_outputs_the_guide_reads_exist(name):
    text = GUIDE.read_text()
    m = re.search(r"^" + name + r"=\$\(out (\w+)\)$", text, re.M)
    assert m, f"{name} comes from a deployment output"
    outputs = parse_bicep(MAIN_BICEP)["outputs"]
    assert m.group(1) in outputs, f"main.bicep has no output {m.group(1)}"


def test_the_guides_host_namespaces_are_what_the_service_accepts():
    """HOST_NAMESPACES as the guide sets it starts the service, and the PUT example's body is a list a
    tenant admin may set; the namespaces a tenant can't own are refused."""
    from functions.core.errors import InvalidRequest
    from functions.core.namespaces import parse_namespaces
    from functions.publicsuffix import is_public_suffix
    from functions.settings import SettingsError, _host_namespaces

    text = GUIDE.read_text()
    tid = "0b1f6471-1bf0-4dda-aec3-cb9272f09590"
    value = re.search(r'^HOST_NAMESPACES="([^"]+)"', text, re.M).group(1).replace("$TENANT_ID", tid)
    assert _host_namespaces({"EZSSH_HOST_NAMESPACES": value}, (tid,)) == ((tid, ("*.contoso.internal", "10.20.0.0/16")),)
    with pytest.raises(SettingsError):
        _host_namespaces({"EZSSH_HOST_NAMESPACES": f"{tid}=*.com"}, (tid,))
    put = re.search(r"^PUT /api/host-namespaces\s+(\{.*\})$", text, re.M).group(1)
    assert [str(n) for n in parse_namespaces(json.loads(put)["namespaces"], is_public_suffix)] == \
        json.loads(put)["namespaces"]
    for bad in ("*", "*.com", "*.co.uk", "*.azurewebsites.net"):
        assert f"`{bad}`" in text
        with pytest.raises(InvalidRequest):
            parse_namespaces([bad], is_public_suffix)
