"""Host CAs and host certificates in the service (fast: memory store, SoftHSM, a movable clock):
a policy from before host CAs gets one at its next edit or first need (once, ETag-guarded, audited),
the host CA rotates and retires on its own window, deletion disables it, and a token is checked
against the policy as it is at issuance."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from functions.core.errors import CaKeyNotFound
from functions.core.hostcert import HostNameRefused, ProofRefused
from functions.service import Service, ServiceConfig

from .helpers import CAROL, PAT, cert_fields


def host_key() -> str:
    return ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()


def test_a_policy_from_before_host_cas_gets_one_at_its_next_edit(service, store, make_policy):
    old = make_policy("legacy")
    assert old.current_host_ca is None
    new = service.policies.update(PAT, "legacy", {"name": "Legacy web"}, old.etag)
    assert new.current_host_ca is not None and new.current_host_ca.public_key.split()[1] not in old.ca[0].public_key
    [entry] = [e for e in store.list_audit(CAROL.tid, limit=10_000) if e.action == "policy.updated"]
    assert entry.details["changed"]["host_ca"]["from"] == [] and entry.details["changed"]["name"]["to"] == "Legacy web"


def test_first_need_makes_one_host_ca_even_when_two_workers_race(store, keys, clock, make_policy):
    stale = make_policy("race")
    a = Service(store, keys, ServiceConfig(signer_backend="pkcs11"), clock=clock)
    b = Service(store, keys, ServiceConfig(signer_backend="pkcs11"), clock=clock)
    first = a.policies.ensure_host_ca(stale)
    second = b.policies.ensure_host_ca(stale)  # read before the first write: its write loses the ETag race
    assert first.current_host_ca == second.current_host_ca
    assert store.get_policy(CAROL.tid, "race").host_ca == first.host_ca
    made = [e for e in store.list_audit(CAROL.tid, limit=10_000) if e.action == "policy.host_ca_created"]
    assert len(made) == 1


def test_host_ca_rotation_retires_the_previous_key_after_the_host_certificate_window(service, store, keys, clock):
    p = service.policies.create(CAROL, {"id": "rot", "rules": [{"users": ["*"], "action": "auto"}],
                                        "hosts": ["web*"], "principals": ["deploy"], "host_cert_ttl": 86400})
    old_host = p.current_host_ca
    rotated = service.policies.rotate_ca(CAROL, "rot", p.etag, kind="host")
    assert rotated.ca == p.ca  # the user CA did not move
    assert [c.state for c in rotated.host_ca] == ["current", "previous"]
    prev = rotated.host_ca[1]
    assert prev.key_ref == old_host.key_ref
    assert 86400 <= prev.retire_after - int(clock.now) <= 86400 + 61
    assert [c.key_ref for c in service.policies.ca_public_keys(CAROL, "rot", "host")] == \
        [rotated.host_ca[0].key_ref, old_host.key_ref]
    clock.advance(86400 + 120)
    assert service.housekeeping([CAROL.tid])["retired_ca_keys"] == 1
    after = store.get_policy(CAROL.tid, "rot")
    assert [c.state for c in after.host_ca] == ["current", "retired"]
    with pytest.raises(CaKeyNotFound):
        keys.get_signer(old_host.key_ref)


def test_deleting_a_policy_disables_its_host_ca(service, keys):
    p = service.policies.create(CAROL, {"id": "gone", "rules": [{"users": ["*"], "action": "auto"}],
                                        "hosts": ["web*"], "principals": ["deploy"]})
    service.policies.delete(CAROL, "gone", p.etag)
    with pytest.raises(CaKeyNotFound):
        keys.get_signer(p.current_host_ca.key_ref)


def test_a_token_is_checked_against_the_policy_as_it_is_at_issuance(service, store, clock, tmp_path: Path):
    p = service.policies.create(CAROL, {"id": "narrow", "rules": [{"users": ["*"], "action": "auto"}],
                                        "hosts": ["web*", "db*"], "principals": ["deploy"]})
    token, rec = service.hostcerts.mint_token(CAROL, "narrow", ["db1"], 600)
    narrowed = service.policies.update(CAROL, "narrow", {"hosts": ["web*"]}, p.etag)
    with pytest.raises(HostNameRefused):
        service.hostcerts.issue_with_token(CAROL.tid, "narrow", token, [host_key()])
    assert store.get_host_enrolment_token(CAROL.tid, rec.token_hash).used_at is None  # not used up
    service.policies.update(CAROL, "narrow", {"hosts": ["web*", "db*"]}, narrowed.etag)
    issued = service.hostcerts.issue_with_token(CAROL.tid, "narrow", token, [host_key()])
    fields = cert_fields(issued.certificates[0][0].openssh, tmp_path)
    assert "host certificate" in fields and "db1" in fields
    # ten minutes later another token of the same kind has expired
    token2, _ = service.hostcerts.mint_token(CAROL, "narrow", ["db2"], 600)
    clock.advance(601)
    with pytest.raises(ProofRefused, match="expired"):
        service.hostcerts.issue_with_token(CAROL.tid, "narrow", token2, [host_key()])


def test_asking_for_a_challenge_again_returns_the_same_one_so_anonymous_calls_cant_fill_storage(
        service, store, clock):
    service.policies.create(CAROL, {"id": "renew", "rules": [{"users": ["*"], "action": "auto"}],
                                    "hosts": ["web*"], "principals": ["deploy"]})
    token, _ = service.hostcerts.mint_token(CAROL, "renew", ["web1"], 600)
    key = host_key()
    service.hostcerts.issue_with_token(CAROL.tid, "renew", token, [key])
    first = service.hostcerts.challenge(CAROL.tid, "renew", [key])
    again = [service.hostcerts.challenge(CAROL.tid, "renew", [key]) for _ in range(50)]
    assert {c.id for c in again} == {first.id} and {c.nonce for c in again} == {first.nonce}
    assert len(store._challenges) == 1  # noqa: SLF001 - one row, however often it is asked for
    clock.advance(600)  # a later window: a new challenge
    later = service.hostcerts.challenge(CAROL.tid, "renew", [key])
    assert later.id != first.id and later.nonce != first.nonce and len(store._challenges) == 2  # noqa: SLF001
    clock.advance(1200)  # both have expired: the housekeeping timer removes them
    assert service.housekeeping([CAROL.tid])["expired_host_challenges"] == 2
    assert len(store._challenges) == 0  # noqa: SLF001
