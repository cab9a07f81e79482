"""Health signs with every current CA key (each policy's user CA and host CA): one failing key is
counted (and logged by name), all failing turns the signer red; the answer names no key (it is for
unauthenticated callers)."""

from __future__ import annotations

import logging

from .helpers import CAROL


def test_health_counts_ca_keys_that_sign_and_turns_red_when_none_does(service, caplog):
    web = service.policies.create(CAROL, _doc("h-web"))
    db = service.policies.create(CAROL, _doc("h-db"))
    h = service.health([CAROL.tid])
    assert h == {"checks": {"storage": "ok", "signer": "ok"}, "ca_keys": {"ok": 4, "unavailable": 0}}

    service.keys.disable_key(db.current_ca.key_ref)  # one key gone (as a customer may disable their own)
    service._health = None  # noqa: SLF001 - past the 3 s cache, without waiting for it
    with caplog.at_level(logging.WARNING, logger="ezssh.service"):
        h = service.health([CAROL.tid])
    assert h["checks"]["signer"] == "ok" and h["ca_keys"] == {"ok": 3, "unavailable": 1}
    assert db.current_ca.fingerprint in caplog.text and web.current_ca.fingerprint not in caplog.text
    assert db.current_ca.fingerprint not in str(h)

    for key in (web.current_ca, web.current_host_ca, db.current_host_ca):
        service.keys.disable_key(key.key_ref)
    service._health = None  # noqa: SLF001
    h = service.health([CAROL.tid])
    assert h["checks"]["signer"] == "unavailable" and h["ca_keys"] == {"ok": 0, "unavailable": 4}


def _doc(pid: str) -> dict:
    from .helpers import policy_doc

    return policy_doc(pid, "auto")
