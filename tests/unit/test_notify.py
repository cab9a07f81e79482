"""functions.notify: what a webhook message looks like (quoting, escaping, no user text in titles),
which destinations are refused before anything is sent, and digests."""

from __future__ import annotations

import ipaddress
import json
from dataclasses import replace

import pytest

from functions.core.text import address_is_public
from functions.notify import Message, WebhookRefused, digest, escape_slack, escape_teams, payload, resolve_destination

HOSTILE_REASON = "fix *now*\n*Requester:* carol@contoso.test <!channel> <https://evil.example|click> _x_ `y` [a](b)"


def msg(fmt: str, reason: str = HOSTILE_REASON) -> Message:
    return Message("t", "https://hooks.example.net/x", fmt, "ezssh: an access request is waiting",
                   (("Requester", "alice@contoso.test"), ("Host", "web1"), ("Reason", reason)), request_id="r1")


def test_slack_user_text_is_plain_text_and_escaped():
    body = payload(msg("slack"))
    assert body["mrkdwn"] is False
    fields = body["blocks"][1]["fields"]
    assert all(f["type"] == "plain_text" for f in fields)  # Slack renders no markup in plain_text
    reason = fields[2]["text"]
    assert "\n" not in reason and "<!channel>" not in reason and "<https://" not in reason
    assert "&lt;!channel&gt;" in reason
    assert reason.startswith("Reason: “") and reason.endswith("”")  # quoted as what someone typed
    # the forged line is not a line of its own
    assert not any(f["text"].startswith("*Requester:*") for f in fields)


def test_teams_user_text_has_markdown_and_html_escaped():
    body = payload(msg("teams"))
    facts = {f["name"]: f["value"] for f in body["sections"][0]["facts"]}
    reason = facts["Reason"]
    assert "\n" not in reason and "<" not in reason and ">" not in reason.replace("&gt;", "")
    assert "\\*now\\*" in reason and "\\[a\\]\\(b\\)" in reason and "\\_x\\_" in reason
    assert body["title"] == "ezssh: an access request is waiting" and "now" not in body["summary"]


@pytest.mark.parametrize("escape", [escape_slack, escape_teams])
def test_escaping_never_lets_a_newline_or_angle_bracket_through(escape):
    for text in ("a\r\nb", "a\u2028b", "<b>", "x" * 2000):
        out = escape(text)
        assert "\n" not in out and "\r" not in out and "<" not in out and len(out) <= 500 * 6


def test_digest_is_one_message_with_a_line_per_request():
    held = [Message("t", "https://h.example/x", "slack", "ezssh: request", (("Requester", f"u{i}"), ("Host", "web1"),
                    ("Request", f"r{i}")), request_id=f"r{i}") for i in range(25)]
    d = digest(held)
    assert d.title == "ezssh: 25 updates on access requests"
    assert len(d.facts) == 21 and d.facts[-1] == ("More", "5 more")
    assert "r0" in d.facts[0][1] and d.request_id is None


@pytest.mark.parametrize("addr,public", [
    ("8.8.8.8", True), ("2606:4700:4700::1111", True), ("64:ff9b::808:808", True),
    ("127.0.0.1", False), ("10.1.2.3", False), ("172.16.0.1", False), ("192.168.1.1", False),
    ("169.254.169.254", False), ("100.64.0.1", False), ("0.0.0.0", False), ("224.0.0.1", False),
    ("240.0.0.1", False), ("255.255.255.255", False), ("192.0.0.170", False), ("198.18.0.1", False),
    ("::1", False), ("::", False), ("fe80::1", False), ("fc00::1", False), ("ff02::1", False),
    ("::ffff:127.0.0.1", False), ("::ffff:10.0.0.1", False), ("::ffff:8.8.8.8", True),
    ("::127.0.0.1", False), ("2002:7f00:1::", False), ("2002:a9fe:a9fe::", False), ("64:ff9b::7f00:1", False),
    ("64:ff9b::a9fe:a9fe", False), ("2001:db8::1", False), ("2001::1", False),
])
def test_public_addresses(addr, public):
    assert address_is_public(ipaddress.ip_address(addr)) is public


@pytest.mark.parametrize("url", [
    "https://127.0.0.1/x", "https://169.254.169.254/latest/meta-data", "https://[::1]/", "https://[::ffff:127.0.0.1]/",
    "https://localhost/", "https://127.1/", "https://2130706433/", "https://0x7f.1/", "https://0/",
    "https://[64:ff9b::7f00:1]/", "https://[2002:7f00:1::]/", "https://10.0.0.1/", "https://[fe80::1]/",
    "http://8.8.8.8/", "ftp://8.8.8.8/", "https://user:pw@8.8.8.8/", "https://", "not a url",
])
def test_destinations_refused_before_anything_is_sent(url):
    with pytest.raises(WebhookRefused):
        resolve_destination(url)


def test_plain_http_to_loopback_only_when_allowed():
    with pytest.raises(WebhookRefused):
        resolve_destination("http://127.0.0.1:9/x")
    d = resolve_destination("http://127.0.0.1:9/x?a=1", allow_loopback_http=True)
    assert (d.scheme, d.host, d.port, d.target, d.address) == ("http", "127.0.0.1", 9, "/x?a=1", "127.0.0.1")
    with pytest.raises(WebhookRefused):  # the dev setting opens loopback only
        resolve_destination("http://10.0.0.1/x", allow_loopback_http=True)


def test_a_public_literal_is_pinned_to_itself():
    d = resolve_destination("https://8.8.8.8:8443/hook")
    assert d.address == "8.8.8.8" and d.host == "8.8.8.8" and d.port == 8443


def test_payload_is_json_serialisable():
    for fmt in ("slack", "teams"):
        json.dumps(payload(msg(fmt, "plain")))


def test_a_delivery_finishing_at_once_does_not_deadlock_the_sender():
    """A refused destination finishes before send() attaches its done-callback; the callback then
    runs in the sending thread while it holds the notifier's lock."""
    import threading

    from functions.notify import WebhookNotifier

    recorded = []
    n = WebhookNotifier(recorded.append)
    done = threading.Event()

    def flood() -> None:
        for i in range(200):
            n.send(Message("t", f"ftp://refused{i}.example/x", "slack", "ezssh: test", (), request_id=f"r{i}"))
        done.set()

    threading.Thread(target=flood, daemon=True).start()
    assert done.wait(20), "send() deadlocked"
    n.drain(20)
    assert recorded and all(e.outcome == "refused" for e in recorded)


def test_a_cards_one_link_is_the_requests_page_and_a_digest_has_none():
    link = "https://ezssh.example.net/app/requests/0123456789abcdef"
    teams = payload(replace(msg("teams"), link=link))
    assert teams["potentialAction"] == [{"@type": "OpenUri", "name": "Open request",
                                         "targets": [{"os": "default", "uri": link}]}]
    slack = payload(replace(msg("slack"), link=link))
    assert [e["url"] for b in slack["blocks"] if b["type"] == "actions" for e in b["elements"]] == [link]
    assert "potentialAction" not in payload(msg("teams"))  # no public URL set: no link
    assert digest([replace(msg("slack"), link=link)] * 2).link is None
