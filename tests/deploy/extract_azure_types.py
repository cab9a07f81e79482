"""Copy the resource type definitions infra/ uses out of a checkout of Azure/bicep-types-az `generated/`.

    python -m tests.deploy.extract_azure_types <bicep-types-az>/generated [Type@version ...]

For every `Type@version` that a .bicep file under infra/ declares (plus any named on the command line),
the `types.json` that defines it is copied to tests/deploy/azure-types/<same relative path>, keeping
only that resource type and the type nodes it reaches (references renumbered). The result is the
test data bicep_types.py checks against; README.md there records the source commit and licence.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .bicep_types import TYPES_DIR, resource_types

REPO = Path(__file__).resolve().parents[2]


def _refs(v):  # type: ignore[no-untyped-def]
    if isinstance(v, dict):
        if set(v) == {"$ref"}:
            yield int(v["$ref"].rsplit("/", 1)[1])
        for x in v.values():
            yield from _refs(x)
    elif isinstance(v, list):
        for x in v:
            yield from _refs(x)


def _renumber(v, new):  # type: ignore[no-untyped-def]
    if isinstance(v, dict):
        if set(v) == {"$ref"}:
            return {"$ref": f"#/{new[int(v['$ref'].rsplit('/', 1)[1])]}"}
        return {k: _renumber(x, new) for k, x in v.items()}
    if isinstance(v, list):
        return [_renumber(x, new) for x in v]
    return v


def subset(nodes: list[dict], wanted: set[str]) -> list[dict]:
    roots = [i for i, n in enumerate(nodes) if n.get("$type") == "ResourceType" and n["name"].lower() in wanted]
    keep, todo = set(), list(roots)
    while todo:
        i = todo.pop()
        if i in keep:
            continue
        keep.add(i)
        todo.extend(_refs(nodes[i]))
    order = sorted(keep)
    new = {old: k for k, old in enumerate(order)}
    return [_renumber(nodes[i], new) for i in order]


def main(argv: list[str]) -> int:
    src = Path(argv[0])
    wanted = {t.lower() for t in resource_types(sorted((REPO / "infra").rglob("*.bicep")))} | {t.lower() for t in argv[1:]}
    found = set()
    for path in sorted(src.rglob("types.json")):
        nodes = json.loads(path.read_text())
        names = {n["name"].lower() for n in nodes if n.get("$type") == "ResourceType"}
        hit = names & wanted
        if not hit:
            continue
        found |= hit
        out = TYPES_DIR / path.relative_to(src)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(subset(nodes, hit), indent=1) + "\n")
        print(f"{out.relative_to(REPO)}: {', '.join(sorted(hit))}")
    missing = sorted(wanted - found)
    if missing:
        print(f"not found: {missing}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
