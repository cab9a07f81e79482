"""Every resource body in infra/*.bicep matches the published type definition of its API version.

The check (bicep_types.py) parses each file with pycep-parser and walks each body against the
definitions in tests/deploy/azure-types/ (Azure/bicep-types-az; see the README there). It is itself
tested on broken copies of a real module: a misspelled property, a read-only property set, a
required property left out, a value outside an enum, and a bad discriminated object must each be
reported, naming the property.
"""

from __future__ import annotations

import re

import pytest

from . import INFRA, MODULES
from .bicep_types import TYPES_DIR, check_bicep, resource_types, type_index

FILES = sorted(INFRA.glob("*.bicep")) + sorted(MODULES.glob("*.bicep"))


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(INFRA)) for p in FILES])
def test_resource_bodies_match_their_type_definitions(path):
    errors = check_bicep(path)
    assert not errors, "\n".join(errors)


def test_every_declared_type_has_a_committed_definition():
    declared = resource_types(FILES)
    assert declared, "no resources found: the parser read nothing"
    missing = sorted(t for t in declared if t.lower() not in type_index())
    assert not missing, f"add these to {TYPES_DIR.name}/ (see its README): {missing}"
    assert (TYPES_DIR / "LICENSE").is_file() and "1f896de2db966ad91e8f7d7d981e11d32e4f5d8d" in (TYPES_DIR / "README.md").read_text()


def _broken(tmp_path, source: str, edits: list[tuple[str, str]]):
    text = (MODULES / source).read_text()
    for old, new in edits:
        assert old in text, f"{source} no longer contains {old!r}; update this test"
        text = text.replace(old, new, 1)
    out = tmp_path / source
    out.write_text(text)
    return check_bicep(out)


def test_the_check_catches_a_misspelling_a_read_only_property_and_a_missing_required_one(tmp_path):
    assert check_bicep(MODULES / "keyvault.bicep") == []
    errors = _broken(tmp_path, "keyvault.bicep", [
        ("enablePurgeProtection: true", "enablePurgeProtectoin: true"),          # misspelled
        ("enableSoftDelete: true", "enableSoftDelete: true\n    hsmPoolResourceId: 'x'"),  # read-only
        ("    tenantId: subscription().tenantId\n", ""),                          # required
    ])
    text = "\n".join(errors)
    assert len(errors) == 3, text
    assert re.search(r"properties\.enablePurgeProtectoin: no such property", text)
    assert re.search(r"properties\.hsmPoolResourceId: is read-only", text)
    assert re.search(r"properties\.tenantId: is required but missing", text)


def test_the_check_reads_nested_enums_discriminators_and_kinds(tmp_path):
    errors = _broken(tmp_path, "storage.bicep", [
        ("allowBlobPublicAccess: false", "allowBlobPublicAccess: 'no'"),  # a string where a bool belongs
        ("    publicAccess: 'None'\n", "    publicAccess: 'Nobody'\n    leaseState: 'Available'\n"),  # closed enum; read-only
    ])
    text = "\n".join(errors)
    assert "properties.publicAccess: 'Nobody' is not one of" in text
    assert "allowBlobPublicAccess: expects a boolean" in text
    assert "resource deploymentContainer" in text and "properties.leaseState: is read-only" in text
    errors = _broken(tmp_path, "events.bicep", [
        ("endpointType: 'AzureFunction'", "endpointType: 'AzureFunctoin'"),
        ("operatorType: 'StringIn'", "operatorType: 'StringIn'\n          vaules: []"),
    ])
    text = "\n".join(errors)
    assert "destination.endpointType: 'AzureFunctoin' is not one of" in text
    assert "advancedFilters[0].vaules: no such property" in text


def test_the_check_knows_where_each_type_may_be_deployed(tmp_path):
    errors = _broken(tmp_path, "events-topic.bicep", [("param topicName string", "targetScope = 'subscription'\nparam topicName string")])
    assert len(errors) == 1 and "cannot be deployed at subscription scope" in errors[0] and "resourceGroup" in errors[0], errors
