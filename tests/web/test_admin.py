"""Admins on the web page: a stale policy edit is shown as a conflict and nothing is lost; people
who are not admins (a plain member, another tenant's member) see no admin data."""

from __future__ import annotations

import json

import httpx

from devstack.stack import ensure_policy, identity_of


def doc_of(page) -> dict:  # type: ignore[no-untyped-def]
    return json.loads(page.locator("#policy-doc").input_value())


def test_carol_edits_and_a_stale_tab_gets_the_conflict(api_server, oidc, context, demo_policy, token_for, signed_in):
    p = ensure_policy(context.service, identity_of(oidc, "carol"), {
        "id": "web-edit", "rules": [{"groups": [oidc.group_id("contoso", "ezssh-users")], "action": "auto"}],
        "hosts": ["edit*.contoso.test"], "principals": ["{username}"]})
    first = signed_in("carol", path=f"/app/policies/{p.id}")
    first.page.locator("#policy-doc").wait_for()
    assert first.page.locator("pre").inner_text() == f"ezssh policy host-setup {p.id} > setup.sh && sudo sh setup.sh"
    second = signed_in("carol", path=f"/app/policies/{p.id}", tab_of=first)
    second.page.locator("#policy-doc").wait_for()

    # tab 1 saves a new host list
    doc = doc_of(first.page)
    doc["hosts"] = ["edit*.contoso.test", "edit-new.contoso.test"]
    first.page.fill("#policy-doc", json.dumps(doc, indent=2))
    first.page.click(".editor button[type=submit]")
    first.page.locator(".editor .saved").wait_for()

    # tab 2 still holds the old version: its save is refused as a conflict and its text is kept
    stale = doc_of(second.page)
    stale["max_ttl"] = 7200
    mine = json.dumps(stale, indent=2)
    second.page.fill("#policy-doc", mine)
    second.page.click(".editor button[type=submit]")
    problem = second.page.locator("#policy-problem.conflict")
    problem.wait_for()
    assert "changed this policy after you opened it" in problem.inner_text()
    assert second.page.locator("#policy-doc").input_value() == mine  # nothing lost

    # the service kept tab 1's edit, not tab 2's
    r = httpx.get(f"{api_server}/api/policies/{p.id}", headers={"Authorization": f"Bearer {token_for('carol')}"})
    assert r.json()["hosts"] == doc["hosts"] and r.json()["max_ttl"] != 7200

    # a bad value is refused by the service, and its message names the field
    bad = doc_of(first.page)
    bad["max_ttl"] = -5
    first.page.fill("#policy-doc", json.dumps(bad))
    first.page.click(".editor button[type=submit]")
    invalid = first.page.locator("#policy-problem.invalid")
    invalid.wait_for()
    assert "max_ttl" in invalid.inner_text()
    assert all("/api/policies/web-edit" in e and "400" in e for e in first.errors), first.errors  # the refused save

    # CA rotation: a new current user CA key, the old one still trusted (listed as previous)
    keys = first.page.locator("ul.keys").first
    assert keys.locator("li").count() == 1
    first.page.click("text=Rotate user CA")
    first.page.locator(".admin .note").wait_for()
    first.page.wait_for_function("() => document.querySelector('ul.keys').children.length === 2")
    assert [t.split()[0] for t in keys.locator("li").all_inner_texts()] == ["current", "previous"]
    assert all("/api/policies/web-edit" in e and "412" in e for e in second.errors), second.errors


def test_members_and_other_tenants_see_no_admin_data(api_server, oidc, demo_policy, signed_in):
    for user in ("alice", "erin"):
        tab = signed_in(user, path="/app/policies/demo")
        page = tab.page
        page.locator("main h1").wait_for()
        page.wait_for_load_state("networkidle")
        assert page.locator("#policy-doc").count() == 0 and page.locator(".admin").count() == 0
        text = page.locator("main").inner_text()
        assert "key_ref" not in text and "host_token" not in text and "webhook" not in text
        if user == "erin":  # another tenant: contoso's policy does not exist for her
            assert "not found" in text.lower()

        page.goto(f"{api_server}/app/audit")
        page.locator("main h1").wait_for()
        page.wait_for_load_state("networkidle")
        assert page.locator("#audit-entries").count() == 0
        assert "Only tenant admins and policy admins read the audit log" in page.locator("main").inner_text()

        page.goto(f"{api_server}/app/hosts")
        page.locator("#not-admin").wait_for()

        page.goto(f"{api_server}/app/")
        page.locator("#none-pending").wait_for()  # nobody's requests wait for them

        page.click("text=Sign out")  # the tab forgets its tokens
        page.locator("button.tenant").first.wait_for()
        assert page.evaluate("() => sessionStorage.length") == 0


def test_an_issued_requests_page_and_revoking_it_from_hosts(api_server, oidc, demo_policy, token_for, signed_in):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    pub = Ed25519PrivateKey.generate().public_key().public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH).decode()
    r = httpx.post(f"{api_server}/api/requests", headers={"Authorization": f"Bearer {token_for('alice')}"},
                   json={"host": "127.0.0.1", "principal": "alice", "public_key": pub, "reason": "web revoke"},
                   timeout=20)
    assert r.status_code == 201, r.text
    issued = r.json()
    tab = signed_in("carol", path=f"/app/requests/{issued['id']}")
    page = tab.page
    page.locator("#cert-expiry").wait_for()
    facts = page.locator("dl.facts").inner_text()
    assert issued["key_id"] in facts and issued["serial"] in facts

    page.goto(f"{api_server}/app/hosts")
    form = page.locator("form.search")
    form.locator("select").select_option("demo")
    form.locator('input[name="serial"]').fill(issued["serial"])
    form.locator('input[name="reason"]').fill("laptop lost")
    form.locator("button[type=submit]").click()
    page.locator("p.ok").wait_for()
    assert issued["key_id"] in page.locator("p.ok").inner_text()

    page.goto(f"{api_server}/app/requests/{issued['id']}")
    page.locator("dd.error").wait_for()  # the page says it was revoked
    seen = httpx.get(f"{api_server}/api/requests/{issued['id']}",
                     headers={"Authorization": f"Bearer {token_for('alice')}"})
    assert seen.json()["revoked_at"] and seen.json()["valid_before"] == issued["valid_before"]
    assert not tab.errors, tab.errors


def test_my_access_shows_the_logins_ezssh_ls_would(api_server, oidc, demo_policy, token_for, signed_in):
    mine = httpx.get(f"{api_server}/api/policies/demo", headers={"Authorization": f"Bearer {token_for('alice')}"})
    logins = mine.json()["you"]["logins"]  # what the API answers `ezssh ls`
    tab = signed_in("alice", path="/app/access")
    card = tab.page.locator('article[data-policy="demo"]')
    card.wait_for()
    assert card.locator("dd").first.inner_text() == ", ".join(logins) and logins == ["alice"]
    assert "no approval needed" in card.inner_text()
    assert not tab.errors, tab.errors
