"""Node's version: the README states what package.json declares, the lowest version of that range fits
every pinned npm package (engines.node in package-lock.json, read with npm's semver by the same
script setup runs), and this machine's Node fits too."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

from tests.realparts import needs_tool

REPO = Path(__file__).resolve().parents[2]
CHECK = REPO / "scripts" / "check-node.js"


def declared_minimum() -> str:
    engines = json.loads((REPO / "package.json").read_text())["engines"]["node"]
    m = re.fullmatch(r">=\s*(\d+)(?:\.(\d+))?(?:\.(\d+))?", engines)
    assert m, f"package.json declares node {engines!r}: state a lower bound (>=X.Y)"
    return f"{m[1]}.{m[2] or 0}.{m[3] or 0}"


@needs_tool("node")
def test_the_documented_node_fits_every_pinned_package_and_nothing_older_does():
    low = declared_minimum()
    r = subprocess.run(["node", str(CHECK), low], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == low, r.stderr
    major, minor, _ = (int(x) for x in low.split("."))
    older = f"{major}.{minor - 1}.99" if minor else f"{major - 1}.99.99"
    assert subprocess.run(["node", str(CHECK), older], capture_output=True, timeout=60).returncode == 1


@needs_tool("node")
def test_this_machines_node_fits_the_pinned_packages():
    r = subprocess.run(["node", str(CHECK)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def test_the_readme_states_the_declared_node_version():
    major, minor, _ = declared_minimum().split(".")
    text = (REPO / "README.md").read_text()
    stated = set(re.findall(r"Node (\d+(?:\.\d+)?)\+", text))
    assert stated == {f"{major}.{minor}" if minor != "0" else major}, stated
