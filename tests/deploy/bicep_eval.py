"""Evaluate the few Bicep expressions the deployment tests need, from pycep-parser's tree.

Enough of the language to compute what a deployment would set: literals, parameters (given or
default), variables, the loop and lambda variables a test binds, `environment()` (an object the test
supplies, e.g. the one Azure's documentation shows), and the functions and operators below. Anything
else raises Unsupported, so a test never passes on an expression it did not really evaluate.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .bicep_types import parse_bicep


class Unsupported(Exception):
    pass


@dataclass
class Scope:
    doc: dict
    params: dict[str, Any] = field(default_factory=dict)
    environment: dict | None = None
    bound: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, path: Path, **kw: Any) -> "Scope":
        return cls(parse_bicep(path), **kw)

    def with_(self, **names: Any) -> "Scope":
        return Scope(self.doc, self.params, self.environment, {**self.bound, **names})

    def name(self, n: str) -> Any:
        if n in self.bound:
            return self.bound[n]
        if n in self.params:
            return self.params[n]
        decl = (self.doc.get("parameters") or {}).get(n)
        if decl is not None:
            if "default" not in decl:
                raise Unsupported(f"parameter {n} has no default and no value was given")
            return self.eval(decl["default"])
        var = (self.doc.get("variables") or {}).get(n)
        if var is not None:
            return self.eval(var["value"])
        raise KeyError(n)

    def var(self, n: str) -> Any:
        return self.eval(self.doc["variables"][n]["value"])

    def eval(self, v: Any) -> Any:
        if isinstance(v, bool) or isinstance(v, (int, float)) or v is None:
            return v
        if isinstance(v, str):
            try:
                return self.name(v)
            except KeyError:
                if "${" in v:
                    return self._interpolate(v)
                return v  # a string literal
        if isinstance(v, list):
            return [self.eval(x) for x in v]
        if isinstance(v, dict) and set(v) == {"operator"}:
            return self._operator(v["operator"])
        if isinstance(v, dict) and set(v) == {"function"}:
            return self._function(v["function"])
        if isinstance(v, dict):
            return {k: self.eval(x) for k, x in v.items()}
        raise Unsupported(repr(v))

    def _interpolate(self, text: str) -> str:
        """'a-${name}-b' with plain names only; anything else in ${} is Unsupported."""
        out, rest = [], text
        while "${" in rest:
            head, _, tail = rest.partition("${")
            inner, sep, rest = tail.partition("}")
            if not sep or not inner.strip().isidentifier():
                raise Unsupported(f"string interpolation: {text!r}")
            out += [head, str(self.name(inner.strip()))]
        return "".join(out) + rest

    def _lambda(self, lam: dict):  # type: ignore[no-untyped-def]
        if lam.get("type") != "lambda_expression":
            raise Unsupported(repr(lam))
        detail = lam["detail"]
        return lambda x: self.with_(**{detail["var_1"]: x}).eval(detail["expression"])

    def _operator(self, op: dict) -> Any:
        t, o = op["type"], op.get("operands") or {}
        if t == "conditional":
            return self.eval(o["true_value"]) if self.eval(o["condition"]) else self.eval(o["false_value"])
        if t == "equals":
            a, b = self.eval(o["operand_1"]), self.eval(o["operand_2"])
            return a == b
        if t == "not_equals":
            return self.eval(o["operand_1"]) != self.eval(o["operand_2"])
        if t == "and":
            return bool(self.eval(o["operand_1"])) and bool(self.eval(o["operand_2"]))
        if t == "or":
            return bool(self.eval(o["operand_1"])) or bool(self.eval(o["operand_2"]))
        if t in ("greater_than", "greater_than_or_equals", "less_than", "less_than_or_equals"):
            a, b = self.eval(o["operand_1"]), self.eval(o["operand_2"])
            return {"greater_than": a > b, "greater_than_or_equals": a >= b, "less_than": a < b,
                    "less_than_or_equals": a <= b}[t]
        if t == "parentheses":
            return self.eval(o.get("expression", o.get("operand_1")))
        if t == "not":
            return not self.eval(o["bool_value"])
        if t == "index_accessor":
            base, idx = self.eval(o["operand_1"]), self.eval(o["operand_2"])
            if isinstance(base, dict) and idx not in base:
                raise KeyError(f"{idx!r} is not a key of {sorted(base)} (the deployment would fail)")
            return base[idx]
        if t == "property_accessor":
            base = self.eval(o["operand_1"])
            prop = o["operand_2"]
            if not isinstance(base, dict) or not isinstance(prop, str):
                raise Unsupported(f"property access {prop!r} on {base!r}")
            return base[prop]
        raise Unsupported(f"operator {t}")

    def _function(self, fn: dict) -> Any:
        t, p = fn["type"], fn.get("parameters") or {}
        if t == "environment":
            if self.environment is None:
                raise Unsupported("environment() needs an environment object")
            return self.environment
        if t == "empty":
            return not self.eval(p["item_to_test"])
        if t == "split":
            return str(self.eval(p["input_string"])).split(self.eval(p["delimiter"]))
        if t == "length":
            return len(self.eval(p["arg_1"]))
        if t == "to_lower":
            return str(self.eval(p["string_to_change"])).lower()
        if t == "union":
            out: list = []
            for k in sorted(p):
                for x in self.eval(p[k]):
                    if x not in out:
                        out.append(x)
            return out
        if t == "contains":
            return self.eval(p["item_to_find"]) in self.eval(p["container"])
        if t == "filter":
            keep = self._lambda(p["expression"])
            return [x for x in self.eval(p["input_array"]) if keep(x)]
        if t == "map":
            f = self._lambda(p["arg_2"])
            return [f(x) for x in self.eval(p["arg_1"])]
        raise Unsupported(f"function {t}()")


def module_config(doc: dict, symbol: str) -> tuple[dict, dict | None, Any]:
    """(the module's body, its loop detail or None, its condition or None)."""
    cfg = doc["modules"][symbol]["config"]
    loop = cond = None
    while isinstance(cfg, dict) and "config" in cfg and set(cfg) <= {"loop_type", "condition", "config"}:
        loop = (cfg.get("loop_type") or {}).get("detail") or loop
        cond = cfg.get("condition") if cfg.get("condition") is not None else cond
        cfg = cfg["config"]
    return cfg, loop, cond
