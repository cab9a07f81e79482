"""Policies: create with a CA key of its own in the HSM, change only with the current ETag, delete
(issuance stops, the CA key is disabled, records stay), rotate and retire CA keys; the policy's own
audit chain records each change."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import hashes, serialization

from functions.core.audit import GENESIS, verify_chain
from functions.core.errors import (CaKeyNotFound, Conflict, Forbidden, InvalidRequest, NoPolicyForHost, NotFound,
                                   PreconditionFailed, PreconditionRequired, PrincipalNotAllowed)
from functions.core.evaluation import AccessRequest

from .helpers import ALICE, CAROL, ERIN, PAT, T0, policy_doc


def policy_chain(store, pid: str) -> list:
    return [e for e in store.list_audit(CAROL.tid, limit=10_000) if e.chain == f"pol:{pid}"]


def assert_policy_chain(service, store, pid: str, *actions: str) -> None:
    entries = policy_chain(store, pid)
    assert [e.action for e in entries] == list(actions)
    assert entries[0].prev_hash == GENESIS
    assert verify_chain(entries, head=store.get_policy(CAROL.tid, pid).audit_head)


def openssh_public(signer) -> str:
    return signer.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                            serialization.PublicFormat.OpenSSH).decode()


def test_create_makes_a_ca_key_in_the_hsm(service, store, keys):
    p = service.policies.create(CAROL, policy_doc("web"))
    assert p.etag and [c.state for c in p.ca] == ["current"] and p.ca[0].backend == "pkcs11"
    signer = keys.get_signer(p.ca[0].key_ref)
    assert p.ca[0].public_key.split()[:2] == openssh_public(signer).split()[:2]
    assert store.get_policy(CAROL.tid, "web").etag == p.etag
    assert_policy_chain(service, store, "web", "policy.created")
    other = service.policies.create(CAROL, policy_doc("db", hosts=["db*"]))
    assert other.ca[0].fingerprint != p.ca[0].fingerprint  # one CA per policy


def test_create_is_for_tenant_admins_and_refuses_bad_or_duplicate_documents(service, store, clock):
    with pytest.raises(Forbidden):
        service.policies.create(PAT, policy_doc("web"))
    with pytest.raises(InvalidRequest):
        service.policies.create(CAROL, {**policy_doc("web"), "ca": []})  # server-managed field
    with pytest.raises(InvalidRequest):
        service.policies.create(CAROL, policy_doc("web", max_ttl=10 * 24 * 3600))
    assert store.list_policies(CAROL.tid) == []
    service.policies.create(CAROL, policy_doc("web"))
    clock.advance(1)
    with pytest.raises(Conflict):
        service.policies.create(CAROL, policy_doc("web", name="again"))
    refusals = [e.action for e in store.list_audit(CAROL.tid) if e.outcome == "refused"]
    assert refusals == ["policy.create.refused"] * 4


def test_update_needs_the_current_etag(service, store, clock):
    p = service.policies.create(CAROL, policy_doc("web"))
    clock.advance(1)
    with pytest.raises(PreconditionRequired):
        service.policies.update(PAT, "web", {"max_ttl": 3600}, None)
    changed = service.policies.update(PAT, "web", {"max_ttl": 3600}, p.etag)  # a policy admin may change it
    assert changed.max_ttl == 3600 and changed.etag != p.etag
    assert store.get_policy(CAROL.tid, "web").etag == changed.etag
    clock.advance(1)
    with pytest.raises(PreconditionFailed):  # read before the change above
        service.policies.update(CAROL, "web", {"max_ttl": 60}, p.etag)
    with pytest.raises(Forbidden):
        service.policies.update(ALICE, "web", {"max_ttl": 60}, changed.etag)
    with pytest.raises(NotFound):
        service.policies.update(ERIN, "web", {"max_ttl": 60}, changed.etag)
    with pytest.raises(InvalidRequest):
        service.policies.update(CAROL, "web", {"ca": []}, changed.etag)
    assert store.get_policy(CAROL.tid, "web").max_ttl == 3600
    assert_policy_chain(service, store, "web", "policy.created", "policy.updated")
    updated = policy_chain(store, "web")[1]
    assert updated.actor_oid == PAT.oid and updated.details["changed"] == {"max_ttl": {"from": 8 * 3600, "to": 3600}}


def test_the_issuance_path_sees_a_change_at_once(service, user_key, clock):
    p = service.policies.create(CAROL, policy_doc("web"))
    assert service.issuance.request_access(ALICE, AccessRequest(host="web1", principal="deploy"), user_key())
    service.policies.update(CAROL, "web", {"principals": ["{username}"]}, p.etag)
    with pytest.raises(PrincipalNotAllowed):
        service.issuance.request_access(ALICE, AccessRequest(host="web1", principal="deploy"), user_key())


def test_delete_stops_issuance_disables_the_key_and_keeps_the_records(service, store, keys, user_key, clock):
    p = service.policies.create(CAROL, policy_doc("web"))
    issued = service.issuance.request_access(ALICE, AccessRequest(host="web1", principal="alice"), user_key())
    clock.advance(1)
    with pytest.raises(PreconditionRequired):
        service.policies.delete(CAROL, "web", None)
    with pytest.raises(Forbidden):  # policy admins change it; only tenant admins delete it
        service.policies.delete(PAT, "web", p.etag)
    gone = service.policies.delete(CAROL, "web", p.etag)
    assert gone.deleted and [c.state for c in gone.ca] == ["retired"]
    with pytest.raises(CaKeyNotFound):
        keys.get_signer(p.ca[0].key_ref).sign(b"x", hashes.SHA256())
    clock.advance(1)
    with pytest.raises(NoPolicyForHost):
        service.issuance.request_access(ALICE, AccessRequest(host="web1", principal="alice"), user_key())
    with pytest.raises(NotFound):
        service.policies.get(CAROL, "web")
    assert store.get_certificate(CAROL.tid, "web", issued.certificate.serial).key_id == issued.certificate.key_id
    assert_policy_chain(service, store, "web", "policy.created", "policy.deleted")


def test_rotation_keeps_the_old_key_trusted_until_retirement(service, store, keys, user_key, clock):
    p = service.policies.create(CAROL, policy_doc("web", max_ttl=7200))
    old = p.ca[0]
    clock.advance(10)
    with pytest.raises(Forbidden):
        service.policies.rotate_ca(ALICE, "web")
    with pytest.raises(PreconditionFailed):
        service.policies.rotate_ca(PAT, "web", 'W/"stale"')
    rotated = service.policies.rotate_ca(PAT, "web", p.etag)
    new = rotated.current_ca
    assert new.fingerprint != old.fingerprint
    assert [(c.state, c.fingerprint) for c in rotated.ca] == [("current", new.fingerprint), ("previous", old.fingerprint)]
    assert [c.fingerprint for c in service.policies.ca_public_keys(ALICE, "web")] == [new.fingerprint, old.fingerprint]
    out = service.issuance.request_access(ALICE, AccessRequest(host="web1", principal="alice"), user_key())
    assert out.certificate.ca_fingerprint == new.fingerprint

    retire_at = int(T0) + 10 + 7200 + 60  # max_ttl plus the backdate after the rotation
    clock.now = retire_at - 1
    assert service.policies.retire_due_ca_keys(CAROL.tid) == []
    keys.get_signer(old.key_ref)  # still there
    clock.now = retire_at
    assert service.policies.retire_due_ca_keys(CAROL.tid) == [old.fingerprint]
    assert service.policies.retire_due_ca_keys(CAROL.tid) == []
    with pytest.raises(CaKeyNotFound):
        keys.get_signer(old.key_ref)
    assert [c.fingerprint for c in service.policies.ca_public_keys(ALICE, "web")] == [new.fingerprint]
    assert_policy_chain(service, store, "web", "policy.created", "policy.ca_rotated", "policy.ca_retired")
