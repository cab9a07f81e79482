"""Every policy example in the docs is what a user will paste: each is read the way the CLI reads it
(`ezssh policy create -f FILE` for documents, the flag parsers for `--rule`/`--approver`/`--admin`,
`--set` for updates) and must be accepted by the service's own create and update, as a tenant admin.
The examples are found in the docs' text, so a new one is checked without touching this file."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from functions.core.errors import InvalidRequest
from functions.core.ids import is_guid

from .helpers import CAROL

REPO = Path(__file__).resolve().parents[2]
DOCS = [REPO / "README.md", REPO / "client" / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>json|yaml)\n(?P<body>.*?)^(?P=indent)```", re.M | re.S)
# `--rule X`, `--approver X`, `--admin X`, `--set X` where a doc shows one (inline code or a shell line)
FLAG = re.compile(r"--(?P<flag>rule|approver|admin|set)[ =](?P<value>'[^']*'|\"[^\"]*\"|[^\s`'\"|)]+)")
GRAMMAR = ("ACTION:SUBJECT", "FIELD=VALUE", "SUBJECT")  # the syntax lines of the flag table, not examples


def _dedent(body: str, indent: str) -> str:
    return "\n".join(line[len(indent):] if line.startswith(indent) else line for line in body.splitlines()) + "\n"


def policy_documents() -> list[tuple[str, str, str]]:
    """(where, lang, text) of each fenced JSON/YAML block that is a policy (it has an id and rules or hosts)."""
    import yaml

    found = []
    for doc in DOCS:
        text = doc.read_text()
        for m in FENCE.finditer(text):
            body = _dedent(m["body"], m["indent"])
            try:
                data = json.loads(body) if m["lang"] == "json" else yaml.safe_load(body)
            except (ValueError, yaml.YAMLError):
                continue
            if isinstance(data, dict) and "id" in data and ("rules" in data or "hosts" in data):
                line = text[: m.start()].count("\n") + 1
                found.append((f"{doc.relative_to(REPO)}:{line}", m["lang"], body))
    return found


def flag_examples() -> list[tuple[str, str, str]]:
    """(where, flag, value) of every subject/rule/--set example in the docs."""
    found = []
    for doc in DOCS:
        for n, line in enumerate(doc.read_text().splitlines(), 1):
            for m in FLAG.finditer(line):
                value = shlex.split(m["value"])[0] if m["value"][0] in "'\"" else m["value"]
                if any(value.startswith(g) for g in GRAMMAR) or value.endswith("..."):
                    continue
                found.append((f"{doc.relative_to(REPO)}:{n}", m["flag"], value))
    return found


DOCUMENTS = policy_documents()
FLAGS = flag_examples()


def test_the_docs_hold_the_examples_this_test_reads():
    """A guard against a silent extractor: the docs' known examples are found."""
    where = {w.split(":")[0] for w, _, _ in DOCUMENTS}
    assert {"README.md", "client/README.md", "docs/DEPLOY.md"} <= where, DOCUMENTS
    assert {f for _, f, _ in FLAGS} == {"rule", "approver", "admin", "set"}, FLAGS


def _ids_in(value: object) -> list[str]:
    if isinstance(value, dict):
        return [i for k, v in value.items() for i in (_ids_in(v) if k not in ("display", "name") else [])]
    if isinstance(value, list):
        return [i for v in value for i in _ids_in(v)]
    return [value] if isinstance(value, str) else []


@pytest.mark.parametrize("where, lang, text", DOCUMENTS, ids=[w for w, _, _ in DOCUMENTS])
def test_every_policy_document_in_the_docs_is_accepted(service, tmp_path, where, lang, text):
    from ezssh.policydoc import load_document

    path = tmp_path / f"policy.{lang}"
    path.write_text(text)
    doc, _ = load_document(str(path))  # as `ezssh policy create -f` reads it
    people = [*(s for r in doc.get("rules", []) for s in r.get("users", []) + r.get("groups", [])),
              *_ids_in(doc.get("approvers")), *_ids_in(doc.get("admins"))]
    assert people and all(p == "*" or is_guid(p) for p in people), f"{where}: people named by anything but ids"
    try:
        policy = service.policies.create(CAROL, doc)
    except InvalidRequest as exc:
        pytest.fail(f"{where}: the service refuses the example: {exc.message}")
    assert policy.id == doc["id"]


@pytest.mark.parametrize("where, flag, value", FLAGS, ids=[f"{w}:{f}={v}" for w, f, v in FLAGS])
def test_every_flag_example_in_the_docs_is_accepted(service, where, flag, value):
    from ezssh.policydoc import parse_rule, parse_set, parse_subjects

    from .helpers import policy_doc

    base = service.policies.create(CAROL, policy_doc("flags"))
    if flag == "set":
        field, parsed = parse_set(value)
        patch = {field: parsed}
    elif flag == "rule":
        patch = {"rules": [parse_rule(value)]}
    else:
        patch = {f"{flag}s": {k: v for k, v in parse_subjects(value).items() if v}}
    try:
        service.policies.update(CAROL, base.id, patch, base.etag)
    except InvalidRequest as exc:
        pytest.fail(f"{where}: `--{flag} {value}` is refused by the service: {exc.message}")
