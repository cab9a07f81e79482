"""Audit queries: who reads which entries, the filters an operator uses from sshd's log line (key id,
serial), the default window, and whether a request's chain is whole."""

from __future__ import annotations

import pytest

from functions.core.errors import Forbidden, InvalidRequest, NotFound
from functions.core.evaluation import AccessRequest

from .helpers import ALICE, BOB, CAROL, ERIN, PAT, T0


def read(service, who, **kw) -> list:
    return service.audit.query(who, **kw).entries


def read_all(service, who, limit: int, **kw) -> tuple[list, int]:
    """Every page, following `next`: the entries and how many pages it took."""
    out, token, pages = [], None, 0
    while True:
        page = service.audit.query(who, limit=limit, continuation=token, **kw)
        assert len(page.entries) <= limit
        out += page.entries
        pages += 1
        if page.next is None:
            return out, pages
        token = page.next


@pytest.fixture
def two_policies(service, make_policy, clock, user_key):
    """'web' (pat administers it) and 'db' (nobody but tenant admins), one certificate under each."""
    make_policy("web")
    make_policy("db", hosts=["db*"], admins={"users": [], "groups": []})
    clock.advance(1)
    web = service.issuance.request_access(ALICE, AccessRequest(host="web1", principal="alice"), user_key())
    clock.advance(1)
    db = service.issuance.request_access(ALICE, AccessRequest(host="db1", principal="alice"), user_key())
    clock.advance(1)
    return web, db


def test_tenant_admins_read_everything_of_their_tenant_only(service, two_policies):
    web, db = two_policies
    entries = read(service, CAROL)
    assert {e.policy_id for e in entries} == {"web", "db"}
    assert [e.at for e in entries] == sorted(e.at for e in entries)
    assert read(service, ERIN) == []  # a tenant admin elsewhere


def test_policy_admins_read_their_policies_only_and_members_nothing(service, two_policies):
    entries = read(service, PAT)
    assert entries and {e.policy_id for e in entries} == {"web"}
    with pytest.raises(NotFound):
        read(service, PAT, policy_id="db")
    with pytest.raises(Forbidden):
        read(service, ALICE)


def test_a_refused_read_of_the_audit_is_itself_audited(service, store, two_policies):
    """A member who asks for the audit (403) or a policy it does not administer (404) is on record."""
    for who, kw, error in ((ALICE, {}, Forbidden), (PAT, {"policy_id": "db"}, NotFound)):
        with pytest.raises(error):
            read(service, who, **kw)
        [refused] = [e for e in store.list_audit(who.tid, limit=10_000)
                     if e.action == "audit.refused" and e.actor_oid == who.oid]
        assert refused.outcome == "refused" and refused.error_code == error("").code
        assert refused.policy_id == kw.get("policy_id")


def test_a_continuation_token_is_opaque_and_a_forged_one_a_clear_error(service, two_policies):
    page = service.audit.query(CAROL, since=0, limit=1)
    assert page.next and "|" not in page.next  # opaque: no storage key shows
    for bad in ("not base64!", "e30", "bnVsbA", page.next[:-3] + "xyz", "eyJhZnRlciI6Ij8ifQ"):
        with pytest.raises(InvalidRequest):
            service.audit.query(CAROL, continuation=bad)


def test_pages_of_a_policy_admin_and_of_one_user_hold_only_theirs(service, two_policies, make_policy, clock,
                                                                 user_key):
    for _ in range(3):
        clock.advance(1)
        service.issuance.request_access(ALICE, AccessRequest(host="web1", principal="alice"), user_key())
    mine, _ = read_all(service, PAT, 2, since=0)
    everything = read(service, CAROL, since=0)
    assert mine == [e for e in everything if e.policy_id == "web"] and len(mine) >= 9
    alice, _ = read_all(service, CAROL, 3, since=0, user=ALICE.oid)
    assert alice == [e for e in everything if e.actor_oid == ALICE.oid] and len(alice) == 10
    assert read(service, CAROL, since=0, user=PAT.oid) == [e for e in everything if e.actor_oid == PAT.oid]


def test_from_the_sshd_log_line_to_the_request(service, two_policies):
    web, _ = two_policies
    cert = web.certificate
    hits = read(service, CAROL, key_id=cert.key_id, serial=str(cert.serial))
    assert [(e.action, e.request_id) for e in hits] == [("certificate.issued", web.request.id)]
    story = read(service, CAROL, request_id=web.request.id)
    assert [e.action for e in story] == ["request.created", "certificate.issued"]
    assert story[1].prev_hash == story[0].hash
    assert read(service, CAROL, serial="1") == []


