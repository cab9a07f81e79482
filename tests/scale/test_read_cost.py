"""What the KRL and known-hosts cost in rows read, counted on the wire against Azurite (the Azure
SDK's response hook, tests/readcount.py), with a small and a large history: a tenant whose revoked
certificates all expired long ago must cost what a new tenant costs, and an unchanged answer is one
or two point reads, never a rebuild. Figures that carry over to Azure (rows read, round trips), not
timings."""

from __future__ import annotations

import json
import uuid
from dataclasses import replace

import pytest

from functions.core.audit import AuditEntry, link
from functions.core.evaluation import AccessRequest
from functions.core.policydoc import policy_from_document
from functions.core.records import CertificateRecord
from functions.service import Service, ServiceConfig
from tests.readcount import counting_store
from tests.service.helpers import ALICE, CAROL, HOST_NAMESPACES, Clock, policy_doc

LIVE_USER, LIVE_HOST = 3, 2  # revocations still inside the KRL in both worlds


@pytest.fixture(scope="module")
def host_ca(keys, shared_ca):
    from functions.signing.base import ssh_fingerprint, ssh_public_key_line

    signer = keys.create_key(f"ezh-cost-{uuid.uuid4().hex[:8]}", "EC-P256")
    return replace(
        shared_ca,
        key_ref=signer.key_ref,
        public_key=ssh_public_key_line(signer, "ezssh-host-ca:cost"),
        fingerprint=ssh_fingerprint(signer.public_key()),
    )


