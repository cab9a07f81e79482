"""Revocation and the KRL hosts fetch. The KRL is read by OpenSSH itself: `ssh-keygen -Q` says which
certificates it revokes, `ssh-keygen -Ql` lists what it holds."""

from __future__ import annotations

import uuid

import pytest

from functions.core.errors import Conflict, Forbidden, InvalidRequest, NotFound, Unauthenticated
from functions.core.evaluation import AccessRequest

from .helpers import ALICE, BOB, CAROL, ERIN, PAT, T0, ssh_keygen


@pytest.fixture
def issue(service, make_policy, user_key, clock):
    make_policy("web", max_ttl=7200)

    def issue_one(who=ALICE):
        clock.advance(1)
        return service.issuance.request_access(
            who, AccessRequest(host="web1", principal=who.upn.split("@")[0], ttl_seconds=3600), user_key()).certificate

    return issue_one


def _write(tmp_path, krl: bytes) -> str:
    f = tmp_path / f"{uuid.uuid4().hex[:8]}.krl"
    f.write_bytes(krl)
    return str(f)


def revoked_by_openssh(krl: bytes, certs, tmp_path) -> list[bool]:
    """For each certificate, whether OpenSSH's ssh-keygen -Q finds it revoked by `krl`."""
    k = _write(tmp_path, krl)
    out = []
    for c in certs:
        f = tmp_path / f"{c.serial}-cert.pub"
        f.write_text(c.openssh + "\n")
        r = ssh_keygen("-Q", "-f", k, str(f), check=False)
        assert r.returncode in (0, 1), r.stderr
        assert ("REVOKED" in r.stdout) == (r.returncode == 1), r.stdout
        out.append(r.returncode == 1)
    return out


def test_revoked_certificates_are_in_the_krl_and_others_are_not(service, store, issue, clock, tmp_path):
    a, b, c = issue(), issue(), issue(BOB)
    assert revoked_by_openssh(service.hosts.krl_for(ALICE, "web").data, [a, b, c], tmp_path) == [False] * 3
    clock.now = T0 + 100
    rec = service.hosts.revoke_certificate(PAT, "web", b.serial, reason="laptop lost")
    assert rec.revoked_by == PAT.upn and rec.revoked_at == int(T0) + 100
    assert store.get_certificate(ALICE.tid, "web", b.serial).revoked_at == int(T0) + 100
    service.hosts.revoke_certificate(BOB, "web", c.serial)  # one's own certificate
    krl = service.hosts.krl_for(ALICE, "web").data
    assert revoked_by_openssh(krl, [a, b, c], tmp_path) == [False, True, True]
    listing = ssh_keygen("-Q", "-l", "-f", _write(tmp_path, krl)).stdout
    assert str(b.serial) in listing and str(c.serial) in listing and str(a.serial) not in listing
    entries = [e for e in store.list_audit(ALICE.tid) if e.action == "certificate.revoked"]
    assert [(e.serial, e.actor_oid, e.details["reason"]) for e in entries] == \
        [(str(b.serial), PAT.oid, "laptop lost"), (str(c.serial), BOB.oid, None)]


def test_the_krl_is_byte_stable_until_something_changes(service, issue, clock):
    a = issue()
    first = service.hosts.krl_for(ALICE, "web").data
    clock.advance(30)
    assert service.hosts.krl_for(ALICE, "web").data == first
    service.hosts.revoke_certificate(CAROL, "web", a.serial)
    assert service.hosts.krl_for(ALICE, "web").data != first


