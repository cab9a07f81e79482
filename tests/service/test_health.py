"""Health (functions/health.py): one probe per dependency, never one signature per CA key, each
dependency with its own state, the answer kept a few seconds and refreshed by one caller at a time."""

from __future__ import annotations

import threading

from functions.core.errors import SignerUnavailable
from functions.health import Health

from .helpers import CAROL, policy_doc


class Counting:
    """The real key store, counting what health asks of it."""

    def __init__(self, keys) -> None:  # type: ignore[no-untyped-def]
        self.keys, self.health_calls, self.gate = keys, 0, threading.Event()
        self.gate.set()

    def health(self) -> None:
        self.health_calls += 1
        self.gate.wait(5)
        self.keys.health()


def test_the_signer_is_one_probe_of_the_backend_kept_for_the_ttl(service, keys):
    for i in range(3):
        service.policies.create(CAROL, policy_doc(f"h{i}", "auto"))  # six CA keys (user and host)
    counting = Counting(keys)
    clock = [0.0]
    health = Health({"storage": service.store.health, "signer": counting.health}, ttl=3.0, clock=lambda: clock[0])
    assert health.checks() == {"storage": "ok", "signer": "ok"}
    assert counting.health_calls == 1
    for _ in range(20):
        health.checks()
    assert counting.health_calls == 1  # kept for the ttl
    clock[0] = 3.0
    health.checks()
    assert counting.health_calls == 2


def test_each_dependency_has_its_own_state():
    def down() -> None:
        raise SignerUnavailable("the HSM is away")

    health = Health({"storage": lambda: None, "signer": down, "identity:t1": lambda: None}, ttl=0)
    assert health.checks() == {"storage": "ok", "signer": "unavailable", "identity:t1": "ok"}


def test_sixteen_callers_when_the_answer_is_due_make_one_probe(keys):
    counting = Counting(keys)
    clock = [0.0]
    health = Health({"signer": counting.health}, ttl=3.0, clock=lambda: clock[0])
    health.checks()
    clock[0] = 10.0
    counting.gate.clear()  # the refreshing probe hangs until released
    answers: list[dict] = []
    threads = [threading.Thread(target=lambda: answers.append(health.checks())) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads[1:]:
        t.join(0.05)
    counting.gate.set()
    for t in threads:
        t.join(10)
    assert counting.health_calls == 2 and answers == [{"signer": "ok"}] * 16


def test_an_outage_is_logged_as_a_failure_never_as_a_refusal(service, caplog):
    """A host's call (no identity) while storage or the identity provider is away: not counted among
    refusals, logged as outcome=failed; a bad token still counts as a refusal."""
    import logging

    from functions.core.errors import BackendUnavailable, StorageUnavailable, Unauthenticated

    base = service.base
    before = base.anonymous_refusals.total
    with caplog.at_level(logging.INFO, logger="ezssh.service"):
        for exc, tenant in (
            (StorageUnavailable("Storage is unavailable."), None),
            (StorageUnavailable("Storage is unavailable."), CAROL.tid),
            (BackendUnavailable("The identity provider cannot be reached."), None),
        ):
            base.refuse(None, exc, "host_certificate.refused", tenant_id=tenant)
    assert base.anonymous_refusals.total == before
    lines = [r.getMessage() for r in caplog.records if "host_certificate.refused" in r.getMessage()]
    assert len(lines) == 3 and all("outcome=failed" in x and "outcome=refused" not in x for x in lines)
    assert service.store.list_audit(CAROL.tid) == []  # nothing recorded as the tenant's refusal
    base.refuse(None, Unauthenticated("bad token"), "auth.refused")
    assert base.anonymous_refusals.total == before + 1
