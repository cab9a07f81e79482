"""Check Bicep resource bodies against the published resource type definitions, without the compiler.

Every .bicep file is parsed with pycep-parser (a Bicep grammar for Python). Each resource's body is
then checked against the type definition of its `Type@api-version` from tests/deploy/azure-types/
(the definitions the Bicep compiler itself uses: Azure/bicep-types-az, see the README there):

- a property the type does not define (a misspelling), or one spelled with the wrong case;
- a property the type marks read-only (e.g. provisioningState, vaultUri);
- a required property left out;
- a literal of the wrong kind (a string where an object or a number belongs), and a string literal
  outside a closed set of allowed values;
- discriminated objects (Event Grid destinations, advanced filters) checked against the variant
  their discriminator names.

pycep writes identifiers and string literals alike as Python strings, so a string that names a symbol
of the file (parameter, variable, resource, module, loop or lambda variable) is taken as an
expression and not checked further; so are function calls and operators.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

TYPES_DIR = Path(__file__).resolve().parent / "azure-types"
REQUIRED, READ_ONLY = 1, 2
BICEP_KEYWORDS = {"parent", "scope", "dependsOn"}  # resource-level keys that are Bicep's, not the body's


# ---- the type definitions ---------------------------------------------------------------------------


@dataclass
class TypeFile:
    path: Path
    nodes: list[dict]

    def node(self, ref: dict) -> dict:
        return self.nodes[int(ref["$ref"].rsplit("/", 1)[1])]


@lru_cache(maxsize=None)
def type_index(root: Path = TYPES_DIR) -> dict[str, tuple[TypeFile, dict, dict]]:
    """'type@version' (lower case) -> (its file, the body's ObjectType, the ResourceType node)."""
    out: dict[str, tuple[TypeFile, dict, dict]] = {}
    for path in sorted(root.rglob("types.json")):
        tf = TypeFile(path, json.loads(path.read_text()))
        for n in tf.nodes:
            if n.get("$type") == "ResourceType":
                out[n["name"].lower()] = (tf, tf.node(n["body"]), n)
    return out


# ScopeType flags of the definitions (Azure/bicep-types, ScopeType.cs)
SCOPE_BITS = {"tenant": 1, "managementGroup": 2, "subscription": 4, "resourceGroup": 8}


# ---- the Bicep side ----------------------------------------------------------------------------------


def parse_bicep(path: Path) -> dict:
    from pycep import BicepParser

    return BicepParser().parse(file_path=Path(path))


def _walk(v: Any) -> Iterator[Any]:
    yield v
    if isinstance(v, dict):
        for x in v.values():
            yield from _walk(x)
    elif isinstance(v, list):
        for x in v:
            yield from _walk(x)


def symbols(doc: dict) -> set[str]:
    """Every name an identifier in this file can refer to."""
    names = set(doc.get("parameters") or {}) | set(doc.get("variables") or {}) | set(doc.get("resources") or {}) \
        | set(doc.get("modules") or {})
    for v in _walk(doc):
        if isinstance(v, dict):
            if isinstance(v.get("loop_type"), dict):
                detail = v["loop_type"].get("detail") or {}
                names.update(str(x) for k, x in detail.items() if k.startswith(("item_name", "index_name")) and x)
            if v.get("type") == "lambda_expression":
                detail = v.get("detail") or {}
                names.update(str(x) for k, x in detail.items() if k.startswith("var_") and x)
    return names


def unwrap(config: dict) -> dict:
    """The body of a resource declaration: past `[for ...]` and `if (...)` wrappers."""
    while isinstance(config, dict) and "config" in config and set(config) <= {"loop_type", "condition", "config"}:
        config = config["config"]
    return config


def is_expression(v: Any) -> bool:
    return isinstance(v, dict) and len(v) == 1 and next(iter(v)) in ("function", "operator")


def is_loop(v: Any) -> bool:
    return isinstance(v, dict) and "loop_type" in v and "config" in v


# ---- checking ----------------------------------------------------------------------------------------


@dataclass
class Checker:
    tf: TypeFile
    symbols: set[str]
    errors: list[str] = field(default_factory=list)

    def literal_string(self, v: Any) -> bool:
        return isinstance(v, str) and v not in self.symbols and "${" not in v

    def err(self, where: str, msg: str) -> None:
        self.errors.append(f"{where}: {msg}")

    def check(self, value: Any, node: dict, where: str) -> None:
        if is_expression(value) or value is None:
            return
        kind = node.get("$type")
        if kind in ("AnyType", "ResourceFunctionType"):
            return
        if kind == "ObjectType":
            self._object(value, node.get("properties") or {}, node.get("additionalProperties"), where)
        elif kind == "DiscriminatedObjectType":
            self._discriminated(value, node, where)
        elif kind == "ArrayType":
            self._array(value, node, where)
        elif kind == "UnionType":
            self._union(value, node, where)
        elif kind == "StringLiteralType":
            self._enum(value, [node["value"]], where)
        elif kind == "StringType":
            if isinstance(value, (bool, int, float, dict, list)):
                self.err(where, f"expects a string, got {type(value).__name__} {value!r}")
        elif kind == "IntegerType":
            if isinstance(value, bool) or isinstance(value, (dict, list)) or self.literal_string(value):
                self.err(where, f"expects an integer, got {value!r}")
        elif kind == "BooleanType":
            if not isinstance(value, bool) and (isinstance(value, (int, float, dict, list)) or self.literal_string(value)):
                self.err(where, f"expects a boolean, got {value!r}")

    def _object(self, value: Any, props: dict, additional: dict | None, where: str, allowed_extra: tuple = ()) -> None:
        if is_loop(value) or isinstance(value, str):
            return  # an identifier (or a string the grammar could not tell apart): not checked
        if not isinstance(value, dict):
            self.err(where, f"expects an object, got {value!r}")
            return
        lower = {k.lower(): k for k in props}
        for key, v in value.items():
            if key in allowed_extra:
                continue
            prop = props.get(key)
            if prop is None:
                if key.lower() in lower:
                    self.err(f"{where}.{key}", f"wrong case: the property is {lower[key.lower()]!r}")
                elif additional is not None:
                    self.check(v, self.tf.node(additional), f"{where}.{key}")
                else:
                    known = ", ".join(sorted(k for k, p in props.items() if not p.get("flags", 0) & READ_ONLY))
                    self.err(f"{where}.{key}", f"no such property (misspelled?); settable here: {known}")
                continue
            flags = prop.get("flags", 0)
            if flags & READ_ONLY and not flags & REQUIRED:
                self.err(f"{where}.{key}", "is read-only: Azure sets it, a template may not")
                continue
            self.check(v, self.tf.node(prop["type"]), f"{where}.{key}")
        for key, prop in props.items():
            if prop.get("flags", 0) & REQUIRED and key not in value:
                self.err(f"{where}.{key}", "is required but missing")

    def _discriminated(self, value: Any, node: dict, where: str) -> None:
        if not isinstance(value, dict) or is_loop(value):
            if not isinstance(value, str):
                self.err(where, f"expects an object, got {value!r}")
            return
        disc = node["discriminator"]
        tag = value.get(disc)
        if tag is None:
            self.err(f"{where}.{disc}", "is required but missing (it selects the kind of object)")
            return
        if not self.literal_string(tag):
            return
        elements = node.get("elements") or {}
        if tag not in elements:
            self.err(f"{where}.{disc}", f"{tag!r} is not one of {sorted(elements)}")
            return
        variant = self.tf.node(elements[tag])
        props = {**(node.get("baseProperties") or {}), **(variant.get("properties") or {})}
        props.pop(disc, None)
        self._object(value, props, variant.get("additionalProperties"), where, allowed_extra=(disc,))

    def _array(self, value: Any, node: dict, where: str) -> None:
        item = self.tf.node(node["itemType"])
        if is_loop(value):
            self.check(value["config"], item, f"{where}[for]")
            return
        if isinstance(value, str):
            return
        if not isinstance(value, list):
            self.err(where, f"expects an array, got {value!r}")
            return
        for i, v in enumerate(value):
            self.check(v, item, f"{where}[{i}]")

    def _union(self, value: Any, node: dict, where: str) -> None:
        options = [self.tf.node(r) for r in node["elements"]]
        kinds = {o["$type"] for o in options}
        if kinds == {"StringLiteralType"}:
            self._enum(value, [o["value"] for o in options], where)
            return
        attempts = []
        for o in options:
            sub = Checker(self.tf, self.symbols)
            sub.check(value, o, where)
            if not sub.errors:
                return
            attempts.append(sub.errors)
        if attempts:
            self.errors.extend(min(attempts, key=len))

    def _enum(self, value: Any, allowed: list[str], where: str) -> None:
        if isinstance(value, (dict, list, bool, int, float)):
            self.err(where, f"expects one of {allowed}, got {value!r}")
        elif self.literal_string(value) and value.lower() not in {a.lower() for a in allowed}:
            self.err(where, f"{value!r} is not one of {allowed}")


def check_bicep(path: Path, types_root: Path = TYPES_DIR) -> list[str]:
    """Every problem in the resource bodies of one .bicep file, one line each; [] when it is clean."""
    doc = parse_bicep(path)
    index = type_index(types_root)
    names = symbols(doc)
    target = ((doc.get("globals") or {}).get("scope") or {}).get("value") or "resourceGroup"
    errors: list[str] = []
    for sym, res in (doc.get("resources") or {}).items():
        type_name = f"{res['type']}@{res['api_version']}"
        found = index.get(type_name.lower())
        where = f"{Path(path).name}: resource {sym} '{type_name}'"
        if found is None:
            errors.append(f"{where}: no type definition for it in {types_root.name}/ (add it, see the README there)")
            continue
        if res.get("existing"):
            continue  # only a reference: its body is the name (and scope)
        tf, body_type, rtype = found
        config = unwrap(res.get("config") or {})
        writable = rtype.get("writableScopes", 31)
        if "scope" not in config and not writable & SCOPE_BITS.get(target, 0):
            allowed = [n for n, b in SCOPE_BITS.items() if writable & b]
            errors.append(f"{where}: cannot be deployed at {target} scope (targetScope); it can at {allowed}")
        body = {k: v for k, v in config.items() if k not in BICEP_KEYWORDS}
        c = Checker(tf, names)
        c.check(body, body_type, where)
        errors += c.errors
    return errors


def resource_types(paths: list[Path]) -> set[str]:
    """Every 'Type@version' the files declare (new or existing)."""
    out = set()
    for p in paths:
        for res in (parse_bicep(p).get("resources") or {}).values():
            out.add(f"{res['type']}@{res['api_version']}")
    return out