def test_who_may_revoke(service, store, issue):
    a = issue()
    with pytest.raises(Forbidden):  # a member, not the requester
        service.hosts.revoke_certificate(BOB, "web", a.serial)
    with pytest.raises(NotFound):  # another tenant
        service.hosts.revoke_certificate(ERIN, "web", a.serial)
    with pytest.raises(NotFound):
        service.hosts.revoke_certificate(CAROL, "web", a.serial + 1 if a.serial < 2**63 - 1 else 1)
    with pytest.raises(InvalidRequest):
        service.hosts.revoke_certificate(CAROL, "web", a.serial, reason="two\nlines")
    assert store.list_revoked(ALICE.tid, "web", valid_from=0) == []
    first = service.hosts.revoke_certificate(ALICE, "web", a.serial)
    with pytest.raises(Conflict) as lost:  # somebody else's revocation came first: it says whose
        service.hosts.revoke_certificate(CAROL, "web", a.serial)
    assert lost.value.details["revoked_by"] == ALICE.upn and ALICE.upn in lost.value.message
    # alice again (a retry after a lost answer): her revocation as recorded, nothing written twice
    again = service.hosts.revoke_certificate(ALICE, "web", a.serial)
    assert (again.revoked_at, again.revoked_by_oid) == (first.revoked_at, ALICE.oid)
    assert [r.serial for r in store.list_revoked(ALICE.tid, "web", valid_from=0)] == [a.serial]
    assert [e.action for e in store.list_audit(ALICE.tid, limit=1000)
            if e.serial == str(a.serial)].count("certificate.revoked") == 1


def test_expired_certificates_leave_the_krl_after_the_grace(service, issue, clock, tmp_path):
    a = issue()
    service.hosts.revoke_certificate(CAROL, "web", a.serial)
    clock.now = a.valid_before + 3600 - 1  # valid_before plus an hour's grace for lagging host clocks
    assert revoked_by_openssh(service.hosts.krl_for(ALICE, "web").data, [a], tmp_path) == [True]
    clock.now = a.valid_before + 3600 + 1
    assert revoked_by_openssh(service.hosts.krl_for(ALICE, "web").data, [a], tmp_path) == [False]


def test_a_rotated_out_key_keeps_its_revocations_while_trusted(service, issue, clock, tmp_path):
    old = issue()
    service.hosts.revoke_certificate(CAROL, "web", old.serial)
    p = service.store.get_policy(ALICE.tid, "web")
    service.policies.rotate_ca(CAROL, "web", p.etag)
    new = issue()
    service.hosts.revoke_certificate(CAROL, "web", new.serial)
    assert revoked_by_openssh(service.hosts.krl_for(ALICE, "web").data, [old, new], tmp_path) == [True, True]


def test_hosts_fetch_the_krl_with_the_policys_host_token(service, store, issue, clock, tmp_path):
    a = issue()
    service.hosts.revoke_certificate(CAROL, "web", a.serial)
    script = service.hosts.host_setup_script(PAT, "web", "https://ezssh.example.net")
    token = store.get_host_token(ALICE.tid, "web")
    assert token and token in script
    assert service.hosts.host_setup_script(CAROL, "web", "https://ezssh.example.net") == script  # same token
    krl = service.hosts.krl_for_host(ALICE.tid, "web", token).data
    assert krl == service.hosts.krl_for(ALICE, "web").data
    before = service.base.anonymous_refusals.total
    for tid, pid, tok in ((ALICE.tid, "web", token[:-1] + "x"), (ERIN.tid, "web", token), (ALICE.tid, "db", token)):
        with pytest.raises(Unauthenticated):
            service.hosts.krl_for_host(tid, pid, tok)
    with pytest.raises(InvalidRequest):
        service.hosts.krl_for_host(None, "web", token)
    # refusals without an identity are counted and logged, never one storage row each
    assert service.base.anonymous_refusals.total == before + 4
    assert not [e for e in store.list_audit("_unauthenticated") if e.action == "krl.refused"]


def test_a_revocation_dated_before_the_last_build_is_in_the_krl_within_the_hour(service, store, issue, clock,
                                                                               tmp_path):
    """A worker holding the KRL reads what was revoked since its last build, less 5 minutes; a
    revocation from a worker whose clock is further behind shows once the KRL is read whole again
    (at least hourly)."""
    from functions.service import Service

    a = issue()
    service.hosts.krl_for(ALICE, "web")
    behind = Service(store, service.keys, service.base.config, clock=lambda: clock.now - 1200)
    behind.hosts.revoke_certificate(CAROL, "web", a.serial)
    service.hosts.krl_for(ALICE, "web")
    clock.advance(3600)
    assert revoked_by_openssh(service.hosts.krl_for(ALICE, "web").data, [a], tmp_path) == [True]
