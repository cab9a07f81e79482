"""functions.core.requests: the access request state machine (and functions.core.serials: its ids)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from functions.core import requests as ap
from functions.core.requests import APPROVED, CANCELLED, DENIED, EXPIRED, FINAL_STATES, ISSUE_WINDOW, ISSUED, PENDING, RequestRecord
from functions.core.errors import Conflict, Forbidden
from functions.core.policy import Identity

TID = "tenant-a"
T0 = 1_700_000_000
REQUEST_TTL = 3600

REQUESTER = Identity(oid="oid-req", tid=TID, upn="req@contoso.example")
AP1 = Identity(oid="oid-ap1", tid=TID, upn="ap1@contoso.example")
AP2 = Identity(oid="oid-ap2", tid=TID, upn="ap2@contoso.example")
AP3 = Identity(oid="oid-ap3", tid=TID, upn="ap3@contoso.example")


def record(n: int = 1, **over) -> RequestRecord:
    fields = dict(
        id="req-1",
        tenant_id=TID,
        policy_id="web",
        requester_oid=REQUESTER.oid,
        requester_upn=REQUESTER.upn,
        host="web1",
        principal="deploy",
        ttl_seconds=900,
        state=PENDING,
        created_at=T0,
        expires_at=T0 + REQUEST_TTL,
        approvals_required=n,
        reason="deploy hotfix",
    )
    fields.update(over)
    return RequestRecord(**fields)


def approved_record(n: int = 1, at: int = T0 + 10) -> RequestRecord:
    rec = record(n)
    for i, who in enumerate([AP1, AP2, AP3][:n]):
        rec = ap.approve(rec, who, at + i)
    assert rec.state == APPROVED
    return rec


# ---- approvals -------------------------------------------------------------------------------


def test_single_approval_approves_and_opens_the_issue_window():
    rec = record(1)
    out = ap.approve(rec, AP1, T0 + 100, comment="ok")
    assert out.state == APPROVED
    assert out.decided_by == "ap1@contoso.example" and out.decided_at == T0 + 100
    assert out.expires_at == T0 + 100 + ISSUE_WINDOW
    assert [a.to_dict() for a in out.approvals] == [
        {"oid": "oid-ap1", "tid": TID, "upn": "ap1@contoso.example", "name": AP1.name, "at": T0 + 100,
         "comment": "ok"}
    ]
    assert rec.state == PENDING and rec.approvals == ()  # the input is not changed


def test_two_of_three_needs_two_different_approvers():
    rec = record(2)
    one = ap.approve(rec, AP1, T0 + 1)
    assert one.state == PENDING and len(one.approvals) == 1
    assert one.expires_at == T0 + REQUEST_TTL and one.decided_by is None
    with pytest.raises(Conflict) as info:
        ap.approve(one, AP1, T0 + 2)
    assert "counts once" in info.value.message
    two = ap.approve(one, AP2, T0 + 3)
    assert two.state == APPROVED
    assert [a.oid for a in two.approvals] == ["oid-ap1", "oid-ap2"]
    assert two.decided_by == "ap2@contoso.example" and two.expires_at == T0 + 3 + ISSUE_WINDOW
    with pytest.raises(Conflict) as info:
        ap.approve(two, AP3, T0 + 4)  # already approved: a third approval changes nothing
    # and the one that lost says which decision won and whose it was
    assert info.value.details == {"state": APPROVED, "decided_by": "ap2@contoso.example", "decided_at": T0 + 3}
    assert "already approved by ap2@contoso.example" in info.value.message
    assert two.decided_by_oid == "oid-ap2"


def test_a_decision_already_on_record_is_recognised_by_object_id_not_name():
    one = ap.approve(record(2), AP1, T0 + 1)
    assert ap.already_decided(one, AP1, "approve") and not ap.already_decided(one, AP2, "approve")
    renamed = replace(AP1, upn="renamed@contoso.example")
    assert ap.already_decided(one, renamed, "approve")
    denied = ap.deny(one, AP2, T0 + 2)
    assert ap.already_decided(denied, AP2, "deny") and not ap.already_decided(denied, AP1, "deny")
    assert not ap.already_decided(denied, replace(AP3, upn=AP2.upn), "deny")  # same name, other person
    assert not ap.already_decided(one, AP2, "deny")


def test_same_approver_with_a_new_upn_still_counts_once():
    rec = ap.approve(record(2), AP1, T0 + 1)
    renamed = Identity(oid=AP1.oid, tid=TID, upn="ap1.renamed@contoso.example")
    with pytest.raises(Conflict):
        ap.approve(rec, renamed, T0 + 2)


def test_same_oid_from_another_tenant_is_a_different_approver():
    rec = ap.approve(record(2), AP1, T0 + 1)
    guest = Identity(oid=AP1.oid, tid="tenant-b", upn=AP1.upn)
    assert ap.approve(rec, guest, T0 + 2).state == APPROVED


def test_requester_cannot_approve_own_request():
    with pytest.raises(Forbidden) as info:
        ap.approve(record(1), REQUESTER, T0 + 1)
    assert info.value.status == 403 and "own request" in info.value.message
    # even when another approval is already in
    with pytest.raises(Forbidden):
        ap.approve(ap.approve(record(2), AP1, T0 + 1), REQUESTER, T0 + 2)


def test_requester_is_oid_and_tid_not_upn():
    rec = record(1)
    same_upn_other_oid = Identity(oid="oid-someone-else", tid=TID, upn=REQUESTER.upn)
    assert not rec.requester_is(same_upn_other_oid)
    assert ap.approve(rec, same_upn_other_oid, T0 + 1).state == APPROVED

    same_oid_other_tid = Identity(oid=REQUESTER.oid, tid="tenant-b", upn=REQUESTER.upn)
    assert not rec.requester_is(same_oid_other_tid)
    assert ap.approve(rec, same_oid_other_tid, T0 + 1).state == APPROVED

    assert rec.requester_is(Identity(oid=REQUESTER.oid, tid=TID, upn="renamed@contoso.example"))


def test_approval_after_expiry_is_a_conflict():
    with pytest.raises(Conflict) as info:
        ap.approve(record(1), AP1, T0 + REQUEST_TTL)
    assert info.value.details == {"state": EXPIRED}
    assert ap.approve(record(1), AP1, T0 + REQUEST_TTL - 1).state == APPROVED


# ---- deny and cancel -------------------------------------------------------------------------


def test_deny_ends_it():
    rec = ap.approve(record(2), AP1, T0 + 1)
    out = ap.deny(rec, AP2, T0 + 2, comment="not today")
    assert out.state == DENIED and out.decided_by == "ap2@contoso.example"
    assert out.decided_at == T0 + 2 and out.comment == "not today"
    for step in (lambda r: ap.approve(r, AP3, T0 + 3), lambda r: ap.deny(r, AP3, T0 + 3),
                 lambda r: ap.cancel(r, REQUESTER, T0 + 3),
                 lambda r: ap.mark_issued(r, REQUESTER, T0 + 3, serial=1, key_id="k")):
        with pytest.raises(Conflict):
            step(out)


def test_an_approved_request_is_final_a_late_deny_is_a_conflict():
    approved = approved_record(1)
    with pytest.raises(Conflict) as info:
        ap.deny(approved, AP2, T0 + 20)
    assert info.value.details == {"state": APPROVED, "decided_by": approved.decided_by,
                                  "decided_at": approved.decided_at}
    assert ap.mark_issued(approved, REQUESTER, T0 + 21, serial=1, key_id="k").state == "issued"


def test_requester_cannot_deny_own_request():
    with pytest.raises(Forbidden) as info:
        ap.deny(record(1), REQUESTER, T0 + 1)
    assert "Cancel" in info.value.message


def test_cancel_only_by_the_requester():
    with pytest.raises(Forbidden):
        ap.cancel(record(1), AP1, T0 + 1)
    with pytest.raises(Forbidden):
        ap.cancel(record(1), Identity(oid="x", tid=TID, upn=REQUESTER.upn), T0 + 1)
    with pytest.raises(Forbidden):
        ap.cancel(record(1), Identity(oid=REQUESTER.oid, tid="tenant-b", upn=REQUESTER.upn), T0 + 1)
    out = ap.cancel(record(1), REQUESTER, T0 + 1, comment="not needed")
    assert out.state == CANCELLED and out.decided_by == REQUESTER.upn and out.comment == "not needed"
    assert ap.cancel(approved_record(1), REQUESTER, T0 + 30).state == CANCELLED
    with pytest.raises(Conflict):
        ap.cancel(out, REQUESTER, T0 + 2)


# ---- expiry ----------------------------------------------------------------------------------


def test_effective_state_expires_pending_and_approved_but_not_final_states():
    rec = record(1)
    assert rec.effective_state(T0 + REQUEST_TTL - 1) == PENDING
    assert rec.effective_state(T0 + REQUEST_TTL) == EXPIRED
    assert rec.to_public(T0 + REQUEST_TTL)["status"] == EXPIRED
    approved = approved_record(1, at=T0 + 10)
    assert approved.effective_state(T0 + 10 + ISSUE_WINDOW - 1) == APPROVED
    assert approved.effective_state(T0 + 10 + ISSUE_WINDOW) == EXPIRED
    for final in (DENIED, CANCELLED, ISSUED):
        assert replace(rec, state=final).effective_state(T0 + 10 * REQUEST_TTL) == final


def test_approved_request_expires_after_the_issue_window():
    rec = approved_record(1, at=T0 + 10)
    with pytest.raises(Conflict) as info:
        ap.mark_issued(rec, REQUESTER, T0 + 10 + ISSUE_WINDOW, serial=5, key_id="k")
    assert info.value.details == {"state": EXPIRED}
    assert ap.mark_issued(rec, REQUESTER, T0 + 10 + ISSUE_WINDOW - 1, serial=5, key_id="k").state == ISSUED


def test_issue_window_is_measured_from_the_final_approval_even_past_the_request_deadline():
    # approved one second before the request would have expired: the window still applies
    rec = ap.approve(record(1), AP1, T0 + REQUEST_TTL - 1)
    assert rec.expires_at == T0 + REQUEST_TTL - 1 + ISSUE_WINDOW
    assert rec.effective_state(T0 + REQUEST_TTL + 60) == APPROVED


def test_expire_writes_the_expired_state_once():
    rec = record(1)
    with pytest.raises(Conflict):
        ap.expire(rec, T0 + REQUEST_TTL - 1)
    out = ap.expire(rec, T0 + REQUEST_TTL + 5)
    assert out.state == EXPIRED and out.decided_at == T0 + REQUEST_TTL + 5
    with pytest.raises(Conflict):
        ap.expire(out, T0 + REQUEST_TTL + 6)
    assert ap.expire(approved_record(1), T0 + 10 + ISSUE_WINDOW).state == EXPIRED
    with pytest.raises(Conflict):
        ap.expire(replace(rec, state=DENIED), T0 + 10 * REQUEST_TTL)


def test_nothing_happens_to_an_expired_request():
    rec = record(1)
    late = T0 + REQUEST_TTL
    with pytest.raises(Conflict):
        ap.deny(rec, AP1, late)
    with pytest.raises(Conflict):
        ap.cancel(rec, REQUESTER, late)


# ---- issue -----------------------------------------------------------------------------------


def test_mark_issued_only_once_only_by_requester_only_when_approved():
    with pytest.raises(Conflict):
        ap.mark_issued(record(1), REQUESTER, T0 + 1, serial=5, key_id="k")  # still pending
    rec = approved_record(2)
    with pytest.raises(Forbidden):
        ap.mark_issued(rec, AP1, T0 + 20, serial=5, key_id="k")
    with pytest.raises(Forbidden):
        ap.mark_issued(rec, Identity(oid="other", tid=TID, upn=REQUESTER.upn), T0 + 20, serial=5, key_id="k")
    out = ap.mark_issued(rec, REQUESTER, T0 + 20, serial=2**63 - 1, key_id="ezssh/web/req-1/req@contoso.example")
    assert out.state == ISSUED and out.serial == 2**63 - 1 and out.key_id == "ezssh/web/req-1/req@contoso.example"
    assert out.approvals == rec.approvals
    with pytest.raises(Conflict) as info:
        ap.mark_issued(out, REQUESTER, T0 + 21, serial=6, key_id="k")
    assert info.value.details == {"state": ISSUED}


def test_public_view_renders_the_serial_as_a_string():
    out = ap.mark_issued(approved_record(1), REQUESTER, T0 + 20, serial=2**63 - 1, key_id="k")
    view = out.to_public(T0 + 21)
    assert view["status"] == ISSUED and view["serial"] == str(2**63 - 1)
    assert view["requester"] == REQUESTER.upn and view["approvals"][0]["oid"] == AP1.oid
    assert record(1).to_public(T0)["serial"] is None


def test_state_constants():
    assert FINAL_STATES == {DENIED, EXPIRED, CANCELLED, ISSUED}
    assert PENDING not in FINAL_STATES and APPROVED not in FINAL_STATES
    assert ISSUE_WINDOW == 15 * 60


# ---- request ids are serials ---------------------------------------------------------------------

def test_a_request_serial_is_its_time_then_random_bits_and_its_id_is_that_serial_in_hex():
    from functions.core.serials import SERIAL_RANDOM_BITS, new_request_id, request_id_of_serial, new_serial, serial_floor, serial_of_request_id

    now = 1_780_000_000.123
    serials = {new_serial(now) for _ in range(2000)}
    assert len(serials) > 1990  # 21 random bits: a handful of repeats at most in 2000 draws
    for s in serials:
        assert 0 < s < 2**63 and s >> SERIAL_RANDOM_BITS == int(now * 1000)
        rid = request_id_of_serial(s)
        assert len(rid) == 16 and serial_of_request_id(rid) == s and int(rid, 16) == s
    # ids sort by time, and serial_floor bounds them from below
    earlier, later = new_request_id(now - 0.002), new_request_id(now)
    assert earlier < later
    ms = int(now * 1000)
    assert request_id_of_serial(serial_floor(ms)) <= later < request_id_of_serial(serial_floor(ms + 1))
    for other in ("", "0" * 16, "f" * 16, "ABCDEF0123456789", "0123456789abcdef0", "zz23456789abcdef",
                  "0123456789abcde", "8000000000000000"):
        assert serial_of_request_id(other) is None, other
    with pytest.raises(ValueError):
        new_serial(-1.0)


def test_a_uuid7_key_names_a_request_id_of_its_time_and_per_user():
    import uuid

    from functions.core.serials import key_time_ms, keyed_request_id

    ms = 1_760_000_000_123
    # RFC 9562 layout, built here bit by bit: 48-bit ms, version 7, 12 bits, variant 0b10, 62 bits
    k = str(uuid.UUID(int=(ms << 80) | (0x7 << 76) | (0xABC << 64) | (0b10 << 62) | 12345))
    assert key_time_ms(k) == ms and key_time_ms(k.replace("-", "")) == ms
    for other in (str(uuid.uuid4()), uuid.uuid4().hex, "attempt-0001", k[:-1], "g" * 32,
                  str(uuid.UUID(int=(ms << 80) | (0x7 << 76) | (0b11 << 62)))):  # wrong variant
        assert key_time_ms(other) is None, other
    rid = keyed_request_id(ms, "tid", "oid-a", k)
    assert int(rid, 16) >> 21 == ms and int(rid, 16) & ((1 << 21) - 1) != 0 and len(rid) == 16
    assert keyed_request_id(ms, "tid", "oid-a", k) == rid  # a retry names the same row
    assert len({rid, keyed_request_id(ms, "tid", "oid-b", k), keyed_request_id(ms, "tid2", "oid-a", k),
                keyed_request_id(ms, "tid", "oid-a", k.upper())}) == 4


def test_display_names_are_kept_per_decision_and_stripped_of_control_characters():
    named = Identity(oid="oid-ap1", tid=TID, upn="ap1@contoso.example", name="Bob\x1b[31m Brandt\n\t(ops)")
    out = ap.approve(record(1), named, T0 + 1, comment="ok")
    assert out.approvals[0].name == "Bob [31m Brandt (ops)" and out.decided_by_name == out.approvals[0].name
    assert ap.deny(record(1), replace(named, name="x" * 1000), T0 + 1).decided_by_name == "x" * ap.NAME_MAX
    assert out.to_public(T0 + 2)["approvals"][0]["name"] == out.approvals[0].name
