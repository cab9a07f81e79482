"""One rule for tests that need a real part (a stand-in or an OpenSSH tool): under CI=true a
missing part fails the test; elsewhere the test is skipped with the reason."""

from __future__ import annotations

import os
import shutil

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def unavailable(reason: str) -> None:
    if in_ci():
        pytest.fail(f"stand-in unavailable under CI: {reason}", pytrace=False)
    pytest.skip(reason)


def needs_tool(name: str):  # type: ignore[no-untyped-def]
    """Skip when `name` is not installed, except under CI, where the test runs and fails."""
    return pytest.mark.skipif(shutil.which(name) is None and not in_ci(), reason=f"{name} is not installed")
