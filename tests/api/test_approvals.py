"""Approval workflows (issue 4): dual key / N of M, deny, cancel, expiry, races, notifications."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from devstack.proc import free_port
from devstack.stack import identity_of
from functions.core.errors import Conflict, Forbidden
from functions.core.evaluation import AccessRequest
from functions.service import Service


class Receiver:
    """A real local webhook endpoint (Slack-style answers), optionally failing the first N posts."""

    def __init__(self) -> None:
        self.posts: list[dict] = []
        self.fail_first = 0
        self.fail_marker = ""  # only posts containing this count against fail_first
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))) or b"{}")
                with outer.lock:
                    failing = outer.fail_first > 0 and outer.fail_marker in json.dumps(body)
                    if failing:
                        outer.fail_first -= 1
                    else:
                        outer.posts.append(body)
                self.send_response(500 if failing else 200)
                self.end_headers()
                self.wfile.write(b"boom" if failing else b"ok")

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(self, needle: str, timeout: float = 15) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            with self.lock:
                for p in self.posts:
                    if needle in json.dumps(p):
                        return p
            time.sleep(0.05)
        raise AssertionError(f"no notification containing {needle!r}; got {self.posts}")


@pytest.fixture(scope="module")
def receiver():
    r = Receiver()
    yield r
    r.server.shutdown()


def gated_doc(oidc, pid: str, n: int = 1, webhook: str | None = None) -> dict:
    doc = {
        "id": pid,
        "rules": [{"groups": [oidc.group_id("contoso", "ezssh-users")], "action": "approval"}],
        "hosts": ["gated-*", "127.0.0.1"],
        "principals": ["{username}", "deploy"],
        "approvers": {"groups": [oidc.group_id("contoso", "ezssh-approvers")]},
        "approvals_required": n,
        "request_ttl": 600,
    }
    if webhook:
        doc.update(webhook_url=webhook, webhook_format="slack")
    return doc


@pytest.fixture(scope="module")
def gated(context, oidc, receiver):
    from devstack.stack import ensure_policy

    carol = identity_of(oidc, "carol")
    return {
        "n1": ensure_policy(context.service, carol, gated_doc(oidc, "gated", 1, receiver.url)),
        "n2": ensure_policy(context.service, carol, gated_doc(oidc, "gated-two", 2)),
    }


def ask(client, auth, user: str, policy: str, **extra) -> dict:
    body = {"host": "gated-1", "principal": user, "policy": policy, "ttl_seconds": 1800, "reason": "incident 42"}
    body.update(extra)
    r = client.post("/api/requests", headers=auth(user), json=body)
    assert r.status_code == 202, r.text
    return r.json()


def test_a_pending_request_says_who_may_approve_and_notifies_them(client, oidc, gated, receiver, auth):
    req = ask(client, auth, "alice", "gated")
    assert req["status"] == "pending" and req["approvals_required"] == 1
    assert req["approvers"] == {"users": [], "groups": [oidc.group_id("contoso", "ezssh-approvers")]}
    assert req["expires_at"] > time.time() + 500
    note = receiver.wait_for(req["id"])
    text = note["text"]
    for fact in (f"Requester: {oidc.user('alice')['name']} (alice@contoso.test)", "gated-1", "30 min", "incident 42"):
        assert fact in text
    # one link, to the request's web page on the deployment's public URL (the API server here),
    # which the pending answer (what the waiting CLI prints) names too
    page = f"{client.base_url}/app/requests/{req['id']}"
    assert req["link"] == page
    buttons = [e for b in note["blocks"] if b["type"] == "actions" for e in b["elements"]]
    assert [b["url"] for b in buttons] == [page] and text.count("http") == 1
    assert client.get(page).status_code == 200  # the page is there
    # the requester's display name, from her token (users.json holds what the stand-in puts there)
    assert req["requester_name"] == oidc.user("alice")["name"]
    listed = client.get("/api/requests", params={"state": "pending", "role": "approver"},
                        headers=auth("bob")).json()["requests"]
    assert req["id"] in {r["id"] for r in listed}
    mine = client.get("/api/requests", params={"state": "pending", "role": "approver"},
                      headers=auth("alice")).json()["requests"]
    assert req["id"] not in {r["id"] for r in mine}


def test_dual_key_approval_then_exactly_one_certificate(client, gated, receiver, auth, pub, oidc):
    req = ask(client, auth, "alice", "gated")
    rid = req["id"]
    early = client.post(f"/api/requests/{rid}/certificate", headers=auth("alice"), json={"public_key": pub()})
    assert early.status_code == 409
    ok = client.post(f"/api/requests/{rid}/approve", headers=auth("bob"), json={"comment": "go"})
    assert ok.status_code == 200 and ok.json()["status"] == "approved", ok.text
    told = receiver.wait_for(f"Decided by: {oidc.user('bob')['name']} (bob@contoso.test)")  # the requester is told
    assert rid in told["text"] and "Comment: “go”" in told["text"] and "approved" in told["text"]
    seen = client.get(f"/api/requests/{rid}", headers=auth("alice")).json()
    assert seen["decided_by_name"] == oidc.user("bob")["name"]
    assert [(a["name"], a["comment"]) for a in seen["approvals"]] == [(oidc.user("bob")["name"], "go")]
    cert = client.post(f"/api/requests/{rid}/certificate", headers=auth("alice"), json={"public_key": pub()})
    assert cert.status_code == 201, cert.text
    assert cert.json()["principals"] == ["alice"]
    assert cert.json()["valid_before"] - cert.json()["valid_after"] == 1800 + 60  # bound to the TTL asked for
    again = client.post(f"/api/requests/{rid}/certificate", headers=auth("alice"), json={"public_key": pub()})
    assert again.status_code == 409
    not_hers = client.post(f"/api/requests/{rid}/certificate", headers=auth("bob"), json={"public_key": pub()})
    assert not_hers.status_code in (403, 409)


def test_nobody_approves_their_own_request_and_only_approvers_approve(client, gated, auth):
    bobs = ask(client, auth, "bob", "gated")  # bob is an approver, but not for himself
    r = client.post(f"/api/requests/{bobs['id']}/approve", headers=auth("bob"), json={})
    assert r.status_code == 403 and "own request" in r.json()["message"]
    alices = ask(client, auth, "alice", "gated")
    assert client.post(f"/api/requests/{alices['id']}/approve", headers=auth("alice"), json={}).status_code == 403
    carol = client.post(f"/api/requests/{alices['id']}/approve", headers=auth("carol"), json={})
    assert carol.status_code == 403  # tenant admin, but not an approver of this policy
    erin = client.post(f"/api/requests/{alices['id']}/approve", headers=auth("erin"), json={})
    assert erin.status_code == 404  # another tenant does not even see it
    assert client.get(f"/api/requests/{alices['id']}", headers=auth("alice")).json()["status"] == "pending"


def test_deny_ends_the_request(client, gated, auth, pub):
    req = ask(client, auth, "alice", "gated")
    r = client.post(f"/api/requests/{req['id']}/deny", headers=auth("dave"), json={"comment": "not now"})
    assert r.status_code == 200 and r.json()["status"] == "denied" and r.json()["comment"] == "not now"
    lost = client.post(f"/api/requests/{req['id']}/approve", headers=auth("bob"), json={})
    assert lost.status_code == 409 and "already denied by dave@contoso.test" in lost.json()["message"]
    again = client.post(f"/api/requests/{req['id']}/deny", headers=auth("dave"), json={"comment": "not now"})
    assert again.status_code == 200 and again.json() == r.json()  # dave's retry: his recorded decision
    other = client.post(f"/api/requests/{req['id']}/deny", headers=auth("bob"), json={})
    assert other.status_code == 409 and "already denied by dave@contoso.test" in other.json()["message"]
    assert client.post(f"/api/requests/{req['id']}/certificate", headers=auth("alice"),
                       json={"public_key": pub()}).status_code == 409


def test_requester_cancels(client, gated, auth):
    req = ask(client, auth, "alice", "gated")
    assert client.post(f"/api/requests/{req['id']}/cancel", headers=auth("bob"), json={}).status_code == 403
    r = client.post(f"/api/requests/{req['id']}/cancel", headers=auth("alice"), json={})
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    again = client.post(f"/api/requests/{req['id']}/cancel", headers=auth("alice"), json={})
    assert again.status_code == 200 and again.json() == r.json()


def test_two_of_m_needs_two_different_approvers(client, gated, auth):
    req = ask(client, auth, "alice", "gated-two")
    rid = req["id"]
    first = client.post(f"/api/requests/{rid}/approve", headers=auth("bob"), json={})
    assert first.status_code == 200 and first.json()["status"] == "pending"
    # bob again (a retry, say after a lost answer): his approval is on record once; the answer is the record
    twice = client.post(f"/api/requests/{rid}/approve", headers=auth("bob"), json={})
    assert twice.status_code == 200 and twice.json() == first.json()
    second = client.post(f"/api/requests/{rid}/approve", headers=auth("dave"), json={})
    assert second.status_code == 200 and second.json()["status"] == "approved"
    assert [a["upn"] for a in second.json()["approvals"]] == ["bob@contoso.test", "dave@contoso.test"]


def test_expiry_by_the_sweep_and_on_every_read(client, gated, context, oidc, auth):
    req = ask(client, auth, "alice", "gated")
    s = context.service
    later = Service(s.store, s.keys, s.base.config, clock=lambda: time.time() + 601)
    assert later.requests.get(identity_of(oidc, "alice"), req["id"]).effective_state(int(later.clock())) == "expired"
    assert req["id"] in later.requests.expire(oidc.tenant_id("contoso"))
    shown = client.get(f"/api/requests/{req['id']}", headers=auth("alice")).json()
    assert shown["status"] == "expired"
    assert client.post(f"/api/requests/{req['id']}/approve", headers=auth("bob"), json={}).status_code == 409
    actions = [e.action for e in s.store.list_audit(oidc.tenant_id("contoso"), request_id=req["id"])]
    assert [a for a in actions if a in ("request.created", "request.expired", "request.approved")] == \
        ["request.created", "request.expired"]
    assert "request.approve.refused" in actions


def test_approve_and_deny_racing_yield_exactly_one_outcome(context, oidc, gated):
    s = context.service
    alice, bob, dave = (identity_of(oidc, u) for u in ("alice", "bob", "dave"))
    outcomes = {"approved": 0, "denied": 0}
    for _ in range(25):
        rec = s.issuance.request_access(alice, AccessRequest(host="gated-1", principal="alice", policy_id="gated"), None).request
        barrier = threading.Barrier(2)
        results: dict[str, object] = {}

        def act(name: str, fn) -> None:  # type: ignore[no-untyped-def]
            barrier.wait()
            try:
                results[name] = fn().state
            except (Conflict, Forbidden) as exc:
                results[name] = exc

        ts = [threading.Thread(target=act, args=("approve", lambda: s.requests.approve(bob, rec.id))),
              threading.Thread(target=act, args=("deny", lambda: s.requests.deny(dave, rec.id)))]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        wins = [k for k, v in results.items() if isinstance(v, str)]
        assert len(wins) == 1, results
        assert isinstance(results["deny" if wins[0] == "approve" else "approve"], Conflict)
        final = s.store.get_request(alice.tid, rec.id)
        assert final.state == ("approved" if wins[0] == "approve" else "denied")
        decisions = [e for e in s.store.list_audit(alice.tid, request_id=rec.id) if e.action in
                     ("request.approved", "request.denied")]
        assert len(decisions) == 1
        outcomes[final.state] += 1
    assert sum(outcomes.values()) == 25


def test_two_approvals_racing_past_n_count_once_each(context, oidc, gated):
    s = context.service
    alice, bob, dave = (identity_of(oidc, u) for u in ("alice", "bob", "dave"))
    for _ in range(15):
        rec = s.issuance.request_access(alice, AccessRequest(host="gated-1", principal="alice", policy_id="gated"), None).request
        barrier = threading.Barrier(2)
        wins: list[str] = []
        losses: list[Exception] = []

        def approve(who) -> None:  # type: ignore[no-untyped-def]
            barrier.wait()
            try:
                s.requests.approve(who, rec.id)
                wins.append(who.upn)
            except Conflict as exc:
                losses.append(exc)

        ts = [threading.Thread(target=approve, args=(w,)) for w in (bob, dave)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        final = s.store.get_request(alice.tid, rec.id)
        assert len(wins) == 1 and len(losses) == 1
        assert final.state == "approved" and [a.upn for a in final.approvals] == wins


def test_a_failing_webhook_is_retried_recorded_and_never_blocks(client, gated, receiver, context, oidc, auth):
    receiver.fail_marker, receiver.fail_first = "flaky hook", 2
    req = ask(client, auth, "alice", "gated", reason="flaky hook")
    receiver.wait_for(req["id"])  # delivered on the third attempt
    tid = oidc.tenant_id("contoso")
    deadline = time.time() + 10
    sent = []
    while time.time() < deadline and not sent:
        sent = [e for e in context.service.store.list_audit(tid, request_id=req["id"]) if e.action == "notification.sent"]
        time.sleep(0.1)
    assert sent and sent[0].details["attempts"] == 3


def test_an_unreachable_webhook_is_recorded_as_failed(client, context, oidc, auth):
    from devstack.stack import ensure_policy

    dead = f"http://127.0.0.1:{free_port()}/nobody-listens"
    ensure_policy(context.service, identity_of(oidc, "carol"), gated_doc(oidc, "gated-dead", 1, dead))
    req = ask(client, auth, "alice", "gated-dead")
    # the request exists and can be decided while delivery fails in the background
    assert client.post(f"/api/requests/{req['id']}/approve", headers=auth("bob"), json={}).status_code == 200
    tid = oidc.tenant_id("contoso")
    deadline = time.time() + 20
    failed = []
    while time.time() < deadline and not failed:
        failed = [e for e in context.service.store.list_audit(tid, request_id=req["id"])
                  if e.action == "notification.failed"]
        time.sleep(0.2)
    assert failed and failed[0].outcome == "error" and failed[0].details["attempts"] == 4


def test_the_pending_list_comes_in_pages(client, oidc, context, auth):
    from devstack.stack import ensure_policy

    ensure_policy(context.service, identity_of(oidc, "carol"), {**gated_doc(oidc, "gated-pages"), "hosts": ["pages-*"]})
    made = [ask(client, auth, "dave", "gated-pages", host=f"pages-{i}")["id"] for i in range(3)]
    seen, token, pages = [], None, 0
    while True:
        params = {"state": "pending", "role": "approver", "limit": 1} | ({"continuation": token} if token else {})
        r = client.get("/api/requests", params=params, headers=auth("bob"))
        assert r.status_code == 200, r.text
        body = r.json()
        assert len(body["requests"]) <= 1 and "next" in body
        seen += [x["id"] for x in body["requests"]]
        pages += 1
        token = body["next"]
        if token is None:
            break
    assert len(seen) == len(set(seen)) and pages >= 3
    assert [rid for rid in seen if rid in made] == made[::-1]  # newest first
    assert set(seen) == {x["id"] for x in client.get("/api/requests", params={"state": "pending", "role": "approver"},
                                                     headers=auth("bob")).json()["requests"]}


@pytest.mark.parametrize("params", [{"limit": 0}, {"limit": 1001}, {"limit": "ten"}, {"continuation": "bm9wZQ"},
                                    {"role": "approver", "state": "issued"}, {"state": "lost"}])
def test_bad_list_parameters_are_400(client, auth, params):
    r = client.get("/api/requests", params=params, headers=auth("bob"))
    assert r.status_code == 400, r.text
    assert r.json()["error"] in ("invalid_request", "bad_request") and "Traceback" not in r.text
