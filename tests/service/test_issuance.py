"""Asking for access: auto-approval with a certificate, approval needed, refusals; what is stored and
audited for each. Certificates are read back with OpenSSH's ssh-keygen, not with the code that made them."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from functions.core.audit import verify_chain
from functions.core.errors import (Conflict, Denied, Forbidden, InvalidPublicKey, NoPolicyForHost,
                                   PrincipalNotAllowed, TtlTooLong)
from functions.core.evaluation import AccessRequest

from .helpers import ALICE, APPROVERS, BOB, ERIN, T0, cert_fields


def ask(host: str = "web1", principal: str = "alice", **kw) -> AccessRequest:
    return AccessRequest(host=host, principal=principal, **kw)


def utc(ts: int) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")


def test_auto_approval_issues_a_recorded_and_audited_certificate(service, store, make_policy, user_key, tmp_path,
                                                                 monkeypatch):
    policy = make_policy("web", extensions=["permit-pty", "permit-agent-forwarding"])
    out = service.issuance.request_access(ALICE, ask(ttl_seconds=1800, reason="deploy"), user_key())
    assert out.status == "issued"
    cert = out.certificate
    monkeypatch.setenv("TZ", "UTC")
    shown = cert_fields(cert.openssh, tmp_path)
    assert f'Key ID: "ezssh/web/{out.request.id}/alice@contoso.test"' in shown
    assert f"Serial: {cert.serial}" in shown and cert.serial > 0
    assert f"Valid: from {utc(int(T0) - 60)} to {utc(int(T0) + 1800)}" in shown  # backdated 60 s, TTL asked
    assert policy.current_ca.fingerprint in shown  # signed by this policy's own CA
    principals = shown.split("Principals:")[1].split("Critical Options:")[0].split()
    assert principals == ["alice"]
    extensions = shown.split("Extensions:")[1].split()
    assert sorted(extensions) == ["permit-agent-forwarding", "permit-pty"]

    stored = store.get_request(ALICE.tid, out.request.id)
    assert stored.state == "issued" and stored.serial == cert.serial
    record = store.get_certificate(ALICE.tid, "web", cert.serial)
    assert record.certificate == cert.openssh and record.request_id == stored.id and record.principals == ("alice",)
    chain = store.list_audit(ALICE.tid, request_id=stored.id)
    assert [e.action for e in chain] == ["request.created", "certificate.issued"]
    assert chain[1].serial == str(cert.serial) and chain[1].key_id == cert.key_id
    assert verify_chain(chain, head=stored.audit_head)


def test_default_ttl_and_the_ttl_ceiling(service, make_policy, user_key):
    make_policy("web", default_ttl=900, max_ttl=3600)
    out = service.issuance.request_access(ALICE, ask(), user_key())
    assert out.certificate.valid_before == int(T0) + 900
    with pytest.raises(TtlTooLong):
        service.issuance.request_access(ALICE, ask(ttl_seconds=3601), user_key())


def test_approval_rule_makes_a_pending_request_and_no_certificate(service, store, make_policy, user_key):
    make_policy("gated", "approval", approvals_required=2)
    out = service.issuance.request_access(ALICE, ask(), user_key())
    assert out.status == "pending" and out.certificate is None and out.approvers_needed == 2
    assert out.approvers == {"users": [], "groups": [APPROVERS]}
    rec = store.get_request(ALICE.tid, out.request.id)
    assert rec.state == "pending" and rec.expires_at == int(T0) + 3600  # the policy's request_ttl
    assert store.list_revoked(ALICE.tid, "gated", valid_from=0) == []
    assert [e.action for e in store.list_audit(ALICE.tid, request_id=rec.id)] == ["request.created"]


def test_auto_approval_without_a_key_waits_for_one(service, store, make_policy, user_key, clock):
    make_policy("web")
    out = service.issuance.request_access(ALICE, ask(), None)
    assert out.status == "approved" and out.certificate is None
    clock.advance(1)
    with pytest.raises(Forbidden):  # only the requester fetches it
        service.issuance.issue_for_request(BOB, out.request.id, user_key())
    clock.advance(1)
    got = service.issuance.issue_for_request(ALICE, out.request.id, user_key())
    assert got.status == "issued" and got.certificate.principals == ("alice",)
    assert got.certificate.valid_after == int(T0) + 2 - 60
    clock.advance(1)
    with pytest.raises(Conflict):  # one approved request, one certificate
        service.issuance.issue_for_request(ALICE, out.request.id, user_key())
    actions = [e.action for e in store.list_audit(ALICE.tid, request_id=out.request.id)]
    assert actions == ["request.created", "certificate.refused", "certificate.issued", "certificate.refused"]


@pytest.mark.parametrize("case,request_,error,code", [
    ("deny rule", ask(host="web1"), Denied, "denied"),
    ("no policy for the host", ask(host="db1"), NoPolicyForHost, "no_policy_for_host"),
    ("login not allowed", ask(principal="root"), PrincipalNotAllowed, "principal_not_allowed"),
])
def test_refusals_are_audited_and_create_nothing(service, store, make_policy, user_key, case, request_, error, code):
    make_policy("web", "deny" if case == "deny rule" else "auto")
    with pytest.raises(error):
        service.issuance.request_access(ALICE, request_, user_key())
    assert store.list_requests(ALICE.tid) == []
    refused = [e for e in store.list_audit(ALICE.tid) if e.action == "request.refused"]
    assert len(refused) == 1 and refused[0].outcome == "refused" and refused[0].actor_oid == ALICE.oid
    assert refused[0].host == request_.host and refused[0].error_code == code


def test_a_bad_key_is_refused_before_anything_is_signed(service, store, make_policy):
    make_policy("web")
    with pytest.raises(InvalidPublicKey):
        service.issuance.request_access(ALICE, ask(), "ssh-ed25519 AAAAnotakey")
    assert store.list_requests(ALICE.tid) == []
    assert [e.error_code for e in store.list_audit(ALICE.tid) if e.action == "request.refused"] == ["invalid_public_key"]


def test_another_tenant_never_uses_the_policy(service, store, make_policy, user_key):
    make_policy("web")
    with pytest.raises(NoPolicyForHost):
        service.issuance.request_access(ERIN, ask(principal="erin", policy_id="web"), user_key())
    assert store.list_requests(ERIN.tid) == [] and store.list_requests(ALICE.tid) == []
