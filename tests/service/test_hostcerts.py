"""Host CAs and host certificates in the service (fast: memory store, SoftHSM, a movable clock):
a policy from before host CAs gets one at its next edit or first need (once, ETag-guarded, audited),
the host CA rotates and retires on its own window, deletion disables it, a token is checked
against the policy as it is at issuance; and who may vouch for what: host certificates only inside
the tenant's host namespaces and the policy's patterns, clients' known_hosts lines scoped to exactly
that, proof of possession at enrolment, and host calls without an identity counted, not stored."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from devstack.stack import enrol_with_token, sign_challenge
from functions.core.errors import CaKeyNotFound, Forbidden, InvalidRequest, PreconditionRequired, TooManyRequests
from functions.core.hostcert import ENROL_NAMESPACE, RENEW_NAMESPACE, HostNameRefused, ProofRefused
from functions.service import Service, ServiceConfig
from tests.memstore import UNAUTHENTICATED

from .helpers import ALICE, CAROL, PAT, cert_fields, host_key_file, pub_of


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
    token, rec = service.hostcerts.mint_token(CAROL, "narrow", ["db1.contoso.test"], 600)
    narrowed = service.policies.update(CAROL, "narrow", {"hosts": ["web*"]}, p.etag)
    with pytest.raises(HostNameRefused):
        enrol_with_token(service, CAROL.tid, "narrow", token, [host_key_file(tmp_path)])
    assert store.get_host_enrolment_token(CAROL.tid, rec.token_hash).used_at is None  # not used up
    service.policies.update(CAROL, "narrow", {"hosts": ["web*", "db*"]}, narrowed.etag)
    issued = enrol_with_token(service, CAROL.tid, "narrow", token, [host_key_file(tmp_path)])
    fields = cert_fields(issued.certificates[0][0].openssh, tmp_path)
    assert "host certificate" in fields and "db1.contoso.test" in fields
    # ten minutes later another token of the same kind has expired
    token2, _ = service.hostcerts.mint_token(CAROL, "narrow", ["db2.contoso.test"], 600)
    clock.advance(601)
    with pytest.raises(ProofRefused, match="expired"):
        enrol_with_token(service, CAROL.tid, "narrow", token2, [host_key_file(tmp_path)])


def test_asking_for_a_challenge_again_returns_the_same_one_so_anonymous_calls_cant_fill_storage(
        service, store, clock, tmp_path: Path):
    service.policies.create(CAROL, {"id": "renew", "rules": [{"users": ["*"], "action": "auto"}],
                                    "hosts": ["web*"], "principals": ["deploy"]})
    token, _ = service.hostcerts.mint_token(CAROL, "renew", ["web1.contoso.test"], 600)
    kf = host_key_file(tmp_path)
    key = pub_of(kf)
    enrol_with_token(service, CAROL.tid, "renew", token, [kf])
    rows = len(store._challenges)  # noqa: SLF001 - the enrolment's own challenge
    first = service.hostcerts.challenge(CAROL.tid, "renew", [key])
    again = [service.hostcerts.challenge(CAROL.tid, "renew", [key]) for _ in range(20)]
    assert {c.id for c in again} == {first.id} and {c.nonce for c in again} == {first.nonce}
    assert len(store._challenges) == rows + 1  # noqa: SLF001 - one row, however often it is asked for
    clock.advance(600)  # a later window: a new challenge
    later = service.hostcerts.challenge(CAROL.tid, "renew", [key])
    assert later.id != first.id and later.nonce != first.nonce and len(store._challenges) == rows + 2  # noqa: SLF001
    clock.advance(1200)  # all have expired: the housekeeping timer removes them
    assert service.housekeeping([CAROL.tid])["expired_host_challenges"] == rows + 2
    assert len(store._challenges) == 0  # noqa: SLF001


# ---- who may vouch for what ---------------------------------------------------------------------


def known_hosts_of(service) -> tuple[str, list[str]]:  # type: ignore[no-untyped-def]
    body = json.loads(service.known_hosts.client_trust(ALICE).data)
    return body["known_hosts"], body["policies"]


def _wide_policy(service, pid: str = "wide", hosts=("*",)):  # type: ignore[no-untyped-def]
    """A policy its own admin (PAT, no tenant admin) widened to every host."""
    p = service.policies.create(CAROL, {"id": pid, "rules": [{"users": ["*"], "action": "auto"}], "hosts": ["web*"],
                                        "principals": ["deploy"], "admins": {"groups": [next(iter(PAT.groups))]}})
    return service.policies.update(PAT, pid, {"hosts": list(hosts)}, p.etag)


def test_a_policy_admin_cant_make_his_host_ca_vouch_for_names_outside_the_namespaces(service, tmp_path: Path):
    _wide_policy(service)
    for outside in (["github.com"], ["web1"], ["*"], ["com"], ["8.8.8.8"], ["web1.contoso.test", "github.com"]):
        with pytest.raises(HostNameRefused):
            service.hostcerts.mint_token(PAT, "wide", outside)
    # inside the namespaces (*.contoso.test, 10.0.0.0/8) his policy's CA may vouch
    token, _ = service.hostcerts.mint_token(PAT, "wide", ["web1.contoso.test", "10.1.2.3"])
    issued = enrol_with_token(service, CAROL.tid, "wide", token, [host_key_file(tmp_path)])
    assert issued.principals == ("web1.contoso.test", "10.1.2.3")


def test_known_hosts_lines_are_scoped_to_the_namespaces_never_a_bare_star(service):
    _wide_policy(service, "wide", ("*", "fd00::/8", "10.0.0.0/8", "0.0.0.0/0"))
    text, ids = known_hosts_of(service)
    lines = [line for line in text.splitlines() if line.startswith("@cert-authority")]
    assert ids == ["wide"] and lines
    for line in lines:
        patterns = line.split()[1].split(",")
        assert "*" not in patterns and "*:*" not in patterns and "[*]:*" not in patterns, line
        assert all(p.startswith("!") or "contoso.test" in p or p.startswith(("10.", "[10.")) for p in patterns), line
    # the IPv6 range is in no namespace: no IPv6 pattern at all (never *:*)
    assert "fd00" not in text and "*:*" not in text
    # without namespaces a tenant's clients trust no host CA
    bare = Service(service.store, service.keys, ServiceConfig(signer_backend="pkcs11"), clock=service.clock)
    text, ids = known_hosts_of(bare)
    assert ids == [] and "@cert-authority" not in text and "no host namespaces" in text


def test_only_tenant_admins_set_the_namespaces_and_a_narrowing_drops_names_at_renewal(service, store, tmp_path: Path):
    _wide_policy(service)
    token, _ = service.hostcerts.mint_token(PAT, "wide", ["web1.contoso.test", "10.1.2.3"])
    kf = host_key_file(tmp_path)
    enrol_with_token(service, CAROL.tid, "wide", token, [kf])
    assert service.namespaces.view(PAT)["source"] == "setting"
    with pytest.raises(Forbidden):  # a policy admin can't widen (or change) them
        service.namespaces.replace(PAT, {"namespaces": ["*.contoso.test", "*.github.com"]}, None)
    with pytest.raises(InvalidRequest):
        service.namespaces.replace(CAROL, {"namespaces": ["*"]}, None)
    view = service.namespaces.replace(CAROL, {"namespaces": ["*.contoso.test"]}, None)  # no more 10/8
    assert view["source"] == "tenant" and view["namespaces"] == ["*.contoso.test"] and view["etag"]
    with pytest.raises(PreconditionRequired):
        service.namespaces.replace(CAROL, {"namespaces": ["*.contoso.test"]}, None)
    # the host renews: the address no longer fits and is dropped, and the drop is audited
    ch = service.hostcerts.challenge(CAROL.tid, "wide", [pub_of(kf)])
    renewed = service.hostcerts.renew(CAROL.tid, "wide", ch.id, [(pub_of(kf), sign_challenge(kf, ch.message,
                                                                                              RENEW_NAMESPACE))])
    assert renewed.principals == ("web1.contoso.test",)
    [entry] = [e for e in store.list_audit(CAROL.tid, limit=10_000) if e.action == "host_certificate.issued"
               and e.details.get("renewal")]
    assert any("10.1.2.3" in d for d in entry.details["dropped_names"])
    changed = [e for e in store.list_audit(CAROL.tid, limit=10_000) if e.action == "host_namespaces.changed"]
    assert changed[0].details["after"] == ["*.contoso.test"] and "10.0.0.0/8" in changed[0].details["before"]


def test_a_token_holder_cant_enrol_a_key_he_does_not_hold(service, store, tmp_path: Path):
    service.policies.create(CAROL, {"id": "pop", "rules": [{"users": ["*"], "action": "auto"}],
                                    "hosts": ["web*"], "principals": ["deploy"]})
    token, rec = service.hostcerts.mint_token(CAROL, "pop", ["web1.contoso.test"], 600)
    victim, mine = host_key_file(tmp_path), host_key_file(tmp_path)
    ch = service.hostcerts.challenge(CAROL.tid, "pop", [pub_of(victim)], token)
    for sig in (sign_challenge(mine, ch.message, ENROL_NAMESPACE),  # signed by another key
                sign_challenge(victim, ch.message, RENEW_NAMESPACE),  # the victim's renewal signature
                "not a signature"):
        with pytest.raises(ProofRefused):
            service.hostcerts.issue_with_token(CAROL.tid, "pop", token, ch.id, [(pub_of(victim), sig)])
    # a challenge issued for renewal (or for other keys) is no proof for this enrolment
    other = service.hostcerts.challenge(CAROL.tid, "pop", [pub_of(mine)], token)
    with pytest.raises(ProofRefused):
        service.hostcerts.issue_with_token(CAROL.tid, "pop", token, other.id,
                                           [(pub_of(victim), sign_challenge(victim, other.message, ENROL_NAMESPACE))])
    assert store.get_host_enrolment_token(CAROL.tid, rec.token_hash).used_at is None  # still usable
    assert store.list_host_keys(CAROL.tid, "pop") == []
    issued = service.hostcerts.issue_with_token(CAROL.tid, "pop", token, ch.id,
                                                [(pub_of(victim), sign_challenge(victim, ch.message, ENROL_NAMESPACE))])
    assert issued.principals == ("web1.contoso.test",)


def test_bad_host_posts_are_counted_and_rate_limited_not_stored(store, keys, clock, tmp_path: Path):
    service = Service(store, keys, ServiceConfig(signer_backend="pkcs11", host_namespaces=(
        (CAROL.tid, ("*.contoso.test",)),), request_rate=30), clock=clock)
    service.policies.create(CAROL, {"id": "anon", "rules": [{"users": ["*"], "action": "auto"}],
                                    "hosts": ["web*"], "principals": ["deploy"]})
    token, _ = service.hostcerts.mint_token(CAROL, "anon", ["web1.contoso.test"], 600)
    kf, other = host_key_file(tmp_path), host_key_file(tmp_path)
    enrol_with_token(service, CAROL.tid, "anon", token, [kf])

    def rows() -> int:
        return sum(len(v) for v in store._audit.values())  # noqa: SLF001 - every partition

    before, counted = rows(), service.base.anonymous_refusals.total
    # anyone with the host's public key gets its challenge, and posts signatures by another key
    ch = service.hostcerts.challenge(CAROL.tid, "anon", [pub_of(kf)])
    bad = sign_challenge(other, ch.message, RENEW_NAMESPACE)
    outcomes = []
    for _ in range(40):
        try:
            service.hostcerts.renew(CAROL.tid, "anon", ch.id, [(pub_of(kf), bad)])
        except (ProofRefused, TooManyRequests) as exc:
            outcomes.append(type(exc))
    assert rows() == before  # nothing written, in the tenant's partition or the unauthenticated one
    assert UNAUTHENTICATED not in store._audit or not store._audit[UNAUTHENTICATED]  # noqa: SLF001
    assert service.base.anonymous_refusals.total - counted == 40
    assert outcomes.count(ProofRefused) == 30 and outcomes.count(TooManyRequests) == 10  # 30 a minute
    # the host itself still renews once the minute has passed
    clock.advance(61)
    good = service.hostcerts.renew(CAROL.tid, "anon", ch.id, [(pub_of(kf), sign_challenge(kf, ch.message,
                                                                                          RENEW_NAMESPACE))])
    assert good.principals == ("web1.contoso.test",)


def test_known_hosts_is_unchanged_for_a_caller_who_has_it_until_something_changes(service, make_policy):
    make_policy("web")
    service.known_hosts.client_trust(ALICE)  # the policy's host CA is made on this first need (a write)
    first = service.known_hosts.client_trust(ALICE)
    again = service.known_hosts.client_trust(ALICE, {first.etag})
    assert again.unchanged and again.etag == first.etag and again.data == b""  # not rendered again
    other = service.known_hosts.client_trust(ALICE, {'"not-this"'})
    assert not other.unchanged and other.data == first.data
    # the same person in other groups is answered for who they are now, not from the last answer
    regrouped = replace(ALICE, groups=frozenset())
    assert not service.known_hosts.client_trust(regrouped, {first.etag}).unchanged
    # a policy written: a new answer, with a new tag
    make_policy("web2")
    service.known_hosts.client_trust(ALICE)
    changed = service.known_hosts.client_trust(ALICE, {first.etag})
    assert not changed.unchanged and changed.etag != first.etag
    assert "web2" in json.loads(changed.data)["policies"]


def test_a_stored_namespace_that_no_longer_passes_is_left_out_not_an_error(service, store):
    """The Public Suffix List grows: an entry stored before it named it narrows the namespaces, and
    host calls go on with the rest."""
    from functions.storage.base import HostNamespaces
    from functions.core.audit import AuditEntry

    row = HostNamespaces(tenant_id=CAROL.tid, namespaces=("*.contoso.test", "*.github.io"), updated_at=0,
                         updated_by_oid=CAROL.oid, updated_by_upn=CAROL.upn)
    store.put_host_namespaces(row, None, AuditEntry(CAROL.tid, 1.0, "test.setup", "ok").sealed())
    assert [str(n) for n in service.namespaces.current(CAROL.tid)] == ["*.contoso.test"]
