"""Users in too many groups for their token (groups overage): the API resolves their groups through
Microsoft Graph (an HTTPS stand-in, tests/standins/graph.py) so group rules still apply, caches the
answer, and answers 503, never a decision, when Graph can't say."""

from __future__ import annotations

import json
import uuid

import jwt
import pytest

from functions.core.errors import BackendUnavailable
from functions.core.evaluation import AccessRequest, choose_policy
from functions.graph import GraphGroups
from functions.identity import TokenValidator
from functions.settings import load_settings
from tests.standins.graph import GraphStandIn
from tests.standins.keyvault import StaticTokenCredential


@pytest.fixture(scope="module")
def graph():
    g = GraphStandIn().start()
    yield g
    g.stop()


def overage_token(state_dir, good_token: str) -> str:
    """alice's real claims with `groups` replaced by the overage markers Entra ID sends past 200
    groups, signed with the identity provider's own key."""
    claims = jwt.decode(good_token, options={"verify_signature": False})
    claims.pop("groups", None)
    claims["_claim_names"] = {"groups": "src1"}
    claims["_claim_sources"] = {"src1": {"endpoint": f"https://graph.windows.net/{claims['tid']}/users/"
                                                     f"{claims['oid']}/getMemberObjects"}}
    jwk = next(k for k in json.loads((state_dir / "oidc" / "jwks.json").read_text())["keys"] if k["kty"] == "RSA")
    key = jwt.algorithms.RSAAlgorithm.from_jwk(json.dumps(jwk))
    return jwt.encode(claims, key, algorithm="RS256", headers={"kid": jwk["kid"]})


def resolver(graph: GraphStandIn) -> GraphGroups:
    return GraphGroups(graph.url, StaticTokenCredential(graph.token), verify=graph.ca_path)


def test_group_rules_apply_to_a_user_in_too_many_groups(graph, api_env, state_dir, token_for, oidc, demo_policy):
    alice = oidc.user("alice")
    users_group = oidc.group_id("contoso", "ezssh-users")
    graph.members[alice["oid"]] = [str(uuid.uuid4()) for _ in range(249)] + [users_group]
    groups = resolver(graph)
    v = TokenValidator(load_settings(api_env), groups=groups)
    token = overage_token(state_dir, token_for("alice"))
    who = v.validate(f"Bearer {token}")
    assert len(who.groups) == 250 and users_group in who.groups
    assert groups.calls == 3  # three pages of 100
    decision = choose_policy(who, AccessRequest(host="127.0.0.1", principal="alice"), [demo_policy])
    assert decision.action == "auto" and decision.policy.id == "demo"
    v.validate(f"Bearer {token}")
    assert groups.calls == 3  # cached per user


def test_when_graph_cannot_answer_the_caller_gets_503_not_a_decision(graph, api_env, state_dir, token_for, oidc):
    graph.members[oidc.user("alice")["oid"]] = [oidc.group_id("contoso", "ezssh-users")]
    token = overage_token(state_dir, token_for("alice"))
    graph.fail_next_with(403)
    with pytest.raises(BackendUnavailable, match="GroupMember.Read.All"):
        TokenValidator(load_settings(api_env), groups=resolver(graph)).validate(f"Bearer {token}")
    with pytest.raises(BackendUnavailable, match="too many groups"):
        TokenValidator(load_settings(api_env)).validate(f"Bearer {token}")
    down = GraphGroups("https://127.0.0.1:1", StaticTokenCredential("x"), verify=graph.ca_path, timeout=2)
    with pytest.raises(BackendUnavailable):
        TokenValidator(load_settings(api_env), groups=down).validate(f"Bearer {token}")
