"""Hostile webhook destinations, against real receivers on 127.0.0.1 and audit rows in Azurite:
nothing leaves for a non-public address, redirects are not followed, reply bodies are never stored,
and the connection goes to the address that was checked."""

from __future__ import annotations

import json
import secrets
import ssl
import time

import pytest

from functions.notify import Destination, Message, WebhookNotifier, post_json
from tests.standins.webhook import HttpReceiver, HttpsReceiver


@pytest.fixture
def http_receiver():
    r = HttpReceiver()
    yield r
    r.stop()


@pytest.fixture
def https_receiver():
    r = HttpsReceiver().start()
    yield r
    r.stop()


@pytest.fixture
def tid(oidc):
    return oidc.tenant_id("contoso")


def notifier(context, **kw) -> WebhookNotifier:
    kw.setdefault("attempts", 2)
    kw.setdefault("backoff", 0.05)
    return WebhookNotifier(context.service.store.add_audit, **kw)


def send(context, tid: str, url: str, n: WebhookNotifier) -> list:
    rid = "hook-" + secrets.token_hex(6)
    n.send(Message(tid, url, "slack", "ezssh: an access request is waiting",
                   (("Host", "web1"), ("Reason", "x")), request_id=rid, policy_id="hostile"))
    n.drain(20)
    deadline = time.time() + 10
    while time.time() < deadline:
        rows = [e for e in context.service.store.list_audit(tid, request_id=rid) if e.action.startswith("notification.")]
        if rows:
            return rows
        time.sleep(0.05)
    raise AssertionError(f"no notification audit entry for {rid}")


def test_plain_http_to_loopback_is_refused_without_the_dev_setting(context, tid, http_receiver):
    rows = send(context, tid, http_receiver.url + "/hook", notifier(context))
    assert http_receiver.posts == []
    assert rows[0].action == "notification.failed" and rows[0].outcome == "refused"
    assert "https" in rows[0].message


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "127.1", "2130706433", "[::ffff:127.0.0.1]"])
def test_https_to_a_loopback_address_or_a_name_for_one_is_refused(context, tid, https_receiver, host):
    url = f"https://{host}:{https_receiver.port}/hook"
    rows = send(context, tid, url, notifier(context, verify=https_receiver.ca_path))
    assert https_receiver.posts == [], "nothing may reach a loopback listener"
    assert rows[0].outcome == "refused" and "non-public address" in rows[0].message


@pytest.mark.parametrize("url", ["https://169.254.169.254/metadata/instance", "https://[::1]:1/x",
                                 "https://10.0.0.1/x", "https://[fe80::1]/x"])
def test_metadata_and_private_addresses_are_refused(context, tid, url):
    rows = send(context, tid, url, notifier(context))
    assert rows[0].outcome == "refused" and rows[0].details["attempts"] == 0


def test_a_redirect_is_not_followed(context, tid, http_receiver):
    target = HttpReceiver()
    try:
        http_receiver.answer(302, b"moved", location=target.url + "/internal")
        rows = send(context, tid, http_receiver.url + "/hook", notifier(context, allow_loopback_http=True))
        assert len(http_receiver.posts) == 1 and target.posts == []
        assert rows[0].action == "notification.failed" and rows[0].message.startswith("HTTP 302")
        assert rows[0].details["attempts"] == 1  # a redirect is final, not retried
    finally:
        target.stop()


def test_the_reply_body_is_never_stored(context, tid, http_receiver):
    secret = "INTERNAL-" + secrets.token_hex(8)
    http_receiver.answer(500, f'{{"metadata": "{secret}"}}'.encode())
    rows = send(context, tid, http_receiver.url + "/hook", notifier(context, allow_loopback_http=True))
    assert rows[0].action == "notification.failed" and rows[0].message == "HTTP 500"
    stored = json.dumps([r.body() for r in rows])
    assert secret not in stored
    http_receiver.answer(200, f"ok {secret}".encode())  # not Slack's "ok": a failure, still nothing stored
    rows = send(context, tid, http_receiver.url + "/hook", notifier(context, allow_loopback_http=True))
    assert secret not in json.dumps([r.body() for r in rows])


def test_delivered_records_the_status_code_only(context, tid, http_receiver):
    rows = send(context, tid, http_receiver.url + "/hook", notifier(context, allow_loopback_http=True))
    assert rows[0].action == "notification.sent" and rows[0].details["status"] == 200 and rows[0].message is None
    assert http_receiver.posts[0]["body"]["mrkdwn"] is False


def test_the_connection_goes_to_the_checked_address_with_the_name_for_tls(https_receiver):
    ctx = ssl.create_default_context(cafile=https_receiver.ca_path)
    # the name is only used for SNI, the Host header and the certificate check: no second lookup
    dest = Destination("https", "localhost", https_receiver.port, "/pinned", "127.0.0.1")
    status, _, _ = post_json(dest, {"x": 1}, context=ctx, timeout=5)
    assert status == 200
    post = https_receiver.wait_for(1)[0]
    assert post["host"] == f"localhost:{https_receiver.port}" and post["path"] == "/pinned"
    # a name the certificate does not carry fails the TLS check, even though the address answers
    with pytest.raises(ssl.SSLCertVerificationError):
        post_json(Destination("https", "intranet.example", https_receiver.port, "/", "127.0.0.1"), {},
                  context=ctx, timeout=5)
    assert len(https_receiver.posts) == 1


def test_a_flood_to_one_destination_becomes_a_digest(context, tid, http_receiver):
    from functions import notify

    n = notifier(context, allow_loopback_http=True)
    rids = []
    for i in range(notify.BURST + 4):
        rid = f"flood-{secrets.token_hex(4)}-{i}"
        rids.append(rid)
        n.send(Message(tid, http_receiver.url + "/hook", "slack", "ezssh: an access request is waiting",
                       (("Requester", "alice@contoso.test"), ("Host", f"web{i}"), ("Request", rid)), request_id=rid))
    posts = http_receiver.wait_for(notify.BURST + 1, timeout=notify.REFILL_SECONDS + 10)
    n.drain(notify.REFILL_SECONDS + 10)
    assert len(posts) == notify.BURST + 1
    last = json.dumps(posts[-1]["body"])
    assert "4 updates" in last and all(r in last for r in rids[notify.BURST:])
