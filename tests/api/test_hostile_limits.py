"""Limits and storage edges, against Azurite, SoftHSM and real tokens: pending requests per user per
policy, a per-user request rate, policies too large for Table Storage refused before any CA key is
made (HSM objects counted before and after), a failed save leaves no key behind, and hostile bodies
and queries get a 4xx, never a 5xx."""

from __future__ import annotations

import json
import os
import threading

import pytest

from devstack.stack import ensure_policy, identity_of
from functions.core.errors import TooManyPending, TooManyRequests
from functions.core.evaluation import AccessRequest
from functions.service import Service, ServiceConfig


def private_keys_in_hsm(api_env) -> int:
    """Private key objects on the SoftHSM token the service uses, counted through PKCS#11."""
    from pkcs11 import Attribute, ObjectClass
    from pkcs11.exceptions import UserAlreadyLoggedIn

    from functions.signing.pkcs11 import load_library

    lib = load_library(api_env["EZSSH_PKCS11_MODULE"])  # a process loads a PKCS#11 module once
    token = lib.get_token(token_label=api_env["EZSSH_PKCS11_TOKEN_LABEL"])
    try:
        session = token.open(user_pin=api_env["EZSSH_PKCS11_PIN"])
    except UserAlreadyLoggedIn:  # the in-process service's sessions logged this application in
        session = token.open()
    with session as s:
        return len(list(s.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY})))


def limited_service(context, **config) -> Service:
    """The service with production's defaults (the test stack raises them), on the same Azurite and
    SoftHSM as the API."""
    base = context.service.base
    cfg = ServiceConfig(signer_backend=base.config.signer_backend, **config)
    return Service(base.store, base.keys, cfg)


@pytest.fixture(scope="module")
def gated(context, oidc):
    return ensure_policy(context.service, identity_of(oidc, "carol"), {
        "id": "lim-gated",
        "rules": [{"groups": [oidc.group_id("contoso", "ezssh-users")], "action": "approval"}],
        "hosts": ["lim-*"],
        "principals": ["{username}"],
        "approvers": {"groups": [oidc.group_id("contoso", "ezssh-approvers")]},
    })


def test_pending_requests_per_user_per_policy_default_to_five(context, oidc, gated):
    svc = limited_service(context)
    assert svc.base.config.max_pending_requests == 5
    dave = identity_of(oidc, "dave")
    made = [svc.issuance.request_access(dave, AccessRequest(f"lim-{i}", "dave"), None) for i in range(5)]
    assert all(o.status == "pending" for o in made)
    with pytest.raises(TooManyPending) as info:
        svc.issuance.request_access(dave, AccessRequest("lim-6", "dave"), None)
    assert info.value.status == 429 and info.value.code == "too_many_pending" and "cancel" in info.value.message
    # refused on the record, and nothing was created
    pending = [r for r in svc.store.list_requests(dave.tid, "pending") if r.requester_is(dave)
               and r.policy_id == "lim-gated"]
    assert len(pending) == 5
    # another user is not affected; cancelling one makes room
    assert svc.issuance.request_access(identity_of(oidc, "alice"), AccessRequest("lim-1", "alice"), None).status \
        == "pending"
    svc.requests.cancel(dave, made[0].request.id)
    assert svc.issuance.request_access(dave, AccessRequest("lim-7", "dave"), None).status == "pending"


def test_a_user_has_a_request_rate(context, oidc, demo_policy):
    svc = limited_service(context, request_rate=10)
    bob = identity_of(oidc, "bob")
    for i in range(10):
        assert svc.issuance.request_access(bob, AccessRequest("127.0.0.1", "bob"), None).status == "approved"
    with pytest.raises(TooManyRequests) as info:
        svc.issuance.request_access(bob, AccessRequest("127.0.0.1", "bob"), None)
    assert info.value.status == 429 and info.value.details["retry_after"] >= 1
    # per user: alice still asks
    assert svc.issuance.request_access(identity_of(oidc, "alice"), AccessRequest("127.0.0.1", "alice"),
                                       None).status == "approved"


def test_a_policy_storage_cannot_hold_is_refused_before_a_ca_key_is_made(client, auth, api_env, oidc):
    before = private_keys_in_hsm(api_env)
    doc = {"id": "lim-huge", "rules": [{"users": ["*"], "action": "auto"}], "principals": ["x"],
           "hosts": [f"h{i:05d}-" + "x" * 50 + ".example" for i in range(800)]}
    assert len(json.dumps(doc)) < 64 * 1024  # within the body limit: the storage check is what refuses it
    r = client.post("/api/policies", headers=auth("carol"), json=doc)
    assert r.status_code == 400 and r.json()["error"] == "invalid_request" and "Table Storage" in r.json()["message"]
    assert client.get("/api/policies/lim-huge", headers=auth("carol")).status_code == 404
    assert private_keys_in_hsm(api_env) == before


