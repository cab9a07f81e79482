"""Fixtures for the API tests: fresh user keys. The HTTP client on the API server (`client`) and a
dev user's bearer header (`auth`) are in tests/conftest.py, shared with the host tests."""

from __future__ import annotations

from typing import Callable

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519


def _keypair() -> tuple[ed25519.Ed25519PrivateKey, str]:
    key = ed25519.Ed25519PrivateKey.generate()
    return key, key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                              serialization.PublicFormat.OpenSSH).decode()


@pytest.fixture(scope="session")
def keypair() -> Callable[[], tuple[ed25519.Ed25519PrivateKey, str]]:
    """A fresh ed25519 key and its OpenSSH public key line, one per call."""
    return _keypair


@pytest.fixture(scope="session")
def pub() -> Callable[[], str]:
    """A fresh ed25519 public key line (OpenSSH format), one per call: what a client sends."""
    return lambda: _keypair()[1]
