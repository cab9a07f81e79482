"""App-only tokens at the API, from the dev identity provider through azure-identity: a workload is
known by its service principal's object id, gets only the logins mapped to that id, never
{username} or a `members` login, is never an approver or an admin, and needs the EZSSH.Workload
app role. The key id and the audit name it as an app."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.serialization import load_ssh_public_identity

from devstack.stack import ensure_policy, identity_of

KINDS = ("deploy-pipeline", "config-mgmt", "web1-identity")  # federated, certificate, managed identity


@pytest.fixture(scope="module")
def wl_policy(context, oidc):
    group = oidc.group_id("contoso", "ezssh-users")
    oid = {name: oidc.app(name)["oid"] for name in (*KINDS, "reporting-job")}
    return ensure_policy(context.service, identity_of(oidc, "carol"), {
        "id": "wl-apps",
        "rules": [{"users": [oid[k] for k in KINDS], "action": "auto"},
                  {"users": [oid["reporting-job"]], "action": "approval"},
                  {"groups": [group], "action": "auto"}],
        "hosts": ["wl-*"],
        "principals": ["shared"],
        "logins": [*({"oid": oid[k], "logins": ["deploy"], "display": k} for k in KINDS),
                   {"oid": oid["reporting-job"], "logins": ["report"]},
                   {"group": group, "logins": ["{username}"]}],
        "approvers": {"users": [oid["deploy-pipeline"], oidc.user("bob")["oid"]]},
        "admins": {"users": [oid["deploy-pipeline"]]},
    })


def ask(client, headers, principal: str, pub, host: str = "wl-web1"):
    return client.post("/api/requests", headers=headers, json={"host": host, "principal": principal, "public_key": pub()})


def test_the_service_knows_a_workload_by_its_object_id_and_never_as_a_person(context, oidc, app_token):
    for name in (*KINDS, "reporting-job"):
        app = oidc.app(name)
        who = context.validator.validate(f"Bearer {app_token(name)}")
        assert (who.oid, who.tid, who.upn) == (app["oid"], app["tid"], f"app:{app['client_id']}"), name
        assert who.app and who.username is None and not who.is_tenant_admin and not who.guest, name


@pytest.mark.parametrize("name", KINDS)
def test_each_kind_of_workload_gets_a_certificate_for_the_login_mapped_to_it(client, app_auth, oidc, wl_policy,
                                                                            pub, context, name):
    r = ask(client, app_auth(name), "deploy", pub)
    assert r.status_code == 201, r.text
    body = r.json()
    cert = load_ssh_public_identity(body["certificate"].encode())
    client_id = oidc.app(name)["client_id"]
    assert cert.valid_principals == [b"deploy"]
    assert cert.key_id.decode() == body["key_id"] and body["key_id"].endswith(f"/app:{client_id}")
    entries = context.service.store.list_audit(oidc.app(name)["tid"], request_id=body["id"])
    assert {e.action for e in entries} >= {"request.created", "certificate.issued"}
    assert {e.actor_oid for e in entries} == {oidc.app(name)["oid"]}
    assert {e.actor_upn for e in entries} == {f"app:{client_id}"}


def test_a_workload_gets_no_members_login_and_no_username(client, app_auth, wl_policy, pub, auth):
    for login in ("shared", "deploy-pipeline", "app"):
        r = ask(client, app_auth("deploy-pipeline"), login, pub)
        assert r.status_code == 403 and r.json()["error"] == "principal_not_allowed", (login, r.text)
    # a person admitted by the same policy does get the members' login (the mapping itself works)
    assert ask(client, auth("alice"), "shared", pub).status_code == 201


def test_a_workload_is_refused_as_an_approver_and_as_an_admin(client, app_auth, auth, wl_policy, pub):
    r = ask(client, app_auth("reporting-job"), "report", pub)
    assert r.status_code == 202, r.text
    rid = r.json()["id"]
    # deploy-pipeline is named among the approvers and admins: as a workload it is neither
    r = client.post(f"/api/requests/{rid}/approve", headers=app_auth("deploy-pipeline"), json={})
    assert r.status_code in (403, 404), r.text
    r = client.get("/api/requests?state=pending&role=approver", headers=app_auth("deploy-pipeline"))
    assert rid not in r.text
    r = client.patch("/api/policies/wl-apps", headers={**app_auth("deploy-pipeline"), "If-Match": wl_policy.etag or "*"},
                     json={"default_ttl": 600})
    assert r.status_code in (403, 404), r.text
    # a person approves the workload's request, and the workload fetches its certificate
    r = client.post(f"/api/requests/{rid}/approve", headers=auth("bob"), json={"comment": "nightly report"})
    assert r.status_code == 200 and r.json()["status"] == "approved", r.text
    r = client.post(f"/api/requests/{rid}/certificate", headers=app_auth("reporting-job"), json={"public_key": pub()})
    assert r.status_code in (200, 201), r.text
    assert load_ssh_public_identity(r.json()["certificate"].encode()).valid_principals == [b"report"]


def test_an_app_without_the_workload_role_is_refused(client, app_auth, wl_policy, pub):
    r = ask(client, app_auth("no-role-app"), "deploy", pub)
    assert r.status_code == 403 and "EZSSH.Workload" in r.json()["message"], r.text
    assert client.get("/api/policies", headers=app_auth("no-role-app")).status_code == 403


def test_a_workload_of_another_tenant_sees_nothing_of_this_one(client, app_auth, wl_policy, pub):
    r = ask(client, app_auth("fabrikam-job"), "deploy", pub)
    assert r.status_code == 403 and r.json()["error"] == "no_policy_for_host", r.text
    r = client.get("/api/policies/wl-apps", headers=app_auth("fabrikam-job"))
    assert r.status_code == 404
