"""Fast service tests: the use cases over the in-memory Store (tests/memstore.py, held to the same
contract as Table Storage by tests/contract/test_store.py), a real SoftHSM token for the CA keys,
and a clock the test moves (tests/service/helpers.py). Identities are built directly: token
verification has its own tests."""

from __future__ import annotations

import uuid
from dataclasses import replace
from typing import Callable, Iterator

import pytest

from functions.core.audit import AuditEntry, link
from functions.core.policy import CaKeyRef, Policy
from functions.core.policydoc import policy_from_document
from functions.service import Service, ServiceConfig
from tests.memstore import MemoryStore
from tests.realparts import unavailable

from .helpers import CAROL, HOST_NAMESPACES, T0, Clock, policy_doc


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
    return Service(store, keys, ServiceConfig(signer_backend="pkcs11", host_namespaces=HOST_NAMESPACES), clock=clock)


@pytest.fixture(scope="session")
def shared_ca(keys) -> CaKeyRef:
    """One CA key in the HSM for the policies of tests that are not about making, rotating or
    disabling CA keys (those go through service.policies and make their own)."""
    from functions.signing.base import ssh_fingerprint, ssh_public_key_line

    signer = keys.create_key(f"ez-service-tests-{uuid.uuid4().hex[:8]}", "EC-P256")
    return CaKeyRef(key_ref=signer.key_ref, backend="pkcs11", public_key=ssh_public_key_line(signer, "ezssh-ca:tests"),
                    fingerprint=ssh_fingerprint(signer.public_key()), state="current", created_at=int(T0))


@pytest.fixture
def make_policy_on(shared_ca, clock) -> Callable[..., Policy]:
    """A policy stored as the tenant admin's create stores it (the validated document, its
    policy.created audit entry), with the shared CA key instead of a new one."""

    def make(store, pid: str = "web", action: str = "auto", **kw: object) -> Policy:
        policy = replace(policy_from_document(policy_doc(pid, action, **kw), tenant_id=CAROL.tid), ca=(shared_ca,))
        entry = link(AuditEntry(tenant_id=CAROL.tid, at=clock(), action="policy.created", outcome="ok",
                                actor_oid=CAROL.oid, actor_upn=CAROL.upn, policy_id=pid, chain=f"pol:{pid}",
                                details={"policy": policy.to_dict()}), None)
        return store.create_policy(replace(policy, audit_head=entry.hash), entry)

    return make


@pytest.fixture
def make_policy(store, make_policy_on) -> Callable[..., Policy]:
    """make_policy_on the test's store."""
    return lambda pid="web", action="auto", **kw: make_policy_on(store, pid, action, **kw)


@pytest.fixture
def user_key() -> Callable[[], str]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    def make() -> str:
        return ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()

    return make
