"""Token validation against a real identity provider whose signing key rotates: the API's JWKS cache
is refreshed when a token names a kid it has not seen, and a made-up kid is refused without letting
the caller make the API fetch keys again and again."""

from __future__ import annotations

import json
import time
from dataclasses import replace

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from devstack.oidc import sign_in, start_oidc
from devstack.proc import StandInError, free_port
from functions.core.errors import Unauthenticated
from functions.identity import TokenValidator
from functions.settings import load_settings
from tests.realparts import unavailable


@pytest.fixture
def rotating_idp(tmp_path):
    state, port = tmp_path / "idp", free_port()
    try:
        idp = start_oidc(state, port)
    except StandInError as exc:
        unavailable(str(exc))
    holder = {"idp": idp}

    def rotate() -> str:
        """Restart the provider with a new signing key first in its key set; returns the new kid."""
        holder["idp"].stop()
        path = state / "oidc" / "jwks.json"
        jwks = json.loads(path.read_text())
        key = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(rsa.generate_private_key(65537, 2048)))
        kid = f"rotated-{int(time.time())}"
        key.update(kid=kid, alg="RS256", use="sig")
        path.write_text(json.dumps({"keys": [key] + jwks["keys"]}))
        holder["idp"] = start_oidc(state, port)
        return kid

    yield holder, rotate
    holder["idp"].stop()


def validator_for(idp, api_env) -> TokenValidator:
    settings = load_settings({**api_env, "EZSSH_ISSUER_TEMPLATE": f"{idp.base_url}/{{tid}}",
                              "EZSSH_OIDC_CA_BUNDLE": str(idp.ca_path)})
    return TokenValidator(settings)


def test_a_rotated_signing_key_is_fetched_once_on_its_first_token(rotating_idp, api_env):
    holder, rotate = rotating_idp
    v = validator_for(holder["idp"], api_env)
    first = sign_in(holder["idp"], "alice")["access_token"]
    assert v.validate(f"Bearer {first}").upn == "alice@contoso.test"  # JWKS fetched and cached

    new_kid = rotate()
    second = sign_in(holder["idp"], "alice")["access_token"]
    assert jwt.get_unverified_header(second)["kid"] == new_kid
    assert v.validate(f"Bearer {second}").upn == "alice@contoso.test"  # unknown kid -> refreshed
    assert v.validate(f"Bearer {first}").upn == "alice@contoso.test"  # the old key is still published

    # A made-up kid right after a refresh is refused without another fetch (the refresh floor).
    holder["idp"].stop()  # if the validator tried to fetch now, it would fail with backend_unavailable
    claims = jwt.decode(second, options={"verify_signature": False})
    forged = jwt.encode(claims, rsa.generate_private_key(65537, 2048), algorithm="RS256",
                        headers={"kid": "made-up"})
    with pytest.raises(Unauthenticated, match="unknown key"):
        v.validate(f"Bearer {forged}")


def test_tokens_of_a_tenant_not_on_the_allow_list_are_refused_before_any_fetch(rotating_idp, api_env):
    holder, _ = rotating_idp
    settings = load_settings({**api_env, "EZSSH_ISSUER_TEMPLATE": f"{holder['idp'].base_url}/{{tid}}",
                              "EZSSH_OIDC_CA_BUNDLE": str(holder["idp"].ca_path)})
    contoso_only = TokenValidator(replace(settings, tenants=(holder["idp"].tenant_id("contoso"),)))
    mallory = sign_in(holder["idp"], "mallory")["access_token"]
    holder["idp"].stop()
    with pytest.raises(Unauthenticated, match="tenant"):
        contoso_only.validate(f"Bearer {mallory}")
