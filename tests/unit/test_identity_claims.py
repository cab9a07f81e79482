"""functions.identity.is_guest and Identity.username: how a token's claims become guest and
{username} decisions (the real IdP's tokens for these cases are in tests/api/test_hostile_identity.py)."""

from __future__ import annotations

import pytest

from functions.core.policy import Identity, upn_domain, username_from_upn
from functions.identity import is_guest

TID = "1ff8d19a-512a-4382-b7c7-72836fd919c4"
ISS = f"https://login.microsoftonline.com/{TID}/v2.0"


@pytest.mark.parametrize("claims,guest", [
    ({"preferred_username": "bob@contoso.com"}, False),
    ({"preferred_username": "bob@contoso.com", "acct": 0}, False),
    ({"preferred_username": "bob@contoso.com", "acct": "0"}, False),
    ({"preferred_username": "bob@contoso.com", "acct": 1}, True),
    ({"preferred_username": "bob@contoso.com", "acct": "1"}, True),
    ({"preferred_username": "bob@gmail.com", "upn": "bob_gmail.com#EXT#@contoso.onmicrosoft.com"}, True),
    ({"preferred_username": "bob_gmail.com#ext#@contoso.onmicrosoft.com"}, True),
    ({"preferred_username": "bob@contoso.com", "idp": ISS}, False),
    ({"preferred_username": "bob@contoso.com", "idp": f"https://sts.windows.net/{TID}/"}, False),
    ({"preferred_username": "bob@contoso.com", "idp": "https://sts.windows.net/9188040d-6c67-4c5b-b112-36a304b66dad/"},
     True),  # a personal Microsoft account
    ({"preferred_username": "bob@contoso.com", "idp": "google.com"}, True),
    ({"preferred_username": "bob@contoso.com", "idp": 5}, True),
])
def test_guests(claims, guest):
    assert is_guest(claims, ISS, TID) is guest


@pytest.mark.parametrize("upn,login", [
    ("Alice@Contoso.com", "alice"), ("a.b-c_d@contoso.com", "a.b-c_d"), ("root@contoso.com", None),
    ("Ubuntu@contoso.com", None), ("systemd-x@contoso.com", None), ("_svc@contoso.com", None),
    ("machine$@contoso.com", None), ("9lives@contoso.com", None), ("a" * 33 + "@contoso.com", None),
    ("bob_gmail.com#EXT#@contoso.com", None), ("no-at-sign", None), ("@contoso.com", None),
    ("a@b@contoso.com", None),
])
def test_username_from_upn(upn, login):
    assert username_from_upn(upn) == login


def test_upn_domain():
    assert upn_domain("Bob@Contoso.COM.") == "contoso.com" and upn_domain("bob") == "" and upn_domain("@x.com") == ""


def test_username_needs_a_verified_domain_and_no_guest():
    who = Identity(oid="o", tid=TID, upn="bob@contoso.com")
    assert who.username is None
    assert Identity(oid="o", tid=TID, upn="bob@contoso.com", domain_verified=True).username == "bob"
    assert Identity(oid="o", tid=TID, upn="bob@contoso.com", domain_verified=True, guest=True).username is None
