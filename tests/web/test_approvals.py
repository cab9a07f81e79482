"""Approvers on the web page: bob signs in through the OIDC stand-in, sees alice's request with her
name, approves it with a comment, and alice's waiting `ezssh ssh` logs in and shows bob's comment.
User text is shown as text; the page carries its security headers; a phone sees it without
sideways scrolling."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import httpx
import pytest

from devstack.demo import run_cli
from tests.e2e.approvals import approval_policy, wait_pending
from tests.e2e.signin import signed_in_home
from tests.web.conftest import PHONE

REPO = Path(__file__).resolve().parents[2]
# The README's picture: written there by `make screenshot` (EZSSH_UPDATE_SCREENSHOT=1), else kept
# with the test's own files, so that a test run leaves the tree as it was.
README_SCREENSHOT = REPO / "docs" / "approvals-phone.png"


@pytest.fixture(scope="module")
def gated(context, oidc, sshd, demo_policy):
    yield from approval_policy(context, oidc, sshd, demo_policy, "gated-web", ["127.0.0.1", "web*.contoso.test"])


def ask(api_server: str, token: str, host: str, reason: str) -> dict:
    r = httpx.post(f"{api_server}/api/requests", headers={"Authorization": f"Bearer {token}"}, timeout=20,
                   json={"host": host, "principal": "alice", "policy": "gated-web", "reason": reason})
    assert r.status_code == 202, r.text
    return r.json()


def test_bob_approves_on_the_web_and_alices_waiting_ssh_shows_his_comment(
        tmp_path_factory, api_server, oidc, sshd, gated, token_for, signed_in):
    bob_tok = token_for("bob")
    before = {r["id"] for r in httpx.get(f"{api_server}/api/requests", params={"role": "approver"},
                                         headers={"Authorization": f"Bearer {bob_tok}"}, timeout=10).json()["requests"]}
    alice = signed_in_home(tmp_path_factory, api_server, oidc, "alice", "alice-web")
    result: dict = {}
    ssh = ["ssh", "--policy", "gated-web", "--reason", "deploy hotfix", "alice@127.0.0.1", "-p", str(sshd.port),
           "-o", "BatchMode=yes", "whoami"]
    t = threading.Thread(target=lambda: result.update(r=run_cli(ssh, alice, timeout=120)))
    t.start()
    rid = wait_pending(api_server, bob_tok, "gated-web", "alice", before, timeout=60)

    tab = signed_in("bob")
    page = tab.page
    card = page.locator(f'article[data-request="{rid}"]')
    card.wait_for(timeout=20_000)
    # tokens live in this tab's sessionStorage only: no cookie for the app, nothing in localStorage
    assert page.context.cookies(api_server) == []
    stored = page.evaluate("() => [Object.keys(localStorage), Object.keys(sessionStorage).join(' ')]")
    assert not [k for k in stored[0] if "token" in k.lower()], stored[0]
    assert "accesstoken" in stored[1].lower()
    alice_name = oidc.user("alice")["name"]  # from users.json: what the stand-in puts in her token
    assert alice_name in card.locator("h2").inner_text()
    assert "deploy hotfix" in card.locator(".reason").inner_text()
    comment = "ok for the hotfix, until 18:00"
    card.locator("textarea").fill(comment)
    card.locator("button.approve").click()
    card.locator(".outcome").wait_for()
    assert "Approved by " + oidc.user("bob")["name"] in card.locator(".outcome").inner_text()

    t.join(timeout=120)
    r = result["r"]
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "alice"
    assert f"{api_server}/app/requests/{rid}" in r.stderr  # the waiting CLI gave the page's link
    assert f'Approved by {oidc.user("bob")["name"]} (bob@contoso.test): "{comment}"' in r.stderr

    # the request's own page (the link) shows the decision and its comment to the requester
    mine = signed_in("alice", path=f"/app/requests/{rid}")
    mine.page.locator("#outcome").wait_for()
    assert comment in mine.page.locator(".approvals").inner_text()
    assert mine.page.locator(".state").first.inner_text() in ("approved", "issued")
    assert not tab.errors and not mine.errors, (tab.errors, mine.errors)


def test_a_hostile_reason_renders_as_text(api_server, oidc, gated, token_for, signed_in):
    hostile = "<img src=x onerror=alert(1)> **bold** [link](javascript:alert(2)) <script>alert(3)</script>"
    rid = ask(api_server, token_for("alice"), "web1.contoso.test", hostile)["id"]
    tab = signed_in("bob", path=f"/app/requests/{rid}")
    reason = tab.page.locator(".reason")
    reason.wait_for()
    assert reason.inner_text() == hostile  # shown exactly as typed
    assert tab.page.locator("main img, main script, main a[href^='javascript']").count() == 0
    assert reason.locator("*").count() == 0  # no element was made from it
    tab.page.wait_for_timeout(300)
    assert not tab.dialogs and not tab.errors, (tab.dialogs, tab.errors)


def test_security_headers_on_every_page_answer(api_server, oidc):
    r = httpx.get(f"{api_server}/app/requests/0123456789abcdef", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    csp = {d.split()[0]: d.split()[1:] for d in r.headers["content-security-policy"].split("; ")}
    assert csp["script-src"] == ["'self'"] and csp["style-src"] == ["'self'"]  # no inline script or style
    assert csp["frame-ancestors"] == ["'none'"] and csp["default-src"] == ["'none'"]
    assert csp["connect-src"] == ["'self'", oidc.base_url]  # the API (this origin) and the authority only
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.headers["referrer-policy"] == "no-referrer"
    assert "set-cookie" not in r.headers
    assert "<script>" not in r.text and " style=" not in r.text  # nothing inline for the policy to allow
    # the page's files are versioned by content: cached for good, and an old version is gone
    src = next(part.split('"')[1] for part in r.text.split("src=")[1:] if "main.js" in part)
    js = httpx.get(f"{api_server}{src}", timeout=10)
    assert js.status_code == 200 and "immutable" in js.headers["cache-control"]
    assert js.headers["content-type"].startswith("text/javascript")
    assert js.headers["content-encoding"] == "gzip" and "import" in js.text  # httpx asks for gzip
    plain = httpx.get(f"{api_server}{src}", headers={"Accept-Encoding": "identity"}, timeout=10)
    assert "content-encoding" not in plain.headers and plain.content == js.content
    assert httpx.get(f"{api_server}{src.replace('/v/', '/v/0')}", timeout=10).status_code == 404
    # only the page's own files are served: nothing else of the package, however the path is spelled
    # (a path the client folds to another page of the app gets the app's document)
    base = src.rsplit("/", 1)[0]
    for other in ("../../wiring.py", "..%2F..%2Fwiring.py", "%2e%2e/%2e%2e/settings.py", "../index.html",
                  "../vendor.json", "vendor/../../web/vendor.json", "..%2F..%2F..%2Fapi%2Fwiring.py"):
        got = httpx.get(f"{api_server}{base}/{other}", timeout=10)
        assert got.status_code == 404 or got.text == r.text, (other, got.status_code)
        assert "from __future__" not in got.text and '"files"' not in got.text, other


def test_phone_width_approvals_without_sideways_scroll(api_server, oidc, gated, token_for, signed_in, tmp_path):
    long_host = "web-" + "x" * 55 + ".eu-west.contoso.test"
    ask(api_server, token_for("alice"), long_host, "rotate the TLS certificate " * 8)
    ask(api_server, token_for("alice"), "web1.contoso.test", "deploy the 4.2 hotfix (INC-1042)")  # on top
    tab = signed_in("bob", viewport=PHONE)
    page = tab.page
    page.locator("article.request").first.wait_for()
    page.locator(f'article.request:has-text("{long_host}")').wait_for()
    scroll_w, client_w = page.evaluate("[document.documentElement.scrollWidth, document.documentElement.clientWidth]")
    assert scroll_w <= client_w, f"the page is {scroll_w}px wide in a {client_w}px viewport"
    shot = README_SCREENSHOT if os.environ.get("EZSSH_UPDATE_SCREENSHOT") == "1" else tmp_path / "approvals-phone.png"
    page.screenshot(path=str(shot))
    assert shot.stat().st_size > 10_000
    # keyboard: the first card's comment, then Approve, are reachable with Tab
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.tagName") in ("A", "BUTTON", "TEXTAREA")
    assert not tab.errors, tab.errors


def decide(api_server: str, token: str, rid: str, action: str, comment: str) -> dict:
    r = httpx.post(f"{api_server}/api/requests/{rid}/{action}", json={"comment": comment},
                   headers={"Authorization": f"Bearer {token}"}, timeout=20)
    assert r.status_code == 200, r.text
    return r.json()


def test_live_state_and_a_lost_race_say_who_decided(api_server, oidc, gated, token_for, signed_in):
    raced = ask(api_server, token_for("alice"), "web2.contoso.test", "race")["id"]
    elsewhere = ask(api_server, token_for("alice"), "web3.contoso.test", "decided elsewhere")["id"]
    tab = signed_in("bob")
    page = tab.page
    raced_card = page.locator(f'article[data-request="{raced}"]')
    raced_card.locator("button.approve").wait_for()
    page.locator(f'article[data-request="{elsewhere}"] button.approve').wait_for()
    dave = oidc.user("dave")["name"]

    # dave denies while bob's page still offers Approve: bob's click loses, and the page says to whom
    decide(api_server, token_for("dave"), raced, "deny", "change freeze")
    raced_card.locator("button.approve").click()
    note = raced_card.locator(".note")
    note.wait_for()
    assert f"Someone else decided first. Denied by {dave}." in note.inner_text()
    assert "change freeze" in raced_card.locator(".outcome").inner_text()

    # a request approved elsewhere changes on bob's page by itself (the list is read again)
    decide(api_server, token_for("dave"), elsewhere, "approve", "fine")
    outcome = page.locator(f'article[data-request="{elsewhere}"] .outcome')
    outcome.wait_for(timeout=15_000)
    assert f"Approved by {dave}" in outcome.inner_text()
    assert page.locator(f'article[data-request="{elsewhere}"] button.approve').count() == 0
    assert all(f"/api/requests/{raced}/approve" in e and "409" in e for e in tab.errors), tab.errors


def test_audit_shows_a_requests_chain_verifying_and_a_chart_per_policy(api_server, oidc, gated, token_for, signed_in):
    rid = ask(api_server, token_for("alice"), "web4.contoso.test", "audit me")["id"]
    decide(api_server, token_for("bob"), rid, "deny", "not today")
    tab = signed_in("carol", path="/app/audit")
    page = tab.page
    page.fill('input[name="request_id"]', rid)
    page.click('form.search button[type="submit"]')
    page.locator("#chain").wait_for()
    assert "verifies" in page.locator("#chain").inner_text()
    rows = page.locator("#audit-entries tbody tr")
    assert rows.count() >= 2  # created, denied
    text = page.locator("#audit-entries").inner_text()
    assert "request.created" in text and "request.denied" in text
    # the chart: this policy's day shows the denial, drawn by uPlot on a canvas
    chart = page.locator('figure.chart[data-policy="gated-web"]')
    chart.wait_for(timeout=15_000)
    assert chart.locator("canvas").count() == 1
    denied = int(chart.locator("figcaption").inner_text().split("denied ")[1].split(",")[0])
    assert denied >= 1
    # entries of one user: the actor's name filters by their object id
    page.locator("#audit-entries button.link", has_text="bob@contoso.test").first.click()
    page.wait_for_function("() => document.querySelector('input[name=user]').value.length > 0")
    assert page.locator('input[name="user"]').input_value() == oidc.user("bob")["oid"]
    page.wait_for_function("""() => {
        const cells = [...document.querySelectorAll('#audit-entries tbody td:nth-child(3)')];
        return cells.length > 0 && cells.every((td) => td.textContent === 'bob@contoso.test');
    }""")
    assert not tab.errors, tab.errors
