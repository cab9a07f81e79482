"""Who may log in as whom, tried as an attacker would, with real tokens from the dev IdP: guests,
a second (unverified) domain, the same local part in another tenant, a UPN naming a cloud-image
account. No token, however its names are set, yields a login the policy did not map to its object id."""

from __future__ import annotations

import pytest

from devstack.stack import ensure_policy, identity_of

HOSTS = "idm-*"


def contoso_users_group(oidc) -> str:
    return oidc.group_id("contoso", "ezssh-users")


@pytest.fixture(scope="module")
def policies(context, oidc):
    carol = identity_of(oidc, "carol")
    group = contoso_users_group(oidc)
    members = ensure_policy(context.service, carol, {
        "id": "idn-members",
        "rules": [{"groups": [group], "action": "auto"}],
        "hosts": [HOSTS],
        "logins": [{"group": group, "logins": ["{username}"]},
                   {"oid": oidc.user("alice")["oid"], "logins": ["deploy"], "display": "alice@contoso.test"}],
    })
    guests = ensure_policy(context.service, carol, {
        "id": "idn-guests",
        "rules": [{"users": [oidc.user("guest-bob")["oid"]], "guests": True, "action": "auto"}],
        "hosts": ["idg-*"],
        "principals": ["{username}"],
        "logins": [{"oid": oidc.user("guest-bob")["oid"], "logins": ["contractor"]}],
    })
    return {"members": members, "guests": guests}


def ask(client, auth, user: str, principal: str, pub, host: str = "idm-web1") -> dict:
    r = client.post("/api/requests", headers=auth(user), json={"host": host, "principal": principal,
                                                                "public_key": pub()})
    body = r.json()
    body["_status"] = r.status_code
    return body


def test_the_tokens_say_who_is_a_guest_and_whose_domain_is_verified(context, token_for):
    def who(user):  # the service's own view of a real token
        return context.validator.validate(f"Bearer {token_for(user)}")

    bob = who("bob")
    assert (bob.guest, bob.domain_verified, bob.username) == (False, True, "bob")
    sub = who("bob-sub")
    assert (sub.guest, sub.domain_verified, sub.username, sub.upn_domain) == (False, False, None, "subsidiary.test")
    for guest in ("guest-bob", "guest-ext", "guest-idp"):
        g = who(guest)
        assert g.guest and g.username is None, guest
    assert who("guest-idp").upn == "bobby@contoso.test"  # a verified domain, and still a guest (idp)
    fab = who("bob-fab")
    assert fab.upn == "Bob@Contoso.test" and fab.tid != bob.tid and fab.username is None
    assert who("bob-fabrikam").username == "bob"  # fabrikam.test is verified for fabrikam only
    assert who("azureuser").username is None  # a verified domain, but a reserved account


def test_a_member_of_the_verified_domain_gets_their_own_login_only(client, auth, pub, policies):
    ok = ask(client, auth, "bob", "bob", pub)
    assert ok["_status"] == 201 and ok["principals"] == ["bob"]
    # alice's extra login is mapped to alice's object id, not to her name or group
    assert ask(client, auth, "alice", "deploy", pub)["principals"] == ["deploy"]
    no = ask(client, auth, "bob", "deploy", pub)
    assert no["_status"] == 403 and no["error"] == "principal_not_allowed"


@pytest.mark.parametrize("user,login", [
    ("bob-sub", "bob"),  # bob@subsidiary.test: same local part, a domain the tenant did not verify
    ("bob-sub", "deploy"),
    ("guest-bob", "bob"),  # acct=1
    ("guest-ext", "bob_gmail.test#ext#"),  # #EXT# UPN
    ("guest-ext", "bob"),
    ("guest-idp", "bobby"),  # idp names another tenant
    ("azureuser", "azureuser"),  # {username} never yields a cloud-image account
    ("bob-fab", "bob"),  # Bob@Contoso.test of another tenant
    ("bob-fabrikam", "bob"),  # bob@fabrikam.test: its own tenant's policies only
])
def test_no_token_yields_an_unmapped_login(client, auth, pub, policies, user, login):
    r = ask(client, auth, user, login, pub)
    assert r["_status"] in (400, 403), r
    assert "certificate" not in r
    assert r["error"] in ("denied", "principal_not_allowed", "no_policy_for_host", "invalid_request")


def test_guests_are_refused_with_a_reason_unless_a_rule_admits_them(client, auth, pub, policies):
    r = ask(client, auth, "guest-bob", "bob", pub)
    assert r["_status"] == 403 and "guest" in r["message"]
    # a policy that admits this guest by object id: only the login mapped to that object id
    ok = ask(client, auth, "guest-bob", "contractor", pub, host="idg-1")
    assert ok["_status"] == 201 and ok["principals"] == ["contractor"]
    no = ask(client, auth, "guest-bob", "bob", pub, host="idg-1")
    assert no["_status"] == 403 and no["error"] == "principal_not_allowed" and "allowed: contractor" in no["message"]
    # other guests are not admitted by that rule
    assert ask(client, auth, "guest-ext", "contractor", pub, host="idg-1")["_status"] == 403