def test_the_sshd_log_line_finds_its_certificate_at_any_age(service, two_policies, clock):
    """The key id and the serial name the request (its id is the serial), so a login from last
    month is found without a time window; unknown ones fall back to the last day and find nothing."""
    web, db = two_policies
    clock.now = T0 + 30 * 24 * 3600
    for kw in (dict(key_id=web.certificate.key_id), dict(serial=str(web.certificate.serial)),
               dict(key_id=web.certificate.key_id, serial=str(web.certificate.serial))):
        hits = read(service, CAROL, **kw)
        assert [(e.action, e.request_id) for e in hits] == [("certificate.issued", web.request.id)], kw
    assert read(service, PAT, serial=str(db.certificate.serial)) == []  # not pat's policy
    assert read(service, CAROL, serial=str(web.certificate.serial + 1)) == []
    assert read(service, CAROL, key_id="ezssh/web/not-a-request/alice@contoso.test") == []


def test_the_default_window_is_the_last_day_and_pages_go_oldest_first(service, two_policies, clock):
    everything = read(service, CAROL, since=0)
    assert len(everything) >= 6  # two policies created, two requests with their certificates
    assert [e.at for e in everything] == sorted(e.at for e in everything)
    first = service.audit.query(CAROL, limit=2)
    assert first.entries == everything[:2] and first.next
    got, pages = read_all(service, CAROL, 2)
    assert got == everything and pages >= len(everything) // 2
    clock.now = T0 + 24 * 3600 + 10
    assert read(service, CAROL) == []  # all of it is older than a day
    assert read(service, CAROL, since=0) == everything
    assert read(service, CAROL, until=T0 + 1.5) == [e for e in everything if e.at <= T0 + 1.5]


def test_a_request_chain_is_whole_until_an_entry_goes(service, store, two_policies):
    web, _ = two_policies
    rid = web.request.id
    assert service.audit.request_chain_intact(CAROL, rid)
    assert service.audit.request_chain_intact(ALICE, rid)  # the requester may check their own
    with pytest.raises(NotFound):
        service.audit.request_chain_intact(ERIN, rid)
    # someone with storage access removes the last entry of the chain
    partition = store._audit[ALICE.tid]
    last = max((k for k, doc in partition.items() if rid in doc and "certificate.issued" in doc))
    del partition[last]
    assert not service.audit.request_chain_intact(CAROL, rid)


def test_a_chain_reads_whole_when_its_entries_share_a_millisecond(service, make_policy, clock, user_key):
    """With the clock standing still, a request's entries land in one millisecond, where storage
    orders them by their random ids; the chain is read by its links."""
    make_policy("web")
    clock.step = 0
    for _ in range(12):  # without link order about half of these would read as broken
        out = service.issuance.request_access(ALICE, AccessRequest(host="web1", principal="alice"), user_key())
        assert service.audit.request_chain_intact(CAROL, out.request.id)
        story = read(service, CAROL, request_id=out.request.id)
        assert [e.action for e in story] == ["request.created", "certificate.issued"]
        clock.advance(1)


def test_storage_keeps_a_requests_entries_in_written_order_within_a_millisecond(service, store, make_policy, clock,
                                                                                user_key):
    """With the clock standing still every entry of a request shares one millisecond; storage itself
    (no reordering by links afterwards) returns them in the order they were written, by their
    sequence numbers, not by their random ids."""
    make_policy("web")
    make_policy("ops", action="approval", hosts=["ops*"])
    clock.step = 0
    for _ in range(12):
        auto = service.issuance.request_access(ALICE, AccessRequest(host="web1", principal="alice"), user_key())
        assert [(e.action, e.seq) for e in store.list_audit(ALICE.tid, request_id=auto.request.id)] == \
            [("request.created", 0), ("certificate.issued", 1)]
    asked = service.issuance.request_access(ALICE, AccessRequest(host="ops1", principal="alice"), None)
    service.requests.approve(BOB, asked.request.id)
    service.issuance.issue_for_request(ALICE, asked.request.id, user_key())
    assert [(e.action, e.seq) for e in store.list_audit(ALICE.tid, request_id=asked.request.id)] == \
        [("request.created", 0), ("request.approved", 1), ("certificate.issued", 2)]
