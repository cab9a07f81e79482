"""The CLI's Idempotency-Key for one attempt is a UUIDv7 (RFC 9562) of the attempt's time, which the
service turns into the request's id (one write; a retry finds it)."""

from __future__ import annotations

import time
import uuid

from ezssh.issue import attempt_key


def test_an_attempt_key_is_a_uuid7_of_now_and_never_repeats():
    before = int(time.time() * 1000)
    keys = [attempt_key() for _ in range(500)]
    after = int(time.time() * 1000)
    assert len(set(keys)) == 500
    for k in keys:
        u = uuid.UUID(k)
        assert str(u) == k and u.version == 7 and u.variant == uuid.RFC_4122
        assert before <= u.int >> 80 <= after
    assert uuid.UUID(attempt_key(1_700_000_000.5)).int >> 80 == 1_700_000_000_500
