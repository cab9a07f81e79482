"""The README's pipeline example is what a user will paste: it is a workflow file whose every `ezssh`
command line the CLI parses as written, whose sign-in uses the variables azure-identity reads, and
whose GitHub token request asks for Entra's federation audience. (The policy example beside it is
checked with every other doc policy by tests/service/test_doc_policies.py.)"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
FENCE = re.compile(r"^```yaml\n(?P<body>.*?)^```", re.M | re.S)


def workflows() -> list[dict]:
    found = []
    for m in FENCE.finditer((REPO / "README.md").read_text()):
        doc = yaml.safe_load(m["body"])
        if isinstance(doc, dict) and "jobs" in doc:
            found.append(doc)
    return found


def ezssh_lines(workflow: dict) -> list[list[str]]:
    out = []
    for job in workflow["jobs"].values():
        for step in job["steps"]:
            for line in str(step.get("run", "")).splitlines():
                line = re.sub(r"\$\{\{[^}]*\}\}", "X", line.split(" # ")[0]).strip()
                if line.startswith("ezssh "):
                    out.append(shlex.split(line)[1:])
    return out


def test_the_readme_has_a_pipeline_example():
    assert len(workflows()) == 1


@pytest.mark.parametrize("argv", [a for w in workflows() for a in ezssh_lines(w)], ids=" ".join)
def test_every_ezssh_line_of_the_pipeline_parses(argv):
    from ezssh.cli import build_parser
    from ezssh.sshargs import parse

    if argv[0] == "ssh":
        inv = parse(argv[1:])
        assert inv is not None and inv.principal and inv.host and "--" not in inv.ssh_args
    else:
        args = build_parser(argv[0]).parse_args(argv)
        assert hasattr(args, "func")


def test_the_pipeline_signs_in_with_a_federated_token_and_no_secret():
    [wf] = workflows()
    assert wf["permissions"]["id-token"] == "write"
    [job] = wf["jobs"].values()
    assert set(job["env"]) >= {"AZURE_CLIENT_ID", "AZURE_TENANT_ID", "AZURE_FEDERATED_TOKEN_FILE"}
    text = yaml.safe_dump(wf)
    assert "secrets." not in text
    assert "audience=api://AzureADTokenExchange" in " ".join(str(s.get("run", "")) for s in job["steps"])
    assert ["login", "--workload-identity"] in ezssh_lines(wf)
