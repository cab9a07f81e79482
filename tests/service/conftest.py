"""Fast service tests: the use cases over the in-memory Store (tests/memstore.py, held to the same
contract as Table Storage by tests/contract/test_store.py), a real SoftHSM token for the CA keys,
and a clock the test moves (tests/service/helpers.py). Identities are built directly: token
verification has its own tests."""

from __future__ import annotations

from typing import Callable, Iterator

import pytest

from functions.core.policy import Policy
from functions.service import Service, ServiceConfig
from tests.memstore import MemoryStore
from tests.realparts import unavailable

from .helpers import CAROL, Clock, policy_doc


@pytest.fixture(scope="session")
def keys(softhsm_token) -> Iterator:
    from functions.core.errors import SignerUnavailable
    from functions.signing.pkcs11 import Pkcs11KeyStore

    try:
        store = Pkcs11KeyStore(softhsm_token.module_path, softhsm_token.label, softhsm_token.pin, sessions=2)
    except SignerUnavailable as exc:
        unavailable(f"SoftHSM token cannot be opened: {exc.message}")
    yield store
    store.close()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store() -> MemoryStore:
    return MemoryStore()


@pytest.fixture
def service(store, keys, clock) -> Service:
    return Service(store, keys, ServiceConfig(signer_backend="pkcs11"), clock=clock)


@pytest.fixture
def make_policy(service) -> Callable[..., Policy]:
    """Create a policy as the tenant admin (a fresh CA key in the HSM)."""

    def make(pid: str = "web", action: str = "auto", **kw: object) -> Policy:
        return service.policies.create(CAROL, policy_doc(pid, action, **kw))

    return make


@pytest.fixture
def user_key() -> Callable[[], str]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    def make() -> str:
        return ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()

    return make
