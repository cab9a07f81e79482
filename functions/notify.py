"""Chat notifications through incoming webhooks (Microsoft Teams or Slack).

Delivery never blocks or loses a request: messages go to a small background pool, are retried a few
times with backoff (honouring Retry-After on 429), and every outcome is recorded as an audit entry
(`notification.sent` or `notification.failed`).
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable
from urllib.parse import urlparse

from .core.audit import AuditEntry

log = logging.getLogger("ezssh.notify")


@dataclass(frozen=True)
class Message:
    tenant_id: str
    url: str
    fmt: str | None  # teams | slack | None: guess from the host
    title: str
    facts: tuple[tuple[str, str], ...]
    request_id: str | None = None
    policy_id: str | None = None


def guess_format(url: str) -> str:
    host = (urlparse(url).hostname or "").lower()
    return "slack" if host == "hooks.slack.com" or host.endswith(".slack.com") else "teams"


def payload(msg: Message) -> dict:
    fmt = msg.fmt or guess_format(msg.url)
    text = msg.title + "\n" + "\n".join(f"{k}: {v}" for k, v in msg.facts)
    if fmt == "slack":
        lines = "\n".join(f"*{k}:* {v}" for k, v in msg.facts)
        return {"text": text, "blocks": [{"type": "section", "text": {"type": "mrkdwn", "text": f"*{msg.title}*\n{lines}"}}]}
    return {
        "@type": "MessageCard",
        "@context": "http://schema.org/extensions",
        "themeColor": "0076D7",
        "summary": msg.title,
        "title": msg.title,
        "sections": [{"facts": [{"name": k, "value": v} for k, v in msg.facts], "markdown": True}],
    }


def delivered(fmt: str, status: int, body: str) -> bool:
    """Teams answers 200 with body `1` (Workflows webhooks 202); Slack 200 `ok`. Teams reports
    throttling inside a 200 body rather than with 429."""
    if fmt == "slack":
        return status == 200 and body.strip() == "ok"
    if status == 202:
        return True
    return status == 200 and "429" not in body


class WebhookNotifier:
    def __init__(
        self,
        record: Callable[[AuditEntry], None],
        *,
        attempts: int = 4,
        backoff: float = 0.5,
        timeout: float = 5.0,
        verify: bool | str = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._record = record
        self._attempts = attempts
        self._backoff = backoff
        self._timeout = timeout
        self._verify = verify
        self._clock = clock
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="ezssh-notify")
        self._pending: set[Future] = set()
        self._lock = threading.Lock()
        self._session = None

    def _http(self):  # type: ignore[no-untyped-def]
        if self._session is None:
            import requests

            s = requests.Session()
            s.trust_env = False  # webhooks go where the policy says, not through ambient proxies
            s.verify = self._verify
            self._session = s
        return self._session

    def send(self, msg: Message) -> None:
        fut = self._pool.submit(self._deliver, msg)
        with self._lock:
            self._pending.add(fut)
        fut.add_done_callback(lambda f: self._forget(f))

    def _forget(self, fut: Future) -> None:
        with self._lock:
            self._pending.discard(fut)

    def drain(self, timeout: float = 30.0) -> None:
        """Wait for queued deliveries (tests; shutdown)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if not self._pending:
                    return
            time.sleep(0.02)

    def _deliver(self, msg: Message) -> None:
        fmt = msg.fmt or guess_format(msg.url)
        body = payload(msg)
        last = ""
        attempt = 0
        for attempt in range(1, self._attempts + 1):
            delay = self._backoff * 2 ** (attempt - 1)
            try:
                r = self._http().post(msg.url, json=body, timeout=self._timeout)
                if delivered(fmt, r.status_code, r.text):
                    self._audit(msg, "notification.sent", "ok", attempt, None)
                    return
                last = f"HTTP {r.status_code}: {r.text[:200]}"
                if r.status_code == 429:
                    try:
                        delay = min(30.0, float(r.headers.get("Retry-After", delay)))
                    except ValueError:
                        pass
                elif 400 <= r.status_code < 500 and r.status_code not in (408, 429):
                    break  # the webhook refuses this message; retrying will not help
            except Exception as exc:  # noqa: BLE001 - any transport failure is retried
                last = f"{type(exc).__name__}: {exc}"[:200]
            if attempt < self._attempts:
                time.sleep(delay)
        log.warning("notification for request %s failed after %d attempts: %s", msg.request_id, attempt, last)
        self._audit(msg, "notification.failed", "error", attempt, last)

    def _audit(self, msg: Message, action: str, outcome: str, attempts: int, error: str | None) -> None:
        entry = AuditEntry(
            tenant_id=msg.tenant_id,
            at=self._clock(),
            action=action,
            outcome=outcome,
            request_id=msg.request_id,
            policy_id=msg.policy_id,
            message=error,
            details={"attempts": attempts, "title": msg.title, "host": urlparse(msg.url).hostname},
        ).sealed()
        try:
            self._record(entry)
        except Exception:  # noqa: BLE001
            log.exception("could not record %s for request %s", action, msg.request_id)
