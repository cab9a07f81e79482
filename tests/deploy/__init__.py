"""Deployment checks: settings parity, the Functions package, and the Bicep's structure.

No Bicep compiler runs here (the Bicep CLI is a .NET binary no registry we use serves), so the
helpers below read .bicep text the way the checks need: a small lexer that knows Bicep's comments,
'strings' with ${interpolation} and '''multi-line strings''', enough to find declarations and blocks.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
MAIN_BICEP = INFRA / "main.bicep"
MODULES = INFRA / "modules"
FUNCTIONAPP_BICEP = MODULES / "functionapp.bicep"
PARAMETERS_JSON = INFRA / "main.parameters.json"
LOCAL_SETTINGS_EXAMPLE = REPO / "local.settings.example.json"


def lex(text: str) -> tuple[str, str]:
    """(code, masked): `code` is `text` with comments blanked; `masked` also blanks string contents.

    Both keep every offset and newline of `text`, so a position found in one is valid in the others.
    """
    code = list(text)
    masked = list(text)
    stack = ["code"]  # code | str | interp:<depth>
    i, n = 0, len(text)

    def blank(a: int, b: int, *, also_code: bool) -> None:
        for k in range(a, b):
            if text[k] != "\n":
                masked[k] = " "
                if also_code:
                    code[k] = " "

    while i < n:
        top = stack[-1]
        in_string = len(stack) > 1
        if top == "str":
            if text[i] == "\\":
                blank(i, min(i + 2, n), also_code=False)
                i += 2
            elif text[i] == "'":
                stack.pop()
                i += 1
            elif text.startswith("${", i):
                blank(i, i + 2, also_code=False)
                stack.append("interp:0")
                i += 2
            else:
                blank(i, i + 1, also_code=False)
                i += 1
            continue
        # code, or code inside an interpolation
        if text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
            blank(i, j, also_code=True)
            i = j
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            j = n if j < 0 else j + 2
            blank(i, j, also_code=True)
            i = j
        elif text.startswith("'''", i):
            j = text.find("'''", i + 3)
            j = n if j < 0 else j + 3
            blank(i + 3, j - 3, also_code=False)
            i = j
        elif text[i] == "'":
            if in_string:
                blank(i, i + 1, also_code=False)
            stack.append("str")
            i += 1
        elif top.startswith("interp:"):
            depth = int(top.split(":")[1])
            if text[i] == "{":
                stack[-1] = f"interp:{depth + 1}"
            elif text[i] == "}":
                if depth == 0:
                    stack.pop()
                else:
                    stack[-1] = f"interp:{depth - 1}"
            blank(i, i + 1, also_code=False)
            i += 1
        else:
            i += 1
    return "".join(code), "".join(masked)


def block_end(masked: str, open_at: int) -> int:
    """Index just past the bracket that closes the one at `open_at` ({ or [)."""
    pairs = {"{": "}", "[": "]", "(": ")"}
    stack = [pairs[masked[open_at]]]
    for k in range(open_at + 1, len(masked)):
        c = masked[k]
        if c in pairs:
            stack.append(pairs[c])
        elif c in ")]}":
            if c != stack.pop():
                raise ValueError(f"unbalanced {c!r} at {k}")
            if not stack:
                return k + 1
    raise ValueError(f"no closing bracket for the one at {open_at}")


def top_level_keys(masked: str, start: int, end: int) -> list[str]:
    """Object keys at the first level of the block masked[start:end] (start at its opening brace)."""
    keys, depth = [], 0
    for m in re.finditer(r"[{}\[\]()]|^[ \t]*(\w+)[ \t]*:", masked[start:end], re.M):
        tok = m.group(0)
        if m.group(1) is not None:
            if depth == 1:
                keys.append(m.group(1))
        elif tok in "{[(":
            depth += 1
        else:
            depth -= 1
    return keys


@dataclass
class Bicep:
    path: Path

    @cached_property
    def text(self) -> str:
        return self.path.read_text()

    @cached_property
    def _lexed(self) -> tuple[str, str]:
        return lex(self.text)

    @property
    def code(self) -> str:
        return self._lexed[0]

    @property
    def masked(self) -> str:
        return self._lexed[1]

    @cached_property
    def target_scope(self) -> str:
        m = re.search(r"^targetScope\s*=\s*'(\w+)'", self.code, re.M)
        return m.group(1) if m else "resourceGroup"

    @cached_property
    def params(self) -> dict[str, bool]:
        """name -> has a default value."""
        out = {}
        for m in re.finditer(r"^param\s+(\w+)\s+([\w.]+)(\s*=)?", self.code, re.M):
            out[m.group(1)] = bool(m.group(3))
        return out

    @cached_property
    def outputs(self) -> set[str]:
        return set(re.findall(r"^output\s+(\w+)\s", self.code, re.M))

    @cached_property
    def variables(self) -> dict[str, str]:
        """name -> the text of its value (first line only for multi-line values)."""
        return {m.group(1): m.group(2).strip() for m in re.finditer(r"^var\s+(\w+)\s*=\s*(.*)$", self.code, re.M)}

    def blocks(self, pattern: str) -> list[tuple[re.Match, str, str]]:
        """(match, block code, block masked) for each declaration matching `pattern` (start of line)."""
        out = []
        for m in re.finditer(pattern, self.code, re.M):
            open_at = self.masked.index("{", m.end())
            end = block_end(self.masked, open_at)
            out.append((m, self.code[open_at:end], self.masked[open_at:end]))
        return out

    @cached_property
    def modules(self) -> list[dict]:
        """Each `module sym 'path' = ...{...}`: symbol, path (resolved), params passed."""
        mods = []
        for m, code, masked in self.blocks(r"^module\s+(\w+)\s+'([^']+)'\s*="):
            params: list[str] = []
            pm = re.search(r"^\s*params\s*:\s*\{", masked, re.M)
            if pm:
                open_at = pm.end() - 1
                params = top_level_keys(masked, open_at, block_end(masked, open_at))
            mods.append({
                "symbol": m.group(1),
                "ref": m.group(2),
                "path": (self.path.parent / m.group(2)).resolve(),
                "params": params,
                "block": code,
            })
        return mods

    def resources(self, type_prefix: str) -> list[tuple[str, str, str]]:
        """(symbol, type@version, block code) of each resource whose type starts with type_prefix."""
        pat = r"^resource\s+(\w+)\s+'(" + re.escape(type_prefix) + r"[^']*)'"
        return [(m.group(1), m.group(2), code) for m, code, _ in self.blocks(pat)]

    def array_var_entries(self, name: str) -> list[dict[str, str]]:
        """The `{ name: 'X' value: ... }` entries of `var <name> = [ ... ]`: [{name, value}]."""
        m = re.search(r"^var\s+" + re.escape(name) + r"\s*=\s*\[", self.code, re.M)
        if not m:
            return []
        open_at = m.end() - 1
        end = block_end(self.masked, open_at)
        code = self.code[open_at:end]
        masked = self.masked[open_at:end]
        entries = []
        k = 1
        while True:
            k = masked.find("{", k)
            if k < 0:
                break
            e = block_end(masked, k)
            body = code[k:e]
            nm = re.search(r"^\s*name\s*:\s*'([^']*)'", body, re.M)
            val = re.search(r"^\s*value\s*:\s*(.+)$", body, re.M)
            entries.append({"name": nm.group(1) if nm else "", "value": val.group(1).strip() if val else ""})
            k = e
        return entries


def all_bicep() -> list[Bicep]:
    return [Bicep(p) for p in sorted(INFRA.glob("*.bicep")) + sorted(MODULES.glob("*.bicep"))]


def app_settings() -> dict[str, str]:
    """The Function App's app settings as the Bicep sets them: name -> value expression."""
    entries = Bicep(FUNCTIONAPP_BICEP).array_var_entries("appSettings")
    return {e["name"]: e["value"] for e in entries}