def build(azurite, keys, shared_ca, host_ca, user_key, *, policies: int, history: int):
    """A tenant on its own table: `policies` policies (ALICE a member of each), `history` user and
    `history` // 2 host certificates of policy p000 revoked and long expired, then LIVE_USER user and
    LIVE_HOST host certificates revoked and still valid. Returns (a new worker's Service, counter, clock)."""
    store, counter = counting_store(azurite.connection_string, f"cost{uuid.uuid4().hex[:12]}")
    clock = Clock()
    config = ServiceConfig(signer_backend="pkcs11", request_rate=100_000, host_namespaces=HOST_NAMESPACES)
    service = Service(store, keys, config, clock=clock)
    for i in range(policies):
        p = replace(
            policy_from_document(policy_doc(f"p{i:03d}", "auto"), tenant_id=CAROL.tid),
            ca=(shared_ca,),
            host_ca=(host_ca,),
        )
        entry = link(
            AuditEntry(
                tenant_id=CAROL.tid,
                at=clock(),
                action="policy.created",
                outcome="ok",
                policy_id=p.id,
                chain=f"pol:{p.id}",
            ),
            None,
        )
        store.create_policy(replace(p, audit_head=entry.hash), entry)

    def revoke_users(n: int) -> None:
        for _ in range(n):
            cert = service.issuance.request_access(
                ALICE, AccessRequest(host="web1", principal="alice", ttl_seconds=3600, policy_id="p000"), user_key()
            ).certificate
            service.hosts.revoke_certificate(CAROL, "p000", cert.serial)

    def revoke_hosts(n: int) -> None:
        now = int(clock())
        for _ in range(n):
            serial = uuid.uuid4().int >> 65
            store.record_host_issuance(
                [
                    CertificateRecord(
                        tenant_id=CAROL.tid,
                        policy_id="p000",
                        serial=serial,
                        key_id=f"ezssh-host/p000/web{serial}",
                        request_id="",
                        requester_oid="",
                        requester_upn="host:web",
                        principals=("web1",),
                        host="web1",
                        valid_after=now - 60,
                        valid_before=now + 86400,
                        ca_fingerprint=host_ca.fingerprint,
                        public_key_fingerprint=f"SHA256:{serial}",
                        certificate="ssh-ed25519-cert-v01@openssh.com AAAA",
                    )
                ],
                [],
                [],
            )
            service.hosts.revoke_certificate(CAROL, "p000", serial)

    revoke_users(history)
    revoke_hosts(history // 2)
    clock.advance(3 * 86400)  # all of that expired, past the KRL's grace
    revoke_users(LIVE_USER)
    revoke_hosts(LIVE_HOST)
    counter.reset()
    return Service(store, keys, config, clock=clock), counter


@pytest.fixture(scope="module")
def worlds(azurite, keys, shared_ca, host_ca):
    return {
        "small": build(azurite, keys, shared_ca, host_ca, _key, policies=2, history=0),
        "large": build(azurite, keys, shared_ca, host_ca, _key, policies=30, history=60),
    }


def cost(counter, call) -> tuple[int, int, object]:
    """(round trips, rows read, answer) of `call`, leaving out the one look for revocation rows of
    the first layout a worker makes per tenant (whichever call comes first makes it; 0 rows here)."""
    counter.reset()
    out = call()
    reads = [(url, n) for url, n in counter.reads if "RowKey ge 'rev|'" not in url]
    assert sum(n for url, n in counter.reads if "RowKey ge 'rev|'" in url) == 0
    return len(reads), sum(n for _, n in reads), out


def test_the_krl_reads_what_is_still_valid_whatever_the_history(worlds):
    got = {}
    for name, (service, counter) in worlds.items():
        first = cost(counter, lambda s=service: s.hosts.krl_for(ALICE, "p000"))
        again = cost(counter, lambda s=service: s.hosts.krl_for(ALICE, "p000"))
        got[name] = first[:2], again[:2]
        assert again[2] == first[2]
        assert counter.point_reads("rvp|") == 0  # the unchanged answer reads no revocation
    # a new worker: the policy, its version, one range read of the valid revocations; the same in
    # both worlds. Unchanged: the policy and its version.
    assert got["small"] == got["large"] == ((3, 1 + 1 + LIVE_USER + LIVE_HOST), (2, 2)), got


def test_known_hosts_reads_neither_user_revocations_nor_one_row_per_policy(worlds):
    got = {}
    for name, (service, counter) in worlds.items():
        policies = len(service.store.list_policies(CAROL.tid))
        first = cost(counter, lambda s=service: s.known_hosts.client_trust(ALICE))
        again = cost(counter, lambda s=service: s.known_hosts.client_trust(ALICE))
        assert again[2] == first[2]
        assert json.loads(first[2].data)["policies"] == [f"p{i:03d}" for i in range(policies)]
        # the tenant's version, its policies (one range read), its valid host revocations, its host
        # namespaces (none stored: they come from the settings, a read that finds no row)
        got[name] = first[0], first[1] - policies, again[:2]
    assert got["small"] == got["large"] == (4, 1 + LIVE_HOST, (1, 1)), got


def test_after_a_revocation_a_worker_reads_what_was_revoked_since_and_agrees_with_a_new_one(worlds):
    service, counter = worlds["large"]
    writer = Service(service.store, service.keys, service.base.config, clock=service.clock)  # another worker

    def revoke_one() -> None:
        cert = writer.issuance.request_access(
            ALICE, AccessRequest(host="web1", principal="alice", ttl_seconds=3600, policy_id="p000"), _key()
        ).certificate
        writer.hosts.revoke_certificate(CAROL, "p000", cert.serial)

    before = service.hosts.krl_for(ALICE, "p000")
    revoke_one()
    service.clock.advance(600)
    # what was revoked since the last build (made just after the live ones): those and the new one
    trips, rows, after = cost(counter, lambda: service.hosts.krl_for(ALICE, "p000"))
    assert after.etag != before.etag and after.version >= before.version
    assert (trips, rows) == (3, 1 + 1 + LIVE_USER + LIVE_HOST + 1)
    revoke_one()
    trips, rows, again = cost(counter, lambda s=service: s.hosts.krl_for(ALICE, "p000"))
    assert again.etag != after.etag
    assert (trips, rows) == (3, 1 + 1 + 1)  # the policy, its version, the one revocation since
    cold = Service(service.store, service.keys, service.base.config, clock=service.clock).hosts.krl_for(ALICE, "p000")
    assert cold.data == again.data  # a worker that builds it whole gives the same bytes


def _key() -> str:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    return (
        ed25519.Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        .decode()
    )
