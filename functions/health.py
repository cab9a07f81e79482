"""GET /api/health: is each dependency the next call needs reachable? One cheap probe each, never
one per key or per policy, and never work an unauthenticated caller can multiply:

    storage              one point query on the table (Store.health)
    signer               one probe of the signing backend: a PKCS#11 session answers (random bytes
                         from the token), or one Key Vault list request (not a sign)
    queue                the enrolment job queue answers (where enrolment is configured)
    identity:<tenant>    the tenant's issuer signing keys are loadable (from the JWKS client's cache,
                         else fetched): a worker started while the identity provider was down says
                         so here instead of answering 503 to every call behind a green health

Each has its own state. The result is kept HEALTH_CACHE_SECONDS per worker, and when it is due one
caller refreshes it while the others get the previous one, so 16 callers during a fault cost one
probe per dependency, not sixteen.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping

log = logging.getLogger("ezssh.health")
HEALTH_CACHE_SECONDS = 3.0


class Health:
    def __init__(
        self,
        probes: Mapping[str, Callable[[], None]],
        ttl: float = HEALTH_CACHE_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._probes = dict(probes)
        self._ttl = ttl
        self._clock = clock
        self._last: tuple[float, dict[str, str]] | None = None
        self._refresh = threading.Lock()

    def checks(self) -> dict[str, str]:
        """{dependency: "ok" | "unavailable"}."""
        last = self._last
        if last is not None and self._clock() - last[0] < self._ttl:
            return last[1]
        if last is None:
            self._refresh.acquire()
        elif not self._refresh.acquire(blocking=False):
            return last[1]  # another caller is refreshing: the previous answer
        try:
            last = self._last
            if last is not None and self._clock() - last[0] < self._ttl:
                return last[1]
            result = {name: self._run(name, probe) for name, probe in self._probes.items()}
            self._last = (self._clock(), result)
            return result
        finally:
            self._refresh.release()

    @staticmethod
    def _run(name: str, probe: Callable[[], None]) -> str:
        try:
            probe()
            return "ok"
        except Exception as exc:  # any failure is this dependency's state, logged
            log.warning("health check %s failed: %s", name, exc)
            return "unavailable"
