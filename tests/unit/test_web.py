"""functions/api/web.py: the page's security policy, and how pinned libraries are served (bare
imports mapped to files next to them, never passed through)."""

from __future__ import annotations

import json

import pytest

from functions.api import web


def test_policy_allows_only_this_origin_and_the_authority():
    origins = web.authority_origins(["https://login.microsoftonline.com/t1/v2.0",
                                     "https://login.microsoftonline.com/t2/v2.0"])
    assert origins == ["https://login.microsoftonline.com"]
    csp = dict(d.split(" ", 1) for d in web.content_security_policy(origins).split("; "))
    assert csp["default-src"] == "'none'" and csp["script-src"] == "'self'" and csp["style-src"] == "'self'"
    assert csp["connect-src"] == "'self' https://login.microsoftonline.com"
    assert csp["frame-ancestors"] == "'none'" and csp["base-uri"] == "'none'" and csp["object-src"] == "'none'"
    assert "unsafe" not in web.content_security_policy(origins)


def test_bare_imports_are_mapped_and_an_unmapped_one_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(web, "WEB", tmp_path / "web")
    monkeypatch.setattr(web, "REPO", tmp_path)
    lib = tmp_path / "node_modules" / "lib"
    lib.mkdir(parents=True)
    (lib / "a.mjs").write_text('import{x as n}from"preact";import "./local.js";export const y=import("preact");')
    out = web._vendor_bytes("a.js", {"from": "lib/a.mjs", "imports": {"preact": "./preact.js"}}).decode()
    assert out == 'import{x as n}from"./preact.js";import "./local.js";export const y=import("./preact.js");'
    with pytest.raises(web.WebFilesMissing, match="does not map"):
        web._vendor_bytes("a.js", {"from": "lib/a.mjs", "imports": {"other": "./other.js"}})
    with pytest.raises(web.WebFilesMissing, match="npm ci"):
        web._vendor_bytes("b.js", {"from": "lib/missing.mjs"})


def test_every_pinned_library_is_in_package_json():
    spec = json.loads((web.WEB / "vendor.json").read_text())["files"]
    deps = json.loads((web.REPO / "package.json").read_text())["dependencies"]
    for name, entry in spec.items():
        pkg = entry["from"].split("/")[0]
        if pkg.startswith("@"):
            pkg = "/".join(entry["from"].split("/")[:2])
        assert pkg in deps, f"{name} comes from {pkg}, which package.json does not pin"
        assert deps[pkg][0].isdigit(), f"{pkg} is pinned to a range ({deps[pkg]}), not a version"
