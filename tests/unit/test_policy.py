"""functions.core.policy: document validation, host matching, evaluation and policy choice."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest

from functions.core.certificate import KNOWN_EXTENSIONS
from functions.core.errors import Denied, InvalidRequest, NoPolicyForHost, PrincipalNotAllowed, TtlTooLong
from functions.core.policy import (
    TTL_CEILING,
    AccessRequest,
    CaKeyRef,
    Identity,
    Policy,
    Subjects,
    choose_policy,
    evaluate,
    make_grant,
    policy_from_document,
    policy_from_row,
    resolve_ttl,
    validate_host_pattern,
)

TID = "tenant-a"
OTHER_TID = "tenant-b"

ALICE = Identity(oid="oid-alice", tid=TID, upn="Alice@Contoso.example", groups=frozenset({"grp-ops"}))
BOB = Identity(oid="oid-bob", tid=TID, upn="bob@contoso.example", groups=frozenset({"grp-dev"}))
CAROL = Identity(oid="oid-carol", tid=TID, upn="carol@contoso.example")
MALLORY = Identity(oid="oid-alice", tid=OTHER_TID, upn="Alice@Contoso.example", groups=frozenset({"grp-ops"}))


def doc(**over) -> dict:
    d = {
        "id": "web",
        "rules": [{"users": ["*"], "action": "auto"}],
        "hosts": ["web*.contoso.example"],
        "principals": ["alice", "deploy"],
    }
    d.update(over)
    return d


def make(tenant_id: str = TID, **over) -> Policy:
    return policy_from_document(doc(**over), tenant_id=tenant_id)


def invalid(document, needle: str, **kw) -> InvalidRequest:
    kw.setdefault("tenant_id", TID)
    with pytest.raises(InvalidRequest) as info:
        policy_from_document(document, **kw)
    assert needle in info.value.message, info.value.message
    assert info.value.status == 400
    return info.value


# ---- a valid document ------------------------------------------------------------------------


def test_minimal_document_gets_the_documented_defaults():
    p = make()
    assert p.id == "web" and p.name == "web" and p.tenant_id == TID
    assert p.rules[0].subjects == Subjects(users=("*",)) and p.rules[0].action == "auto"
    assert p.principals == ("alice", "deploy")
    assert p.default_ttl == 3600 and p.max_ttl == 8 * 3600 and p.request_ttl == 3600
    assert p.extensions == ("permit-pty",)
    assert p.approvals_required == 1
    assert p.force_command is None and p.source_address == () and p.critical_options() == ()
    assert p.ca == () and p.deleted is False


def test_full_document_round_trips_through_storage():
    p = make(
        name="  Web servers ",
        rules=[{"users": ["oid-bob"], "action": "deny"}, {"groups": ["grp-ops"], "action": "approval"}],
        hosts=["web*", "10.0.0.0/8", "tag:env=prod", "/subscriptions/s1/resourceGroups/rg1"],
        approvers={"users": ["carol@contoso.example", "dave@contoso.example"]},
        approvals_required=2,
        admins={"groups": ["grp-admins"]},
        default_ttl=600,
        max_ttl=1200,
        request_ttl=7200,
        extensions=["permit-pty", "permit-agent-forwarding"],
        force_command="/bin/rbash",
        source_address=["10.0.0.0/8", "2001:db8::/32"],
        webhook_url="https://hooks.example/ezssh",
    )
    assert p.name == "Web servers"
    assert p.critical_options() == (("force-command", "/bin/rbash"), ("source-address", "10.0.0.0/8,2001:db8::/32"))
    row = p.to_dict()
    assert policy_from_row(row, etag="W/1") == p
    assert policy_from_row(row, etag="W/1").etag == "W/1"
    # and an admin may send the stored document back unchanged (minus server-managed fields)
    editable = {k: v for k, v in row.items() if k not in ("tenant_id", "ca", "host_ca", "deleted")}
    assert policy_from_document(editable, tenant_id=TID) == p


def test_ttl_defaults_follow_a_lowered_ceiling():
    p = policy_from_document(doc(), tenant_id=TID, ttl_ceiling=1800)
    assert p.max_ttl == 1800 and p.default_ttl == 1800
    p = policy_from_document(doc(max_ttl=600), tenant_id=TID)
    assert p.default_ttl == 600


def test_duplicate_extensions_are_collapsed():
    p = make(extensions=["permit-pty", "permit-port-forwarding", "permit-pty"])
    assert p.extensions == ("permit-pty", "permit-port-forwarding")


def test_empty_extension_list_is_kept_empty():
    assert make(extensions=[]).extensions == ()


# ---- refused documents ----------------------------------------------------------------------


@pytest.mark.parametrize("bad", [None, [], "web", 3])
def test_document_must_be_an_object(bad):
    invalid(bad, "JSON object")


@pytest.mark.parametrize("field", ["tenant_id", "ca", "etag", "deleted", "colour"])
def test_unknown_and_read_only_fields(field):
    err = invalid(doc(**{field: "x"}), "Unknown or read-only policy fields")
    assert field in err.message


def test_unknown_fields_inside_rules_and_subjects():
    invalid(doc(rules=[{"users": ["*"], "action": "auto", "hosts": ["x"]}]), "rules[0] has unknown fields: hosts")
    invalid(doc(approvers={"users": ["a"], "roles": ["x"]}), "'approvers' has unknown fields: roles")


@pytest.mark.parametrize("pid", ["", "Web", "-web", "web-", "web_1", "a" * 64, 7, None])
def test_bad_ids(pid):
    invalid(doc(id=pid), "'id' must be")


def test_id_of_63_characters_is_fine():
    assert make(id="a" * 63).id == "a" * 63


@pytest.mark.parametrize("name", ["", "   ", "x" * 201, 5])
def test_bad_names(name):
    invalid(doc(name=name), "'name'")


@pytest.mark.parametrize(
    "rules,needle",
    [
        (None, "'rules' must be a non-empty list"),
        ([], "'rules' must be a non-empty list"),
        ({"users": ["*"], "action": "auto"}, "'rules' must be a non-empty list"),
        (["auto"], "rules[0] must be an object"),
        ([{"users": ["*"], "action": "allow"}], "rules[0].action"),
        ([{"users": ["*"]}], "rules[0].action"),
        ([{"users": ["*"], "action": "auto"}, {"action": "deny"}], "rules[1] names no users or groups"),
        ([{"users": [""], "action": "auto"}], "list of non-empty strings"),
        ([{"users": [3], "action": "auto"}], "list of non-empty strings"),
    ],
)
def test_bad_rules(rules, needle):
    invalid(doc(rules=rules), needle)


@pytest.mark.parametrize(
    "principals,needle",
    [
        ([], "at least one login"),
        (None, "'principals' is required"),
        (["alice", ""], "non-empty strings"),
        (["root user"], "not a valid unix login"),
        (["9lives"], "not a valid unix login"),
        (["-rf"], "not a valid unix login"),
        (["a" * 33], "not a valid unix login"),
        (["al:ice"], "not a valid unix login"),
        (["alice,bob"], "not a valid unix login"),
        ([{"name": "alice"}], "non-empty strings"),
    ],
)
def test_bad_principals(principals, needle):
    invalid(doc(principals=principals), needle)


def test_missing_principals_and_hosts():
    d = doc()
    del d["principals"]
    invalid(d, "'principals' is required")
    d = doc()
    del d["hosts"]
    invalid(d, "'hosts' is required")
    invalid(doc(hosts=[]), "at least one host pattern")


def test_good_principals():
    p = make(principals=["alice", "_svc", "deploy.bot", "machine$", "a" * 32, "Admin-2"])
    assert p.principals == ("alice", "_svc", "deploy.bot", "machine$", "a" * 32, "Admin-2")


def test_max_ttl_over_the_ceiling():
    invalid(doc(max_ttl=TTL_CEILING + 1), f"between 60 and {TTL_CEILING}")
    assert make(max_ttl=TTL_CEILING).max_ttl == TTL_CEILING
    invalid(doc(max_ttl=7200), "between 60 and 3600", ttl_ceiling=3600)


def test_default_ttl_over_max_ttl():
    err = invalid(doc(max_ttl=3600, default_ttl=3601), "'default_ttl' must be between 60 and 3600; got 3601")
    assert err.code == "invalid_request"


@pytest.mark.parametrize("field", ["max_ttl", "default_ttl", "request_ttl", "approvals_required"])
@pytest.mark.parametrize("value", ["3600", True, False, 3600.0, None, [3600]])
def test_numbers_must_be_whole_numbers_not_strings_or_bools(field, value):
    invalid(doc(**{field: value}), f"'{field}' must be a whole number")


@pytest.mark.parametrize("field,value", [("max_ttl", 59), ("default_ttl", 0), ("request_ttl", 7 * 24 * 3600 + 1),
                                         ("approvals_required", 0), ("approvals_required", 11)])
def test_numbers_out_of_range(field, value):
    invalid(doc(**{field: value}), f"'{field}' must be between")


def test_unknown_extension():
    err = invalid(doc(extensions=["permit-pty", "permit-everything"]), "Unknown extension(s): permit-everything")
    for known in KNOWN_EXTENSIONS:
        assert known in err.message


@pytest.mark.parametrize(
    "host,needle",
    [
        ("10.0.0.1/8", "host bits must be zero"),
        ("10.0.0.0/33", "not a valid CIDR"),
        ("300.1.1.1", "not a valid CIDR"),
        ("10.0.0", "not a valid CIDR"),
        ("2001:db8::1/32", "not a valid CIDR"),
        ("web/1", "not a valid CIDR"),
        ("web 1", "not a valid host name glob"),
        ("web[12", "not a valid host name glob"),
        ("web;rm", "not a valid host name glob"),
        ("x" * 254, "not a valid host name glob"),
        ("tag:env", "tag:name=value"),
        ("tag:=prod", "tag:name=value"),
        ("tag:env=", "tag:name=value"),
        ("/subscriptions/s1", "not an Azure VM or resource group id"),
        ("/subscriptions/s1/resourceGroups/rg/providers/Microsoft.Network/x/y", "not an Azure VM"),
    ],
)
def test_bad_host_patterns(host, needle):
    invalid(doc(hosts=["ok.example", host]), needle)


@pytest.mark.parametrize(
    "host",
    ["*", "web?.contoso.example", "db[0-9]", "db[!0]", "10.0.0.0/8", "10.1.2.3", "2001:db8::/32", "::1",
     "tag:env=prod", "/subscriptions/s1/resourceGroups/rg-1",
     "/subscriptions/s1/resourcegroups/rg-1/providers/microsoft.compute/virtualMachines/vm1"],
)
def test_good_host_patterns(host):
    validate_host_pattern(host)
    assert make(hosts=[host]).hosts == (host,)


@pytest.mark.parametrize("cidr", ["10.0.0.5/24", "10.0.0.0/33", "not-an-ip", "10.0.0.0/8,192.168.0.0/16"])
def test_bad_source_address(cidr):
    # OpenSSH refuses a source-address with host bits set ("Invalid source-address list"), which
    # would make every certificate of the policy unusable.
    invalid(doc(source_address=[cidr]), f"source_address {cidr!r}")


@pytest.mark.parametrize("fc", ["", "  ", "a\nb", 3, ["ls"]])
def test_bad_force_command(fc):
    invalid(doc(force_command=fc), "'force_command'")


@pytest.mark.parametrize("url", ["ftp://x", "hooks.example", "https://", "https://a b", 3])
def test_bad_webhook_url(url):
    invalid(doc(webhook_url=url), "'webhook_url'")


def test_approvers_must_be_an_object():
    invalid(doc(approvers=["carol"]), "'approvers' must be an object")


def test_approval_rule_needs_approvers():
    invalid(doc(rules=[{"users": ["*"], "action": "approval"}]), "names no approvers")
    # without an approval rule, no approvers are fine
    assert make(rules=[{"users": ["*"], "action": "auto"}]).approvers.is_empty()


def test_approvals_required_larger_than_named_approvers():
    invalid(
        doc(rules=[{"groups": ["grp-dev"], "action": "approval"}], approvers={"users": ["carol", "dave"]},
            approvals_required=3),
        "approvals_required is 3 but only 2 approver(s) are named",
    )
    # a group or "*" among approvers could be any size: not counted
    p = make(rules=[{"groups": ["grp-dev"], "action": "approval"}], approvers={"users": ["carol"], "groups": ["g"]},
             approvals_required=3)
    assert p.approvals_required == 3
    p = make(rules=[{"groups": ["grp-dev"], "action": "approval"}], approvers={"users": ["*"]}, approvals_required=5)
    assert p.approvals_required == 5


def test_approvers_who_could_only_approve_themselves():
    err = invalid(
        doc(rules=[{"users": ["alice", "bob"], "action": "approval"}], approvers={"users": ["carol", "alice"]},
            approvals_required=2),
        "alice",
    )
    assert "own request" in err.message and "carol" not in err.message.split("would")[0]
    invalid(doc(rules=[{"users": ["alice"], "action": "approval"}], approvers={"users": ["alice"]}), "own request")
    # with one approver to spare, alice's request can still be approved by the others
    p = make(rules=[{"users": ["alice"], "action": "approval"}], approvers={"users": ["alice", "carol"]})
    assert p.approvers.users == ("alice", "carol")


# ---- partial update --------------------------------------------------------------------------


def base_policy() -> Policy:
    p = make(
        rules=[{"groups": ["grp-ops"], "action": "auto"}],
        hosts=["web*", "10.0.0.0/8"],
        max_ttl=7200,
        default_ttl=600,
        force_command="/bin/rbash",
    )
    ca = CaKeyRef(key_ref="kv://ca/1", backend="pkcs11", public_key="ssh-ed25519 AAAA", fingerprint="SHA256:x")
    return replace(p, ca=(ca,), etag="W/7")


def test_partial_update_keeps_other_fields():
    base = base_policy()
    updated = policy_from_document({"default_ttl": 1800, "name": "Web"}, tenant_id=TID, base=base)
    assert updated.default_ttl == 1800 and updated.name == "Web"
    assert updated.rules == base.rules and updated.hosts == base.hosts
    assert updated.max_ttl == 7200 and updated.force_command == "/bin/rbash"
    assert updated.principals == base.principals and updated.extensions == base.extensions
    assert updated.ca == base.ca  # server-managed fields survive
    assert updated.etag == "W/7"


def test_partial_update_may_clear_optional_fields():
    updated = policy_from_document({"force_command": None}, tenant_id=TID, base=base_policy())
    assert updated.force_command is None and updated.critical_options() == ()


def test_partial_update_is_validated_as_a_whole():
    invalid({"max_ttl": 300}, "'default_ttl' must be between 60 and 300; got 600", base=base_policy())
    invalid({"principals": []}, "at least one login", base=base_policy())
    invalid({"ca": []}, "read-only", base=base_policy())


def test_partial_update_refuses_an_id_change():
    invalid({"id": "other"}, "id cannot change", base=base_policy())
    assert policy_from_document({"id": "web"}, tenant_id=TID, base=base_policy()).id == "web"


def test_partial_update_does_not_touch_the_base():
    base = base_policy()
    snapshot = copy.deepcopy(base.to_dict())
    policy_from_document({"hosts": ["db*"]}, tenant_id=TID, base=base)
    assert base.to_dict() == snapshot


# ---- host matching ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pattern,host,tags,expected",
    [
        ("web*.contoso.example", "web1.contoso.example", None, True),
        ("web*.contoso.example", "WEB1.Contoso.Example.", None, True),
        ("web*.contoso.example", "db1.contoso.example", None, False),
        ("web?", "web12", None, False),
        ("db[0-9]", "db7", None, True),
        ("db[!0]", "db0", None, False),
        ("*", "anything.at.all", None, True),
        ("10.0.0.0/8", "10.200.3.4", None, True),
        ("10.0.0.0/8", "11.0.0.1", None, False),
        ("10.0.0.0/8", "web1", None, False),
        ("10.1.2.3", "10.1.2.3", None, True),
        ("10.1.2.3", "10.1.2.4", None, False),
        ("2001:db8::/32", "[2001:db8::5]", None, True),
        ("2001:db8::/32", "10.0.0.1", None, False),
        ("10.0.0.0/8", "::ffff:10.0.0.1", None, False),
        ("tag:env=prod", "vm1", {"env": "prod"}, True),
        ("tag:env=prod", "vm1", {"env": "dev"}, False),
        ("tag:env=prod", "vm1", None, False),
        ("/subscriptions/S1/resourceGroups/RG1", "vm1",
         {"_resource_id": "/subscriptions/s1/resourcegroups/rg1/providers/Microsoft.Compute/virtualMachines/vm1"}, True),
        ("/subscriptions/s1/resourceGroups/rg1", "vm1",
         {"_resource_id": "/subscriptions/s1/resourceGroups/rg10/providers/Microsoft.Compute/virtualMachines/vm1"},
         False),
        ("/subscriptions/s1/resourceGroups/rg1/providers/Microsoft.Compute/virtualMachines/vm1", "vm1",
         {"_resource_id": "/subscriptions/s1/resourceGroups/rg1/providers/Microsoft.Compute/virtualMachines/vm1"}, True),
        ("/subscriptions/s1/resourceGroups/rg1/providers/Microsoft.Compute/virtualMachines/vm1", "vm1",
         {"_resource_id": "/subscriptions/s1/resourceGroups/rg1/providers/Microsoft.Compute/virtualMachines/vm11"},
         False),
        ("/subscriptions/s1/resourceGroups/rg1", "/subscriptions/s1/resourceGroups/rg1", None, False),
    ],
)
def test_covers_host(pattern, host, tags, expected):
    p = replace(make(), hosts=(pattern,))
    assert p.covers_host(host, tags) is expected


def test_any_pattern_covers():
    p = replace(make(), hosts=("db*", "10.0.0.0/8", "tag:role=web"))
    assert p.covers_host("db3") and p.covers_host("10.9.9.9") and p.covers_host("x", {"role": "web"})
    assert not p.covers_host("web1", {"role": "db"})


# ---- subjects and identities -----------------------------------------------------------------


def test_subjects_match_by_oid_upn_case_insensitively_group_or_star():
    assert Subjects(users=("oid-alice",)).matches(ALICE)
    assert not Subjects(users=("OID-ALICE",)).matches(ALICE)  # object ids are compared exactly
    assert Subjects(users=("alice@contoso.EXAMPLE",)).matches(ALICE)
    assert not Subjects(users=("alice@contoso.example.evil",)).matches(ALICE)
    assert Subjects(groups=("grp-ops",)).matches(ALICE)
    assert not Subjects(groups=("grp-ops",)).matches(BOB)
    assert not Subjects(users=("grp-ops",)).matches(ALICE)  # a group id is not a user
    assert not Subjects(groups=("oid-alice",)).matches(ALICE)  # a user id is not a group
    assert Subjects(users=("*",)).matches(CAROL)
    assert not Subjects().matches(ALICE)


def test_same_person_is_oid_and_tid():
    assert ALICE.same_person(("oid-alice", TID))
    assert not ALICE.same_person(MALLORY)
    assert not ALICE.same_person(Identity(oid="oid-x", tid=TID, upn=ALICE.upn))


def test_admin_and_approver_checks():
    p = make(admins={"users": ["carol@contoso.example"]}, approvers={"groups": ["grp-dev"]})
    assert p.is_admin(CAROL) and not p.is_admin(BOB)
    assert p.is_admin(replace(BOB, roles=frozenset({"EZSSH.Admin"})))
    assert p.is_approver(BOB) and not p.is_approver(ALICE)


# ---- evaluate --------------------------------------------------------------------------------


def req(host="web1.contoso.example", principal="alice", ttl=None, policy=None) -> AccessRequest:
    return AccessRequest(host=host, principal=principal, ttl_seconds=ttl, policy_id=policy)


def test_first_matching_rule_wins_deny_before_auto():
    p = make(rules=[{"users": ["bob@contoso.example"], "action": "deny"}, {"users": ["*"], "action": "auto"}])
    with pytest.raises(Denied) as info:
        evaluate(BOB, req(), p)
    assert type(info.value) is Denied and info.value.status == 403 and info.value.code == "denied"
    assert info.value.details == {"policy": "web"}
    assert evaluate(ALICE, req(), p).action == "auto"
    assert not p.is_member(BOB) and p.is_member(ALICE)


def test_first_matching_rule_wins_auto_before_deny():
    p = make(rules=[{"users": ["*"], "action": "auto"}, {"users": ["oid-bob"], "action": "deny"}])
    assert evaluate(BOB, req(), p).action == "auto"


def test_approval_rule_gives_an_approval_decision():
    p = make(rules=[{"groups": ["grp-dev"], "action": "approval"}, {"groups": ["grp-ops"], "action": "auto"}],
             approvers={"users": ["carol@contoso.example"]})
    assert evaluate(BOB, req(), p).action == "approval"
    assert evaluate(ALICE, req(), p).action == "auto"


def test_no_matching_rule_is_denied():
    p = make(rules=[{"groups": ["grp-ops"], "action": "auto"}])
    with pytest.raises(Denied) as info:
        evaluate(CAROL, req(), p)
    assert type(info.value) is Denied
    assert "web1.contoso.example" in info.value.message


def test_principal_not_allowed():
    with pytest.raises(PrincipalNotAllowed) as info:
        evaluate(ALICE, req(principal="root"), make())
    assert info.value.code == "principal_not_allowed" and info.value.status == 403
    assert "'root'" in info.value.message and "alice, deploy" in info.value.message


def test_deny_rule_is_reported_before_the_principal():
    p = make(rules=[{"users": ["*"], "action": "deny"}])
    with pytest.raises(Denied) as info:
        evaluate(ALICE, req(principal="root"), p)
    assert type(info.value) is Denied  # do not tell a denied user which logins exist


def test_other_tenant_and_deleted_policies_never_apply():
    with pytest.raises(NoPolicyForHost):
        evaluate(MALLORY, req(), make())
    with pytest.raises(NoPolicyForHost):
        evaluate(ALICE, req(), replace(make(), deleted=True))


def test_ttl_default_used_when_none_asked():
    p = make(default_ttl=900, max_ttl=3600)
    assert evaluate(ALICE, req(), p).ttl_seconds == 900
    assert evaluate(ALICE, req(ttl=3600), p).ttl_seconds == 3600
    assert evaluate(ALICE, req(ttl=60), p).ttl_seconds == 60


def test_ttl_over_max_is_refused_not_clamped():
    p = make(default_ttl=900, max_ttl=3600)
    with pytest.raises(TtlTooLong) as info:
        evaluate(ALICE, req(ttl=3601), p)
    assert info.value.status == 400 and info.value.code == "ttl_too_long"
    assert info.value.details == {"max_ttl": 3600}
    assert "3601" in info.value.message and "3600" in info.value.message


@pytest.mark.parametrize("ttl", [59, 0, -5, True, "600", 600.0])
def test_ttl_must_be_a_whole_number_of_at_least_a_minute(ttl):
    with pytest.raises(InvalidRequest):
        resolve_ttl(make(), ttl)


# ---- choose_policy ---------------------------------------------------------------------------


def test_auto_preferred_over_approval_when_two_policies_cover_a_host():
    approval = make(id="a-approval", rules=[{"users": ["*"], "action": "approval"}],
                    approvers={"users": ["carol@contoso.example", "dave@contoso.example"]})
    auto = make(id="z-auto", rules=[{"groups": ["grp-ops"], "action": "auto"}])
    d = choose_policy(ALICE, req(), [approval, auto])
    assert d.policy.id == "z-auto" and d.action == "auto"
    # bob is not in grp-ops: only the approval policy lets him in
    d = choose_policy(BOB, req(), [auto, approval])
    assert d.policy.id == "a-approval" and d.action == "approval"


def test_ties_are_broken_by_policy_id_whatever_the_input_order():
    a, b = make(id="b-pol"), make(id="a-pol")
    assert choose_policy(ALICE, req(), [a, b]).policy.id == "a-pol"
    assert choose_policy(ALICE, req(), [b, a]).policy.id == "a-pol"


def test_named_policy_is_respected():
    auto = make(id="auto")
    approval = make(id="needs-approval", rules=[{"users": ["*"], "action": "approval"}],
                    approvers={"users": ["carol@contoso.example", "dave@contoso.example"]})
    d = choose_policy(ALICE, req(policy="needs-approval"), [auto, approval])
    assert d.policy.id == "needs-approval" and d.action == "approval"
    with pytest.raises(NoPolicyForHost) as info:
        choose_policy(ALICE, req(policy="nope"), [auto, approval])
    assert "'nope'" in info.value.message
    # named, but it does not cover the host
    with pytest.raises(NoPolicyForHost):
        choose_policy(ALICE, req(host="db1", policy="auto"), [auto, approval])


def test_no_policy_for_the_host():
    with pytest.raises(NoPolicyForHost) as info:
        choose_policy(ALICE, req(host="db1.contoso.example"), [make()])
    assert info.value.code == "no_policy_for_host" and info.value.status == 403
    with pytest.raises(NoPolicyForHost):
        choose_policy(ALICE, req(), [])


def test_other_tenants_policy_is_never_chosen():
    theirs = make(tenant_id=OTHER_TID, id="theirs")
    with pytest.raises(NoPolicyForHost):
        choose_policy(ALICE, req(), [theirs])
    with pytest.raises(NoPolicyForHost):
        choose_policy(ALICE, req(policy="theirs"), [theirs])
    ours = make(id="ours", rules=[{"users": ["*"], "action": "approval"}],
                approvers={"users": ["carol@contoso.example", "dave@contoso.example"]})
    assert choose_policy(ALICE, req(), [theirs, ours]).policy.id == "ours"
    # same oid and upn, other tenant: still only that tenant's policies
    assert choose_policy(MALLORY, req(), [theirs, ours]).policy.id == "theirs"
    # another tenant's policy is invisible: it does not even change which refusal is reported
    ours_denies = make(id="ours", rules=[{"users": ["*"], "action": "deny"}])
    with pytest.raises(Denied) as info:
        choose_policy(ALICE, req(), [ours_denies, theirs])
    assert type(info.value) is Denied and "'ours'" in info.value.message


def test_deleted_policy_is_never_chosen():
    with pytest.raises(NoPolicyForHost):
        choose_policy(ALICE, req(), [replace(make(), deleted=True)])


def test_matching_by_tag_and_resource_id():
    tagged = make(id="tagged", hosts=["tag:env=prod"])
    rg = make(id="rg", hosts=["/subscriptions/s1/resourceGroups/rg1"], rules=[{"users": ["oid-bob"], "action": "auto"}])
    vm = "/subscriptions/s1/resourceGroups/rg1/providers/Microsoft.Compute/virtualMachines/vm1"
    assert choose_policy(ALICE, req(host="vm1"), [tagged, rg], {"env": "prod"}).policy.id == "tagged"
    assert choose_policy(BOB, req(host="vm1"), [tagged, rg], {"_resource_id": vm}).policy.id == "rg"
    with pytest.raises(NoPolicyForHost):
        choose_policy(ALICE, req(host="vm1"), [tagged, rg], {"env": "dev"})


def test_matching_by_cidr():
    p = make(hosts=["10.20.0.0/16"])
    assert choose_policy(ALICE, req(host="10.20.1.2"), [p]).policy.id == "web"
    with pytest.raises(NoPolicyForHost):
        choose_policy(ALICE, req(host="10.21.1.2"), [p])


def test_most_specific_error_is_raised_when_every_policy_refuses():
    deny = make(id="a-deny", rules=[{"users": ["*"], "action": "deny"}])
    narrow = make(id="b-narrow", principals=["deploy"])
    with pytest.raises(PrincipalNotAllowed):
        choose_policy(ALICE, req(principal="alice"), [deny, narrow])
    short = make(id="c-short", max_ttl=600, default_ttl=600)
    with pytest.raises(TtlTooLong):
        choose_policy(ALICE, req(ttl=3600), [deny, short])
    with pytest.raises(Denied) as info:
        choose_policy(ALICE, req(), [deny])
    assert type(info.value) is Denied


def test_a_refusing_policy_does_not_hide_one_that_allows():
    short = make(id="a-short", max_ttl=600, default_ttl=600)
    long = make(id="b-long", rules=[{"users": ["*"], "action": "approval"}],
                approvers={"users": ["carol@contoso.example", "dave@contoso.example"]})
    d = choose_policy(ALICE, req(ttl=3600), [short, long])
    assert d.policy.id == "b-long" and d.ttl_seconds == 3600


# ---- grants ----------------------------------------------------------------------------------


def test_decision_grant_carries_the_policy_and_one_principal():
    p = make(extensions=["permit-pty", "permit-agent-forwarding"], force_command="/bin/rbash",
             source_address=["10.0.0.0/8"], default_ttl=900)
    d = evaluate(ALICE, req(principal="deploy"), p)
    g = make_grant(d.policy, "req-1", ALICE.upn, "deploy", d.ttl_seconds)
    assert g.tenant_id == TID and g.policy_id == "web" and g.request_id == "req-1"
    assert g.upn == "Alice@Contoso.example"
    assert g.principals == ("deploy",)
    assert g.ttl_seconds == 900
    assert g.extensions == ("permit-agent-forwarding", "permit-pty")
    assert g.critical_options == (("force-command", "/bin/rbash"), ("source-address", "10.0.0.0/8"))
    assert g.key_id == "ezssh/web/req-1/Alice@Contoso.example"


@pytest.mark.parametrize("principal", ["", "root", "ALICE", "alice,deploy"])
def test_make_grant_never_yields_empty_or_foreign_principals(principal):
    with pytest.raises(PrincipalNotAllowed):
        make_grant(make(), "r", "u@x", principal, 600)


def test_make_grant_backdate():
    assert make_grant(make(), "r", "u@x", "alice", 600).backdate_seconds == 60
    assert make_grant(make(), "r", "u@x", "alice", 600, backdate=5).backdate_seconds == 5


# ---- the {username} principal ----------------------------------------------------------------


def test_username_principal_is_the_requesters_upn_local_part():
    from functions.core.policy import USERNAME_TEMPLATE, allowed_principals

    p = make(principals=[USERNAME_TEMPLATE, "deploy"])
    assert p.principals == ("{username}", "deploy")
    assert allowed_principals(p.principals, ALICE.upn) == ("alice", "deploy")
    d = evaluate(ALICE, req(principal="alice"), p)
    assert make_grant(d.policy, "r1", ALICE.upn, "alice", d.ttl_seconds).principals == ("alice",)
    with pytest.raises(PrincipalNotAllowed) as info:
        evaluate(BOB, req(principal="alice"), p)  # alice's login is not bob's
    assert "bob, deploy" in info.value.message
    with pytest.raises(PrincipalNotAllowed):
        make_grant(p, "r1", BOB.upn, "alice", 600)
    with pytest.raises(PrincipalNotAllowed):
        make_grant(p, "r1", BOB.upn, "{username}", 600)  # the template itself is never a login


def test_username_principal_with_an_unusable_upn_allows_nothing():
    from functions.core.policy import allowed_principals

    p = make(principals=["{username}"])
    guest = Identity(oid="oid-g", tid=TID, upn="ann_fabrikam.com#EXT#@contoso.onmicrosoft.com")
    assert allowed_principals(p.principals, guest.upn) == ()
    with pytest.raises(PrincipalNotAllowed) as info:
        evaluate(guest, req(principal="ann_fabrikam.com#ext#"), p)
    assert "allowed: none" in info.value.message


def test_other_templates_are_not_principals():
    invalid(doc(principals=["{user}"]), "not a valid unix login")
    invalid(doc(principals=["{username}x"]), "not a valid unix login")


def test_username_template_never_expands_to_a_system_account():
    from functions.core.policy import allowed_principals

    assert allowed_principals(("{username}",), "Alice@contoso.test") == ("alice",)
    for upn in ("root@contoso.test", "sshd@contoso.test", "www-data@contoso.test", "Root@contoso.test"):
        assert allowed_principals(("{username}",), upn) == ()
    # a policy that really means root names it literally
    assert allowed_principals(("{username}", "root"), "root@contoso.test") == ("root",)
