"""Measure where one issuance spends its CPU, in-process, without touching production code.

`Meter.wrap(owner, "name", "label")` replaces a function or method on its owner (a module or a class)
by a wrapper that adds the call's CPU time and wall time to `label`. The CPU clock is the whole
process's (time.process_time, user + system): azure-core prepares the parts of a batch request in a
thread pool of its own, which a per-thread clock would miss. So measure from one thread, with
nothing else running in the process. Time spent in a wrapped callee is the callee's, not the caller's
(exclusive attribution), so "certificate build" excludes the HSM signature that happens inside it.
`restore()` puts the originals back.

`HttpCounter` counts the HTTP requests the process sends through `requests` (which azure-core's
RequestsTransport uses), by port and method: storage round trips and Key Vault calls per issuance.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, defaultdict
from typing import Any, Callable
from urllib.parse import urlsplit


class Meter:
    def __init__(self, clock: Callable[[], float] = time.process_time) -> None:
        self.clock = clock
        self.cpu: dict[str, float] = defaultdict(float)
        self.wall: dict[str, float] = defaultdict(float)
        self.calls: Counter[str] = Counter()
        self._local = threading.local()
        self._undo: list[Callable[[], None]] = []

    def _stack(self) -> list[list[float]]:
        s = getattr(self._local, "stack", None)
        if s is None:
            s = self._local.stack = []
        return s

    def wrap(self, owner: Any, name: str, label: str) -> None:
        original = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
        fn = original.__func__ if isinstance(original, (staticmethod, classmethod)) else original
        meter = self

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            stack = meter._stack()
            frame = [0.0, 0.0]
            stack.append(frame)
            clock = meter.clock
            c0, w0 = clock(), time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                dc, dw = clock() - c0, time.perf_counter() - w0
                stack.pop()
                meter.cpu[label] += dc - frame[0]
                meter.wall[label] += dw - frame[1]
                meter.calls[label] += 1
                if stack:
                    stack[-1][0] += dc
                    stack[-1][1] += dw

        wrapper.__wrapped__ = fn  # type: ignore[attr-defined]
        if isinstance(original, staticmethod):
            setattr(owner, name, staticmethod(wrapper))
        elif isinstance(original, classmethod):
            setattr(owner, name, classmethod(wrapper))
        else:
            setattr(owner, name, wrapper)
        self._undo.append(lambda: setattr(owner, name, original))

    def reset(self) -> None:
        self.cpu.clear()
        self.wall.clear()
        self.calls.clear()

    def restore(self) -> None:
        while self._undo:
            self._undo.pop()()


class HttpCounter:
    """Counts requests.Session.send calls by (port, method) while installed."""

    def __init__(self) -> None:
        import requests

        self._cls = requests.Session
        self._orig = requests.Session.send
        self.counts: Counter[tuple[int, str]] = Counter()
        self._lock = threading.Lock()
        counter = self

        def send(session: Any, request: Any, **kwargs: Any) -> Any:
            port = urlsplit(request.url).port or 0
            with counter._lock:
                counter.counts[(port, request.method)] += 1
            return counter._orig(session, request, **kwargs)

        requests.Session.send = send  # type: ignore[method-assign]

    def reset(self) -> None:
        with self._lock:
            self.counts.clear()

    def on(self, port: int, methods: tuple[str, ...] | None = None) -> int:
        with self._lock:
            return sum(n for (p, m), n in self.counts.items() if p == port and (methods is None or m in methods))

    def close(self) -> None:
        self._cls.send = self._orig  # type: ignore[method-assign]
