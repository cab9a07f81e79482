"""Chat notifications through incoming webhooks (Microsoft Teams or Slack).

Delivery never blocks or loses a request: messages go to a small background pool, are retried a few
times with backoff (honouring Retry-After on 429), and every outcome is recorded as an audit entry
(`notification.sent` or `notification.failed`) holding the HTTP status code only, never the reply.

A webhook URL is a credential and a way out of the network, so every delivery is checked at this
edge:
- https only (plain http only to a loopback address where the deployment allows it: local
  development);
- the host name is resolved here, and the delivery is refused if ANY address it resolves to is not
  a public unicast address (private, loopback, link-local, multicast, reserved, unspecified, CGNAT,
  or an IPv4-mapped / 6to4 / NAT64 form of one);
- the connection goes to the address that was checked (the name is not resolved again, so DNS
  rebinding cannot swap it), with the name as TLS SNI and Host header and the certificate checked
  against the name;
- redirects are not followed.
Text from requesters (host, reason, comments) is quoted and escaped for Slack mrkdwn / Teams markdown,
and never goes into a title. Messages to one destination beyond a small burst are held and sent as
one digest, so a flood of requests cannot become a flood of posts.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from urllib.parse import urlsplit

from .core.audit import AuditEntry
from .core.text import address_is_public

log = logging.getLogger("ezssh.notify")
MAX_REPLY = 4096  # bytes of a reply read to tell success from failure; never stored
BURST = 5  # messages to one destination sent at once ...
REFILL_SECONDS = 12.0  # ... then one more every this many seconds; the rest wait for a digest


@dataclass(frozen=True)
class Message:
    tenant_id: str
    url: str
    fmt: str | None  # teams | slack | None: guess from the host
    title: str  # written by the service only; never holds text a requester typed
    facts: tuple[tuple[str, str], ...]
    request_id: str | None = None
    policy_id: str | None = None
    quoted: tuple[str, ...] = ("Reason", "Comment")  # facts shown as quotations of what someone typed
    link: str | None = None  # the request's page (EZSSH_PUBLIC_URL/app/requests/<id>): built by the service


class WebhookRefused(Exception):
    """The destination is not allowed (scheme, address); nothing was sent."""


def guess_format(url: str) -> str:
    host = (urlsplit(url).hostname or "").lower()
    return "slack" if host == "hooks.slack.com" or host.endswith(".slack.com") else "teams"


# ---- text -------------------------------------------------------------------------------------

_TEAMS_SPECIAL = set("\\`*_{}[]()#+-.!|~>")


def _one_line(text: str, limit: int = 500) -> str:
    text = " ".join(str(text).split())  # no newlines, tabs or runs of spaces survive
    return text if len(text) <= limit else text[: limit - 1] + "…"


def escape_slack(text: str) -> str:
    """Slack's three control characters (&, <, >: links, mentions such as <!channel>)."""
    return _one_line(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def escape_teams(text: str) -> str:
    """Markdown and HTML in a Teams card: backslash-escape markdown, entity-escape HTML."""
    out = []
    for ch in _one_line(text):
        if ch in "&<>":
            out.append({"&": "&amp;", "<": "&lt;", ">": "&gt;"}[ch])
        elif ch in _TEAMS_SPECIAL:
            out.append("\\" + ch)
        else:
            out.append(ch)
    return "".join(out)


def _value(msg: Message, key: str, value: str, escape: Callable[[str], str]) -> str:
    v = escape(value)
    return f"“{v}”" if key in msg.quoted and value not in ("", "-") else v


def payload(msg: Message) -> dict:
    fmt = msg.fmt or guess_format(msg.url)
    if fmt == "slack":
        title = escape_slack(msg.title)
        facts = [f"{escape_slack(k)}: {_value(msg, k, v, escape_slack)}" for k, v in msg.facts]
        blocks: list[dict] = [
            {"type": "header", "text": {"type": "plain_text", "text": _one_line(msg.title, 150)}},
            # plain_text: Slack renders no markup at all in these
            {"type": "section", "fields": [{"type": "plain_text", "text": f} for f in facts[:10]]},
        ]
        if msg.link:
            blocks.append(
                {
                    "type": "actions",
                    "elements": [
                        {"type": "button", "text": {"type": "plain_text", "text": "Open request"}, "url": msg.link}
                    ],
                }
            )
        return {
            # the notification text (and fallback): one escaped line per fact, rendered without markup
            "text": "\n".join([title, *facts] + ([msg.link] if msg.link else [])),
            "mrkdwn": False,
            "blocks": blocks,
        }
    card = {
        "@type": "MessageCard",
        "@context": "http://schema.org/extensions",
        "themeColor": "0076D7",
        "summary": escape_teams(msg.title),
        "title": escape_teams(msg.title),
        "sections": [
            {
                "facts": [{"name": escape_teams(k), "value": _value(msg, k, v, escape_teams)} for k, v in msg.facts],
                "markdown": True,
            }
        ],
    }
    if msg.link:
        card["potentialAction"] = [
            {"@type": "OpenUri", "name": "Open request", "targets": [{"os": "default", "uri": msg.link}]}
        ]
    return card


def delivered(fmt: str, status: int, body: str) -> bool:
    """Teams answers 200 with body `1` (Workflows webhooks 202); Slack 200 `ok`. Teams reports
    throttling inside a 200 body rather than with 429."""
    if fmt == "slack":
        return status == 200 and body.strip() == "ok"
    if status == 202:
        return True
    return status == 200 and "429" not in body


# ---- destination checks -------------------------------------------------------------------------


@dataclass(frozen=True)
class Destination:
    scheme: str
    host: str  # the name (SNI, Host header, certificate check)
    port: int
    target: str  # path and query
    address: str  # the checked address the connection goes to


def resolve_destination(url: str, *, allow_loopback_http: bool = False) -> Destination:
    """Check a webhook URL and resolve it to one address that may be contacted. Raises WebhookRefused."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise WebhookRefused("not a valid URL") from None
    host = (parts.hostname or "").rstrip(".").lower()
    if not host or parts.username is not None or parts.password is not None:
        raise WebhookRefused("the URL names no host, or carries credentials")
    if parts.scheme not in ("https", "http"):
        raise WebhookRefused("only https webhooks are allowed")
    port = port or (443 if parts.scheme == "https" else 80)
    if parts.scheme == "http" and not allow_loopback_http:
        raise WebhookRefused("only https webhooks are allowed")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        raise WebhookRefused("the host name does not resolve") from None
    addrs = []
    for info in infos:
        try:
            addrs.append(ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]))
        except ValueError:
            raise WebhookRefused("the host name resolves to something that is not an IP address") from None
    if not addrs:
        raise WebhookRefused("the host name does not resolve")
    loopback_ok = allow_loopback_http and all(_is_loopback(a) for a in addrs)
    if parts.scheme == "http" and not loopback_ok:
        raise WebhookRefused("only https webhooks are allowed (plain http only to loopback in development)")
    if not loopback_ok:
        bad = [str(a) for a in addrs if not address_is_public(a)]
        if bad:
            raise WebhookRefused(f"the destination resolves to a non-public address ({bad[0]})")
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return Destination(parts.scheme, host, port, target, str(addrs[0]))


def _is_loopback(a: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(a, ipaddress.IPv6Address) and a.ipv4_mapped is not None:
        return a.ipv4_mapped.is_loopback
    return a.is_loopback


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS to one already-checked address; SNI, Host and the certificate check use the name."""

    def __init__(self, dest: Destination, context: ssl.SSLContext, timeout: float) -> None:
        super().__init__(dest.host, dest.port, context=context, timeout=timeout)
        self._address = dest.address
        self._ctx = context

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._ctx.wrap_socket(sock, server_hostname=self.host)


class _PinnedHTTPConnection(http.client.HTTPConnection):
    def __init__(self, dest: Destination, timeout: float) -> None:
        super().__init__(dest.host, dest.port, timeout=timeout)
        self._address = dest.address

    def connect(self) -> None:
        self.sock = socket.create_connection((self._address, self.port), self.timeout)


def post_json(dest: Destination, body: dict, *, context: ssl.SSLContext, timeout: float) -> tuple[int, str, str | None]:
    """POST to the checked address; no redirects. Returns (status, first bytes of the reply, Retry-After)."""
    conn: http.client.HTTPConnection = (
        _PinnedHTTPSConnection(dest, context, timeout)
        if dest.scheme == "https"
        else _PinnedHTTPConnection(dest, timeout)
    )
    try:
        data = json.dumps(body).encode()
        conn.request(
            "POST", dest.target, body=data, headers={"Content-Type": "application/json", "User-Agent": "ezssh-notify"}
        )
        resp = conn.getresponse()
        reply = resp.read(MAX_REPLY).decode("utf-8", "replace")
        return resp.status, reply, resp.getheader("Retry-After")
    finally:
        conn.close()


# ---- the notifier ------------------------------------------------------------------------------


class _Bucket:
    def __init__(self, now: float) -> None:
        self.tokens, self.at = float(BURST), now

    def take(self, now: float) -> bool:
        self.tokens = min(float(BURST), self.tokens + (now - self.at) / REFILL_SECONDS)
        self.at = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False

    def wait(self) -> float:
        return max(0.05, (1 - self.tokens) * REFILL_SECONDS)


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
        allow_loopback_http: bool = False,
    ) -> None:
        self._record = record
        self._attempts = attempts
        self._backoff = backoff
        self._timeout = timeout
        self._clock = clock
        self._allow_loopback_http = allow_loopback_http
        self._ctx = (
            ssl.create_default_context(cafile=verify) if isinstance(verify, str) else ssl.create_default_context()
        )
        if verify is False:
            self._ctx.check_hostname = False
            self._ctx.verify_mode = ssl.CERT_NONE
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="ezssh-notify")
        self._pending: set[Future] = set()
        # reentrant: a delivery that finishes before its done-callback is attached runs that
        # callback (which takes this lock) in the thread that submitted it, still holding it
        self._lock = threading.RLock()
        self._buckets: dict[str, _Bucket] = {}
        self._held: dict[str, list[Message]] = {}
        self._timers: dict[str, threading.Timer] = {}

    def send(self, msg: Message) -> None:
        now = time.monotonic()
        with self._lock:
            bucket = self._buckets.setdefault(msg.url, _Bucket(now))
            if not self._held.get(msg.url) and bucket.take(now):
                self._submit(msg, (msg,))
                return
            self._held.setdefault(msg.url, []).append(msg)
            if msg.url not in self._timers:
                t = threading.Timer(bucket.wait(), self._flush, (msg.url,))
                t.daemon = True
                self._timers[msg.url] = t
                t.start()

    def _flush(self, url: str) -> None:
        with self._lock:
            self._timers.pop(url, None)
            held = self._held.pop(url, [])
            if not held:
                return
            self._buckets.setdefault(url, _Bucket(time.monotonic())).take(time.monotonic())
            self._submit(held[0] if len(held) == 1 else digest(held), tuple(held))

    def _submit(self, msg: Message, originals: tuple[Message, ...]) -> None:
        fut = self._pool.submit(self._deliver, msg, originals)
        self._pending.add(fut)
        fut.add_done_callback(self._forget)

    def _forget(self, fut: Future) -> None:
        with self._lock:
            self._pending.discard(fut)

    def drain(self, timeout: float = 30.0) -> None:
        """Wait for queued and held deliveries (shutdown)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if not self._pending and not self._held:
                    return
            time.sleep(0.02)

    def _deliver(self, msg: Message, originals: tuple[Message, ...]) -> None:
        fmt = msg.fmt or guess_format(msg.url)
        body = payload(msg)
        try:
            dest = resolve_destination(msg.url, allow_loopback_http=self._allow_loopback_http)
        except WebhookRefused as exc:
            log.warning("notification for request %s refused: %s", msg.request_id, exc)
            for m in originals:
                self._audit(m, "notification.failed", "refused", 0, f"Destination refused: {exc}.", len(originals))
            return
        last = ""
        attempt = 0
        for attempt in range(1, self._attempts + 1):
            delay = self._backoff * 2 ** (attempt - 1)
            try:
                status, reply, retry_after = post_json(dest, body, context=self._ctx, timeout=self._timeout)
                if delivered(fmt, status, reply):
                    for m in originals:
                        self._audit(m, "notification.sent", "ok", attempt, None, len(originals), status)
                    return
                last = f"HTTP {status}"
                if 300 <= status < 400:
                    last += " (redirects are not followed)"
                    break
                if status == 429:
                    try:
                        delay = min(30.0, float(retry_after or delay))
                    except ValueError:
                        pass
                elif 400 <= status < 500 and status not in (408, 429):
                    break  # the webhook refuses this message; retrying will not help
            except Exception as exc:  # any transport failure is retried
                last = type(exc).__name__  # the class only: messages can quote what the far end said
            if attempt < self._attempts:
                time.sleep(delay)
        log.warning("notification for request %s failed after %d attempts: %s", msg.request_id, attempt, last)
        for m in originals:
            self._audit(m, "notification.failed", "error", attempt, last, len(originals))

    def _audit(
        self,
        msg: Message,
        action: str,
        outcome: str,
        attempts: int,
        error: str | None,
        batch: int = 1,
        status: int | None = None,
    ) -> None:
        details: dict = {"attempts": attempts, "host": urlsplit(msg.url).hostname}
        if status is not None:
            details["status"] = status
        if batch > 1:
            details["digest_of"] = batch
        entry = AuditEntry(
            tenant_id=msg.tenant_id,
            at=self._clock(),
            action=action,
            outcome=outcome,
            request_id=msg.request_id,
            policy_id=msg.policy_id,
            message=error,
            details=details,
        ).sealed()
        try:
            self._record(entry)
        except Exception:
            log.exception("could not record %s for request %s", action, msg.request_id)


def digest(held: list[Message]) -> Message:
    """Several messages to one destination as one: a line per message (its title and facts)."""
    first = held[0]
    facts = []
    for m in held[:20]:
        quoted = set(m.quoted)
        parts = [f"{k}: “{v}”" if k in quoted and v not in ("", "-") else f"{k}: {v}" for k, v in m.facts]
        facts.append(("Update", f"{m.title.removeprefix('ezssh: ')}: " + "; ".join(parts)))
    if len(held) > 20:
        facts.append(("More", f"{len(held) - 20} more"))
    return replace(
        first,
        title=f"ezssh: {len(held)} updates on access requests",
        facts=tuple(facts),
        request_id=None,
        quoted=(),
        link=None,
    )