def test_a_lost_create_race_leaves_exactly_one_ca_key(context, oidc, api_env):
    carol = identity_of(oidc, "carol")
    doc = {"id": "lim-race", "rules": [{"users": ["*"], "action": "auto"}], "hosts": ["lim-race-*"],
           "principals": ["x"]}
    before = private_keys_in_hsm(api_env)
    results: list[object] = []
    start = threading.Barrier(3)

    def create() -> None:
        start.wait()
        try:
            results.append(context.service.policies.create(carol, doc))
        except Exception as exc:  # noqa: BLE001
            results.append(exc)

    threads = [threading.Thread(target=create) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    made = [r for r in results if not isinstance(r, Exception)]
    assert len(made) == 1, results
    assert all(getattr(r, "code", "") == "conflict" for r in results if isinstance(r, Exception))
    winner = made[0]
    kept = len(winner.ca) + len(getattr(winner, "host_ca", ()))  # its user CA (and host CA) keys
    assert private_keys_in_hsm(api_env) == before + kept  # the losers' keys were removed


@pytest.mark.parametrize("raw,needle", [
    (b"[" * 20_000, "nests deeper"),
    (b'{"host": "127.0.0.1", "principal": "alice", "ttl_seconds": 1e400}', "finite"),
    (b'{"host": "127.0.0.1", "principal": "alice", "ttl_seconds": NaN}', "finite"),
    (b'{"host": "127.0.0.1", "principal": "alice", "reason": "\\ud800"}', "lone surrogate"),
    (b'{"host": "web1\\n*Requester:* carol", "principal": "alice"}', "host"),
    (b'{"host": "WEB1", "principal": "alice", "reason": "a\\nb"}', "U+000A"),
    (b'{"host": "web1", "principal": "alice", "reason": "\\u202eevil"}', "U+202E"),
])
def test_hostile_request_bodies_are_refused_with_a_4xx(client, auth, raw, needle):
    r = client.post("/api/requests", headers={**auth("alice"), "content-type": "application/json"}, content=raw)
    assert r.status_code == 400, r.text
    assert r.json()["error"] == "invalid_request" and needle in r.json()["message"]


def test_deep_policy_documents_are_refused(client, auth):
    r = client.post("/api/policies", headers={**auth("carol"), "content-type": "application/json"},
                    content=b'{"id": "x", "rules": ' + b"[" * 5000 + b"]" * 5000 + b"}")
    assert r.status_code == 400 and "nests deeper" in r.json()["message"]


@pytest.mark.parametrize("path", ["/api/host-certificates", "/api/host-certificates/challenge"])
@pytest.mark.parametrize("raw,needle", [
    (b"[" * 20_000, "nests deeper"),
    (b'{"token": "x", "host_keys": [], "policy": "demo", "n": 1e400}', "finite"),
])
def test_hostile_bodies_from_hosts_are_refused_with_a_4xx(client, path, raw, needle):
    """Hosts prove themselves in the body (no bearer token): the same body rules apply."""
    r = client.post(path, headers={"content-type": "application/json"}, content=raw)
    assert r.status_code == 400, r.text
    assert r.json()["error"] == "invalid_request" and needle in r.json()["message"]


@pytest.mark.parametrize("query", ["since=inf", "since=nan", "until=-inf", "since=1e999", "since=x"])
def test_audit_queries_need_finite_numbers(client, auth, query):
    r = client.get(f"/api/audit?{query}", headers=auth("carol"))
    assert r.status_code == 400 and r.json()["error"] == "invalid_request"


def test_only_tenant_admins_set_webhooks(client, auth, oidc, context):
    carol = identity_of(oidc, "carol")
    ensure_policy(context.service, carol, {
        "id": "lim-delegated", "rules": [{"users": ["*"], "action": "auto"}], "hosts": ["lim-del-*"],
        "principals": ["x"], "admins": {"users": [oidc.user("dave")["oid"]]}})
    got = client.get("/api/policies/lim-delegated", headers=auth("dave"))
    assert got.json()["you"]["admin"]
    r = client.patch("/api/policies/lim-delegated", headers={**auth("dave"), "If-Match": got.headers["etag"]},
                     json={"webhook_url": "https://hooks.example.net/x"})
    assert r.status_code == 403 and "webhook" in r.json()["message"]
    ok = client.patch("/api/policies/lim-delegated", headers={**auth("dave"), "If-Match": got.headers["etag"]},
                      json={"name": "delegated"})
    assert ok.status_code == 200


def test_members_see_what_they_need_to_ask_and_no_secrets(client, auth, oidc, context):
    carol = identity_of(oidc, "carol")
    ensure_policy(context.service, carol, {
        "id": "lim-view", "rules": [{"groups": [oidc.group_id("contoso", "ezssh-users")], "action": "auto"}],
        "hosts": ["lim-view-*"], "principals": ["{username}"], "webhook_url": "https://hooks.example.net/secret",
        "admins": {"users": [oidc.user("dave")["oid"]]}})
    member = client.get("/api/policies/lim-view", headers=auth("alice")).json()
    text = json.dumps(member)
    assert "hooks.example.net" not in text and "key_ref" not in text and "backend" not in text
    assert oidc.user("dave")["oid"] not in text  # nobody else's object id
    assert member["hosts"] == ["lim-view-*"] and member["you"]["logins"] == ["alice"]
    assert member["ca"][0]["public_key"].startswith(("ecdsa-", "ssh-"))
    admin = client.get("/api/policies/lim-view", headers=auth("dave")).json()
    assert admin["webhook_url"] == "https://hooks.example.net/secret" and admin["ca"][0]["key_ref"]


def test_the_softhsm_module_is_the_one_the_api_uses(api_env):
    assert os.path.exists(api_env["EZSSH_PKCS11_MODULE"])
