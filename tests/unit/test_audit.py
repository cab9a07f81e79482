"""functions.core.audit: sealed entries and per-request / per-policy hash chains."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, replace

from functions.core.audit import GENESIS, AuditEntry, canonical_json, link, verify_chain

TID = "tenant-a"


def entry(action: str = "request.created", at: float = 1_700_000_000.25, **over) -> AuditEntry:
    fields = dict(
        tenant_id=TID,
        at=at,
        action=action,
        outcome="ok",
        actor_oid="oid-alice",
        actor_upn="alice@contoso.example",
        request_id="req-1",
        policy_id="web",
        host="web1",
        principal="deploy",
        chain="req:req-1",
        details={"ttl_seconds": 900, "approvers": ["carol", "dave"]},
    )
    fields.update(over)
    return AuditEntry(**fields)


def chain_of(*entries: AuditEntry) -> list[AuditEntry]:
    out: list[AuditEntry] = []
    for e in entries:
        out.append(link(e, out[-1] if out else None))
    return out


def request_chain() -> list[AuditEntry]:
    return chain_of(
        entry("request.created", 1_700_000_000.1),
        entry("request.approved", 1_700_000_010.2, actor_oid="oid-carol", actor_upn="carol@contoso.example"),
        entry("certificate.issued", 1_700_000_020.3, serial=str(2**63 - 1), key_id="ezssh/web/req-1/alice"),
        entry("certificate.revoked", 1_700_000_030.4, actor_oid="oid-admin"),
    )


# ---- sealing ---------------------------------------------------------------------------------


def test_sealed_hash_is_sha256_of_the_canonical_body():
    def expected(e: AuditEntry) -> str:
        body = asdict(e)
        del body["hash"]
        if body["seq"] == 0:  # a chain's first entry (and every entry written before sequence numbers)
            del body["seq"]
        return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"),
                                         ensure_ascii=False).encode()).hexdigest()

    e = entry().sealed()
    assert e.hash == expected(e)
    assert len(e.hash) == 64 and e.prev_hash == GENESIS
    later = link(entry(), e)
    assert later.seq == 1 and later.hash == expected(later)
    assert not replace(later, seq=2).verify() and not replace(later, seq=0).verify()


def test_an_entry_stored_before_sequence_numbers_still_verifies():
    e = entry().sealed()
    stored = {k: v for k, v in asdict(e).items() if k != "seq"}  # the JSON such an entry was stored as
    assert AuditEntry(**stored).verify()
    assert e.verify()


def test_unsealed_entry_does_not_verify():
    assert entry().hash == ""
    assert not entry().verify()


def test_sealing_is_stable_and_does_not_change_the_body():
    raw = entry()
    a, b = raw.sealed(), raw.sealed()
    assert a.hash == b.hash
    assert a.body() == raw.body()
    assert a.sealed() == a  # resealing a sealed entry is a no-op


def test_each_entry_gets_its_own_id_and_so_its_own_hash():
    a, b = entry().sealed(), entry().sealed()
    assert a.entry_id != b.entry_id and len(a.entry_id) == 16
    assert a.hash != b.hash


def test_any_edit_after_sealing_is_detected():
    e = entry().sealed()
    for change in (
        {"outcome": "refused"},
        {"actor_upn": "mallory@contoso.example"},
        {"at": e.at + 0.001},
        {"serial": "1"},
        {"tenant_id": "tenant-b"},
        {"chain": "req:req-2"},
        {"prev_hash": "f" * 64},
        {"entry_id": "0" * 16},
        {"details": {"ttl_seconds": 86400, "approvers": ["carol", "dave"]}},
    ):
        edited = replace(e, **change)
        assert edited.hash == e.hash
        assert not edited.verify(), change


def test_editing_details_in_place_is_detected():
    e = entry().sealed()
    e.details["approvers"].append("mallory")
    assert not e.verify()


def test_canonical_json_is_key_order_independent_and_keeps_unicode():
    assert canonical_json({"b": 1, "a": [1, 2]}) == canonical_json({"a": [1, 2], "b": 1}) == '{"a":[1,2],"b":1}'
    assert canonical_json({"upn": "jörg@contoso.example"}) == '{"upn":"jörg@contoso.example"}'


def test_entry_survives_a_json_round_trip_through_storage():
    e = entry(actor_upn="jörg@contoso.example", serial=str(2**63 - 1), at=1_700_000_000.123456).sealed()
    stored = json.loads(json.dumps(asdict(e)))
    back = AuditEntry(**stored)
    assert back == e and back.verify()


# ---- chains ----------------------------------------------------------------------------------


def test_link_points_each_entry_at_the_one_before():
    chain = request_chain()
    assert chain[0].prev_hash == GENESIS
    for prev, cur in zip(chain, chain[1:]):
        assert cur.prev_hash == prev.hash
    assert all(e.verify() for e in chain)
    assert verify_chain(chain)
    assert verify_chain(iter(chain))  # any iterable
    assert verify_chain([])


def test_link_numbers_a_chain_in_written_order_from_an_entry_or_from_the_row_holding_its_head():
    from functions.core.requests import RequestRecord

    chain = request_chain()
    assert [e.seq for e in chain] == [0, 1, 2, 3]
    row = RequestRecord(id="req-1", tenant_id=TID, policy_id="web", requester_oid="oid-alice",
                        requester_upn="alice@contoso.example", host="web1", principal="deploy", ttl_seconds=900,
                        state="pending", created_at=1, expires_at=2, audit_head=chain[1].hash, audit_seq=chain[1].seq)
    nxt = link(entry("request.denied"), row)
    assert nxt.prev_hash == chain[1].hash and nxt.seq == 2 and verify_chain([chain[0], chain[1], nxt])
    assert link(entry(), replace(row, audit_head=GENESIS, audit_seq=5)).seq == 0  # an empty head starts a chain


def test_link_ignores_a_stale_prev_hash_on_the_new_entry():
    first = link(entry(), None)
    second = link(entry(prev_hash="a" * 64, hash="b" * 64), first)
    assert second.prev_hash == first.hash and second.verify()


def test_edited_entry_breaks_the_chain():
    chain = request_chain()
    chain[1] = replace(chain[1], outcome="refused")
    assert not verify_chain(chain)


def test_edited_and_resealed_entry_breaks_the_chain_at_the_next_link():
    chain = request_chain()
    chain[1] = replace(chain[1], actor_upn="mallory@contoso.example").sealed()
    assert chain[1].verify()  # the entry on its own looks fine
    assert not verify_chain(chain)
    assert verify_chain(chain[:2])  # the forgery is only caught by what follows it


def test_removed_entry_breaks_the_chain():
    chain = request_chain()
    for i in range(len(chain) - 1):
        assert not verify_chain(chain[:i] + chain[i + 1:]), f"removing entry {i} went unnoticed"


def test_reordered_chain_is_detected():
    chain = request_chain()
    assert not verify_chain([chain[1], chain[0], *chain[2:]])
    assert not verify_chain(list(reversed(chain)))
    assert not verify_chain([chain[0], chain[2], chain[1], chain[3]])


def test_entry_spliced_in_from_another_chain_is_detected():
    ours, theirs = request_chain(), request_chain()
    assert not verify_chain([ours[0], theirs[1], *ours[2:]])


def test_truncating_the_tail_is_not_detectable_from_the_chain_alone():
    # Documents a limit: a chain verifies as any prefix of itself. Detecting a dropped last
    # entry needs the head hash kept elsewhere (e.g. on the request record).
    chain = request_chain()
    assert verify_chain(chain[:-1])
    assert chain[-1].hash != chain[-2].hash


def test_the_head_kept_on_the_row_detects_a_dropped_last_entry():
    from functions.core.audit import AuditEntry, link, verify_chain

    a = link(AuditEntry(tenant_id="t", at=1.0, action="request.created", outcome="ok"), None)
    b = link(AuditEntry(tenant_id="t", at=2.0, action="certificate.issued", outcome="ok"), a)
    assert verify_chain([a, b], head=b.hash)
    assert verify_chain([a], head=None)  # without the head a shortened chain still looks whole
    assert not verify_chain([a], head=b.hash)  # with it, the missing last entry shows


# ---- reading a chain in link order ---------------------------------------------------------------


def test_entries_of_one_millisecond_are_put_back_in_link_order():
    from functions.core.audit import in_link_order

    chain = chain_of(*(entry(a, at=1_700_000_000.5) for a in ("request.created", "request.approved",
                                                               "certificate.issued")))
    other = chain_of(entry("request.created", request_id="req-2", chain="req:req-2", at=1_700_000_000.5),
                     entry("request.denied", request_id="req-2", chain="req:req-2", at=1_700_000_000.5))
    unchained = entry("request.refused", chain=None, at=1_700_000_000.5).sealed()
    # storage returns entries of one millisecond in the order of their random ids
    stored = [chain[2], other[1], unchained, chain[0], other[0], chain[1]]
    ordered = in_link_order(stored)
    assert ordered == [chain[0], other[0], unchained, chain[1], other[1], chain[2]]  # each chain in its own places
    assert verify_chain([e for e in ordered if e.chain == "req:req-1"], head=chain[2].hash)
    assert in_link_order(chain) == chain and in_link_order([]) == []


def test_link_order_still_shows_a_removed_or_edited_entry():
    from functions.core.audit import in_link_order

    chain = request_chain()
    for i in range(len(chain) - 1):
        gone = chain[:i] + chain[i + 1:]
        assert not verify_chain(in_link_order(list(reversed(gone)))), f"removing entry {i} went unnoticed"
    forged = replace(chain[1], action="request.denied").sealed()  # re-sealed: its successor no longer links
    assert not verify_chain(in_link_order([chain[3], forged, chain[2], chain[0]]))
    twice = [chain[0], chain[1], link(entry("request.denied"), chain[0])]  # two successors of one entry
    assert not verify_chain(in_link_order(twice))
