"""The cache of verified tokens: a token the real identity provider signed is checked once, then
served from the cache until its own `exp` and never after; a changed token is never a hit; the
cache is bounded; tokens whose groups come from Graph (overage) are not cached."""

from __future__ import annotations

import jwt
import pytest

from functions.core.errors import Unauthenticated
from functions.core.policy import Identity
from functions.identity import TokenValidator, ValidatedTokens, _cacheable_exp
from functions.settings import load_settings


def claims_of(token: str) -> dict:
    return jwt.decode(token, options={"verify_signature": False})


def test_a_verified_token_is_served_from_the_cache_until_its_exp(api_env, token_for):
    token = token_for("alice")
    v = TokenValidator(load_settings(api_env))
    first = v.validate(f"Bearer {token}")
    assert first.upn == "alice@contoso.test" and first.oid == claims_of(token)["oid"]
    assert len(v.tokens) == 1
    assert v.validate(f"Bearer {token}") is first  # the same object: not verified again
    assert v.validate(f"bearer  {token} ") is first  # the same token, however the header spells it


def test_a_changed_token_is_never_a_cache_hit(api_env, token_for):
    token = token_for("alice")
    v = TokenValidator(load_settings(api_env))
    v.validate(f"Bearer {token}")
    head, payload, sig = token.split(".")
    forged_sig = head + "." + payload + "." + ("A" if sig[0] != "A" else "B") + sig[1:]
    with pytest.raises(Unauthenticated):
        v.validate(f"Bearer {forged_sig}")
    other = claims_of(token) | {"oid": "00000000-0000-0000-0000-000000000bad"}
    forged_claims = head + "." + jwt.utils.base64url_encode(jwt.api_jws.json.dumps(other).encode()).decode() + "." + sig
    with pytest.raises(Unauthenticated):
        v.validate(f"Bearer {forged_claims}")
    assert len(v.tokens) == 1


def test_a_token_past_its_exp_is_not_cached_even_within_the_leeway(api_env, token_for):
    token = token_for("alice")
    exp = claims_of(token)["exp"]
    v = TokenValidator(load_settings(api_env))
    v.tokens = ValidatedTokens(clock=lambda: exp)  # the verification itself still runs on real time
    assert v.validate(f"Bearer {token}").upn == "alice@contoso.test"
    assert len(v.tokens) == 0


def test_entries_die_at_exp_and_the_cache_is_bounded():
    now = [1000.0]
    cache = ValidatedTokens(size=2, clock=lambda: now[0])
    ids = {n: Identity(oid=n, tid="t", upn=f"{n}@x") for n in "abc"}
    cache.put("token-a", 1100, ids["a"])
    assert cache.get("token-a") is ids["a"]
    assert cache.get("token-a2") is None
    now[0] = 1099.999
    assert cache.get("token-a") is ids["a"]
    now[0] = 1100
    assert cache.get("token-a") is None and len(cache) == 0
    cache.put("token-late", 1100, ids["a"])  # already expired: not stored
    assert len(cache) == 0

    now[0] = 0
    cache.put("token-a", 50, ids["a"])
    cache.put("token-b", 50, ids["b"])
    assert cache.get("token-a") is ids["a"]  # a is now the most recently used
    cache.put("token-c", 50, ids["c"])
    assert len(cache) == 2
    assert cache.get("token-b") is None  # the least recently used went
    assert cache.get("token-a") is ids["a"] and cache.get("token-c") is ids["c"]


def test_tokens_with_groups_from_graph_are_not_cached():
    plain = jwt.encode({"exp": 2_000_000_000, "oid": "x"}, "k" * 32, algorithm="HS256")
    overage = jwt.encode({"exp": 2_000_000_000, "oid": "x", "_claim_names": {"groups": "src1"},
                          "_claim_sources": {"src1": {"endpoint": "https://graph.microsoft.com/"}}},
                         "k" * 32, algorithm="HS256")
    no_exp = jwt.encode({"oid": "x"}, "k" * 32, algorithm="HS256")
    assert _cacheable_exp(plain) == 2_000_000_000
    assert _cacheable_exp(overage) is None
    assert _cacheable_exp(no_exp) is None