def test_approvers_and_admins_are_matched_by_object_id_not_by_name(client, auth, context, oidc, policies):
    carol = identity_of(oidc, "carol")
    ensure_policy(context.service, carol, {
        "id": "idn-gated",
        "rules": [{"groups": [contoso_users_group(oidc)], "action": "approval"}],
        "hosts": ["idq-*"],
        "principals": ["{username}"],
        "approvers": {"users": [oidc.user("bob")["oid"]]},
        "admins": {"users": [oidc.user("bob")["oid"]]},
    })
    r = client.post("/api/requests", headers=auth("alice"), json={"host": "idq-1", "principal": "alice"})
    assert r.status_code == 202, r.text
    rid = r.json()["id"]
    for impostor in ("bob-sub", "bob-fab", "guest-bob"):  # "bob" by name, another object id
        d = client.post(f"/api/requests/{rid}/approve", headers=auth(impostor), json={})
        assert d.status_code in (403, 404), (impostor, d.text)
        p = client.get("/api/policies/idn-gated", headers=auth(impostor))
        assert p.status_code == 404 or not p.json()["you"]["admin"]
    assert client.post(f"/api/requests/{rid}/approve", headers=auth("bob"), json={}).json()["status"] == "approved"


def test_a_stored_policy_naming_people_by_upn_is_refused_until_fixed(client, auth, context, oidc, pub):
    """A row written before names were refused (as an older version stored it)."""
    import json

    from functions.core.policydoc import policy_from_row

    carol = identity_of(oidc, "carol")
    p = ensure_policy(context.service, carol, {"id": "idn-legacy", "rules": [{"users": ["*"], "action": "auto"}],
                                              "hosts": ["idl-*"], "principals": ["{username}"]})
    row = p.to_dict()
    row["rules"] = [{"users": ["alice@contoso.test"], "groups": [], "action": "auto"}]
    row["admins"] = {"users": ["Bob@Contoso.test"], "groups": []}
    table = context.service.store._table  # the stored row, rewritten as an older version wrote it
    entity = table.get_entity(p.tenant_id, "pol|idn-legacy")
    entity["Doc"] = json.dumps(row)
    table.update_entity(entity)
    context.service.base.policies.changed(p.tenant_id)
    assert policy_from_row(row).unresolved_names() == ("alice@contoso.test", "Bob@Contoso.test")

    r = ask(client, auth, "alice", "alice", pub, host="idl-1")
    assert r["_status"] == 403 and r["error"] == "policy_needs_update"
    assert "alice@contoso.test" in r["message"] and "object id" in r["message"]
    # bob is never its admin by name; carol (tenant admin) is told what to change on the next edit
    assert not client.get("/api/policies/idn-legacy", headers=auth("carol")).json()["you"]["member"]
    got = client.get("/api/policies/idn-legacy", headers=auth("carol"))
    edit = client.patch("/api/policies/idn-legacy", headers={**auth("carol"), "If-Match": got.headers["etag"]},
                        json={"name": "renamed"})
    assert edit.status_code == 400 and "by UPN" in edit.json()["message"]
    fixed = client.patch("/api/policies/idn-legacy", headers={**auth("carol"), "If-Match": got.headers["etag"]},
                         json={"rules": [{"users": [oidc.user("alice")["oid"]], "action": "auto"}],
                               "admins": {"users": [oidc.user("bob")["oid"]]}})
    assert fixed.status_code == 200, fixed.text
    assert ask(client, auth, "alice", "alice", pub, host="idl-1")["_status"] == 201


@pytest.mark.parametrize("user,login,why", [
    ("bob-sub", "bob", "'subsidiary.test' is not one of your tenant's verified domains"),
    ("azureuser", "azureuser", "'azureuser' (your UPN's local part) is a reserved system account"),
])
def test_a_refused_login_says_why_username_stood_for_nothing_and_names_the_policy(client, auth, pub, policies,
                                                                                   user, login, why):
    r = ask(client, auth, user, login, pub)
    assert r["_status"] == 403 and r["error"] == "principal_not_allowed", r
    assert r["message"].startswith("Policy 'idn-members' does not allow you the login"), r["message"]
    assert "{username}, which stands for no login here" in r["message"] and why in r["message"], r["message"]


def test_a_guest_refused_a_login_is_told_guests_never_get_username(client, auth, pub, policies):
    no = ask(client, auth, "guest-bob", "bob", pub, host="idg-1")
    assert no["_status"] == 403 and no["error"] == "principal_not_allowed"
    assert "Policy 'idn-guests'" in no["message"] and "guest accounts never get {username}" in no["message"], no
