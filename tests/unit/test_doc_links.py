"""Every file the docs link to, or name as a repository path in backticks, is in the repository."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCS = [REPO / "README.md", REPO / "client" / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\]\((?!https?://|mailto:|#)([^)#\s]+)")
NAMED = re.compile(r"`((?:\.\./|docs/|infra/|client/|functions/|tests/|scripts/|bench/)[\w./-]*\.(?:md|py|bicep|json|sh))`")


@pytest.mark.parametrize("doc", DOCS, ids=[str(d.relative_to(REPO)) for d in DOCS])
def test_links_and_named_files_exist(doc):
    text = doc.read_text()
    missing = [t for t in LINK.findall(text) if not (doc.parent / t).exists()]
    missing += [t for t in NAMED.findall(text) if not (REPO / t).exists() and not (doc.parent / t).exists()]
    assert not missing, f"{doc.relative_to(REPO)} names files that are not in the repository: {missing}"
