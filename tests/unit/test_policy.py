"""functions.core.policy: document validation, host matching, evaluation and policy choice."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest

from functions.core.certificate import KNOWN_EXTENSIONS
from functions.core.errors import Denied, InvalidRequest, NoPolicyForHost, PrincipalNotAllowed, TtlTooLong
from functions.core.evaluation import AccessRequest, choose_policy, evaluate, make_grant, resolve_ttl
from functions.core.hostmatch import validate_host_pattern
from functions.core.policy import TTL_CEILING, CaKeyRef, Identity, Policy, Subjects
from functions.core.policydoc import policy_from_document, policy_from_row

TID = "tenant-a"
OTHER_TID = "tenant-b"


def oid(n: int) -> str:
    return f"{n:08x}-0000-4000-8000-00000000000{n % 10}"


A, B, C, D, X, G = (oid(n) for n in (0xA11CE, 0xB0B, 0xCA201, 0xDA7E, 0xF00, 0x6E57))
GOPS, GDEV, GADM, GG = (oid(n) for n in (0x0975, 0xDE7, 0xAD3, 0x666))

# Members of the verified domain contoso.example (as the token edge decides).
ALICE = Identity(oid=A, tid=TID, upn="Alice@Contoso.example", groups=frozenset({GOPS}), domain_verified=True)
BOB = Identity(oid=B, tid=TID, upn="bob@contoso.example", groups=frozenset({GDEV}), domain_verified=True)
CAROL = Identity(oid=C, tid=TID, upn="carol@contoso.example", domain_verified=True)
MALLORY = Identity(oid=A, tid=OTHER_TID, upn="Alice@Contoso.example", groups=frozenset({GOPS}),
                   domain_verified=True)


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
        rules=[{"users": [B], "action": "deny"}, {"groups": [GOPS], "guests": True, "action": "approval"}],
        logins=[{"oid": A, "logins": ["alice", "root"], "display": "alice@contoso.example"},
                {"group": GOPS, "logins": ["{username}", "ops"]}],
        hosts=["web*", "10.0.0.0/8", "tag:env=prod", "/subscriptions/s1/resourceGroups/rg1"],
        approvers={"users": [C, D]},
        approvals_required=2,
        admins={"groups": [GADM]},
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
    invalid(doc(approvers={"users": [A], "roles": ["x"]}), "'approvers' has unknown fields: roles")


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
        (None, "at least one login"),
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
    invalid(d, "must map at least one login")
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
    invalid(doc(approvers=[C]), "'approvers' must be an object")


def test_approval_rule_needs_approvers():
    invalid(doc(rules=[{"users": ["*"], "action": "approval"}]), "names no approvers")
    # without an approval rule, no approvers are fine
    assert make(rules=[{"users": ["*"], "action": "auto"}]).approvers.is_empty()


def test_approvals_required_larger_than_named_approvers():
    invalid(
        doc(rules=[{"groups": [GDEV], "action": "approval"}], approvers={"users": [C, D]},
            approvals_required=3),
        "approvals_required is 3 but only 2 approver(s) are named",
    )
    # a group or "*" among approvers could be any size: not counted
    p = make(rules=[{"groups": [GDEV], "action": "approval"}], approvers={"users": [C], "groups": [GG]},
             approvals_required=3)
    assert p.approvals_required == 3
    p = make(rules=[{"groups": [GDEV], "action": "approval"}], approvers={"users": ["*"]}, approvals_required=5)
    assert p.approvals_required == 5


def test_approvers_who_could_only_approve_themselves():
    err = invalid(
        doc(rules=[{"users": [A, B], "action": "approval"}], approvers={"users": [C, A]},
            approvals_required=2),
        A,
    )
    assert "own request" in err.message and C not in err.message.split("would")[0]
    invalid(doc(rules=[{"users": [A], "action": "approval"}], approvers={"users": [A]}), "own request")
    # with one approver to spare, alice's request can still be approved by the others
    p = make(rules=[{"users": [A], "action": "approval"}], approvers={"users": [A, C]})
    assert p.approvers.users == (A, C)


# ---- partial update --------------------------------------------------------------------------


def base_policy() -> Policy:
    p = make(
        rules=[{"groups": [GOPS], "action": "auto"}],
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


def test_subjects_match_by_object_id_group_or_star_never_by_name():
    assert Subjects(users=(A,)).matches(ALICE)
    assert Subjects(groups=(GOPS,)).matches(ALICE)
    assert not Subjects(groups=(GOPS,)).matches(BOB)
    assert not Subjects(users=(GOPS,)).matches(ALICE)  # a group id is not a user
    assert not Subjects(groups=(A,)).matches(ALICE)  # a user id is not a group
    assert Subjects(users=("*",)).matches(CAROL)
    assert not Subjects().matches(ALICE)
    # a stored UPN (from before names were refused) never matches, whatever its case
    stored = Subjects.from_row({"users": ["alice@contoso.EXAMPLE", "Alice@Contoso.example"]})
    assert stored.users == () and stored.unresolved == ("alice@contoso.EXAMPLE", "Alice@Contoso.example")
    assert not stored.matches(ALICE)


def test_guests_match_only_where_admitted():
    guest = replace(ALICE, guest=True)
    assert not Subjects(users=("*",)).matches(guest)
    assert not Subjects(users=(A,)).matches(guest)  # even named: the rule must say guests
    assert not Subjects(groups=(GOPS,)).matches(guest)
    assert Subjects(groups=(GOPS,), guests=True).matches(guest)
    assert Subjects(users=("*",)).matches(guest, any_account=True)


def test_same_person_is_oid_and_tid():
    assert ALICE.same_person((A, TID))
    assert not ALICE.same_person(MALLORY)
    assert not ALICE.same_person(Identity(oid=X, tid=TID, upn=ALICE.upn))


def test_admin_and_approver_checks():
    p = make(admins={"users": [C]}, approvers={"groups": [GDEV]})
    assert p.is_admin(CAROL) and not p.is_admin(BOB)
    assert p.is_admin(replace(BOB, roles=frozenset({"EZSSH.Admin"})))
    assert p.is_approver(BOB) and not p.is_approver(ALICE)


# ---- evaluate --------------------------------------------------------------------------------


def req(host="web1.contoso.example", principal="alice", ttl=None, policy=None) -> AccessRequest:
    return AccessRequest(host=host, principal=principal, ttl_seconds=ttl, policy_id=policy)


def test_first_matching_rule_wins_deny_before_auto():
    p = make(rules=[{"users": [B], "action": "deny"}, {"users": ["*"], "action": "auto"}])
    with pytest.raises(Denied) as info:
        evaluate(BOB, req(), p)
    assert type(info.value) is Denied and info.value.status == 403 and info.value.code == "denied"
    assert info.value.details == {"policy": "web"}
    assert evaluate(ALICE, req(), p).action == "auto"
    assert not p.is_member(BOB) and p.is_member(ALICE)


def test_first_matching_rule_wins_auto_before_deny():
    p = make(rules=[{"users": ["*"], "action": "auto"}, {"users": [B], "action": "deny"}])
    assert evaluate(BOB, req(), p).action == "auto"


def test_approval_rule_gives_an_approval_decision():
    p = make(rules=[{"groups": [GDEV], "action": "approval"}, {"groups": [GOPS], "action": "auto"}],
             approvers={"users": [C]})
    assert evaluate(BOB, req(), p).action == "approval"
    assert evaluate(ALICE, req(), p).action == "auto"


def test_no_matching_rule_is_denied():
    p = make(rules=[{"groups": [GOPS], "action": "auto"}])
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
    assert info.value.details == {"max_ttl": 3600, "requested": 3601, "policy": p.id}
    assert "3601" in info.value.message and "3600" in info.value.message


@pytest.mark.parametrize("ttl", [59, 0, -5, True, "600", 600.0])
def test_ttl_must_be_a_whole_number_of_at_least_a_minute(ttl):
    with pytest.raises(InvalidRequest):
        resolve_ttl(make(), ttl)


# ---- choose_policy ---------------------------------------------------------------------------


def test_auto_preferred_over_approval_when_two_policies_cover_a_host():
    approval = make(id="a-approval", rules=[{"users": ["*"], "action": "approval"}],
                    approvers={"users": [C, D]})
    auto = make(id="z-auto", rules=[{"groups": [GOPS], "action": "auto"}])
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
                    approvers={"users": [C, D]})
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
                approvers={"users": [C, D]})
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
    rg = make(id="rg", hosts=["/subscriptions/s1/resourceGroups/rg1"], rules=[{"users": [B], "action": "auto"}])
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
                approvers={"users": [C, D]})
    d = choose_policy(ALICE, req(ttl=3600), [short, long])
    assert d.policy.id == "b-long" and d.ttl_seconds == 3600


# ---- grants ----------------------------------------------------------------------------------


def test_decision_grant_carries_the_policy_and_one_principal():
    p = make(extensions=["permit-pty", "permit-agent-forwarding"], force_command="/bin/rbash",
             source_address=["10.0.0.0/8"], default_ttl=900)
    d = evaluate(ALICE, req(principal="deploy"), p)
    g = make_grant(d.policy, "req-1", ALICE, "deploy", d.ttl_seconds)
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
        make_grant(make(), "r", CAROL, principal, 600)


def test_make_grant_backdate():
    assert make_grant(make(), "r", CAROL, "alice", 600).backdate_seconds == 60
    assert make_grant(make(), "r", CAROL, "alice", 600, backdate=5).backdate_seconds == 5


# ---- the {username} principal ----------------------------------------------------------------


def test_username_principal_is_the_requesters_upn_local_part():
    from functions.core.evaluation import allowed_logins
    from functions.core.policy import USERNAME_TEMPLATE

    p = make(principals=[USERNAME_TEMPLATE, "deploy"])
    assert p.principals == ("{username}", "deploy")
    assert allowed_logins(p, ALICE) == ("alice", "deploy")
    d = evaluate(ALICE, req(principal="alice"), p)
    assert make_grant(d.policy, "r1", ALICE, "alice", d.ttl_seconds).principals == ("alice",)
    with pytest.raises(PrincipalNotAllowed) as info:
        evaluate(BOB, req(principal="alice"), p)  # alice's login is not bob's
    assert "bob, deploy" in info.value.message
    with pytest.raises(PrincipalNotAllowed):
        make_grant(p, "r1", BOB, "alice", 600)
    with pytest.raises(PrincipalNotAllowed):
        make_grant(p, "r1", BOB, "{username}", 600)  # the template itself is never a login


def test_username_principal_with_an_unusable_upn_allows_nothing():
    from functions.core.evaluation import allowed_logins

    p = make(principals=["{username}"])
    ext = Identity(oid=G, tid=TID, upn="ann_fabrikam.com#EXT#@contoso.example", domain_verified=True)
    assert allowed_logins(p, ext) == ()
    with pytest.raises(PrincipalNotAllowed) as info:
        evaluate(ext, req(principal="ann_fabrikam.com#ext#"), p)
    assert "allowed: none" in info.value.message


def test_other_templates_are_not_principals():
    invalid(doc(principals=["{user}"]), "not a valid unix login")
    invalid(doc(principals=["{username}x"]), "not a valid unix login")


@pytest.mark.parametrize("login", ["root", "sshd", "www-data", "Root", "azureuser", "ubuntu", "ec2-user", "adm",
                                   "admin", "nobody", "daemon", "bin", "sys", "centos", "debian", "fedora", "opc",
                                   "cloud-user", "systemd-network", "_apt"])
def test_username_template_never_expands_to_a_system_account(login):
    from functions.core.evaluation import allowed_logins

    who = replace(CAROL, upn=f"{login}@contoso.example")
    assert allowed_logins(make(principals=["{username}"]), who) == ()
    # a policy that really means that account names it literally
    assert allowed_logins(make(principals=["{username}", login.lower()]), who) == (login.lower(),)


def test_username_only_for_a_verified_domain_and_never_for_guests():
    from functions.core.evaluation import allowed_logins

    p = make(principals=["{username}"], rules=[{"users": ["*"], "guests": True, "action": "auto"}])
    assert allowed_logins(p, ALICE) == ("alice",)
    # same local part, a domain the tenant did not list as verified
    assert allowed_logins(p, replace(ALICE, upn="alice@subsidiary.example", domain_verified=False)) == ()
    # a guest, even one whose UPN names a verified domain and whose rule admits guests
    guest = replace(ALICE, guest=True)
    assert guest.username is None and allowed_logins(p, guest) == ()
    assert evaluate(guest, req(principal="deploy"), make(logins=[{"oid": A, "logins": ["deploy"]}],
                    rules=[{"users": [A], "guests": True, "action": "auto"}])).action == "auto"


# ---- logins by object id and group -----------------------------------------------------------


def test_logins_by_object_id_and_group():
    from functions.core.evaluation import allowed_logins

    p = make(principals=[], logins=[{"oid": A, "logins": ["deploy"]},
                                    {"group": GDEV, "logins": ["{username}", "dev"]},
                                    {"members": True, "logins": ["readonly"]}])
    assert allowed_logins(p, ALICE) == ("deploy", "readonly")
    assert allowed_logins(p, BOB) == ("bob", "dev", "readonly")
    assert allowed_logins(p, CAROL) == ("readonly",)
    # a different person with alice's name gets nothing that was mapped to alice's object id
    impostor = replace(ALICE, oid=X, groups=frozenset())
    assert allowed_logins(p, impostor) == ("readonly",)
    with pytest.raises(PrincipalNotAllowed):
        evaluate(impostor, req(principal="deploy"), p)
    d = evaluate(ALICE, req(principal="deploy"), p)
    assert make_grant(d.policy, "r", ALICE, "deploy", d.ttl_seconds).principals == ("deploy",)


def test_login_map_round_trips_and_normalises_object_ids():
    p = make(logins=[{"oid": A.upper(), "logins": ["deploy", "deploy"], "display": "Alice"}])
    assert p.logins[0].oid == A and p.logins[0].logins == ("deploy",) and p.logins[0].display == "Alice"
    assert policy_from_row(p.to_dict()) == p


@pytest.mark.parametrize("entry,needle", [
    ({"oid": "alice@contoso.example", "logins": ["x"]}, "by UPN"),
    ({"group": "ops", "logins": ["x"]}, "not an object id"),
    ({"oid": A, "group": GOPS, "logins": ["x"]}, "exactly one of"),
    ({"logins": ["x"]}, "exactly one of"),
    ({"members": False, "logins": ["x"]}, "members must be true"),
    ({"oid": A, "logins": []}, "non-empty list of logins"),
    ({"oid": A, "logins": ["root user"]}, "not a valid unix login"),
    ({"oid": A, "logins": ["x"], "upn": "a@b"}, "unknown fields: upn"),
    ({"oid": A, "logins": ["x"], "display": "a\nb"}, "control character"),
    ("x", "must be an object"),
])
def test_bad_login_entries(entry, needle):
    invalid(doc(logins=[entry]), needle)


# ---- people are named by object id -------------------------------------------------------------


@pytest.mark.parametrize("field", ["rules", "approvers", "admins"])
def test_a_upn_in_a_policy_is_refused_with_what_to_do(field):
    who = {"users": ["bob@contoso.example"]}
    d = doc(rules=[{**who, "action": "auto"}]) if field == "rules" else doc(**{field: who})
    err = invalid(d, "by UPN")
    assert "object id" in err.message and "az ad user show --id bob@contoso.example" in err.message


@pytest.mark.parametrize("value", ["carol", "oid-carol", "{" + A + "}", A + " "])
def test_a_non_guid_is_not_an_object_id(value):
    if value.strip() == A:
        assert make(approvers={"users": [value]}).approvers.users == (A,)
        return
    invalid(doc(approvers={"users": [value]}), "not an object id")


def test_a_stored_policy_naming_people_by_upn_grants_nothing_until_fixed():
    from functions.core.errors import PolicyNeedsUpdate

    row = make(principals=["{username}"]).to_dict()
    row["approvers"] = {"users": ["carol@contoso.example"], "groups": []}
    p = policy_from_row(row)
    assert p.unresolved_names() == ("carol@contoso.example",)
    assert not p.is_approver(CAROL)  # never matched by name
    with pytest.raises(PolicyNeedsUpdate) as info:
        evaluate(ALICE, req(), p)
    assert info.value.code == "policy_needs_update" and "carol@contoso.example" in info.value.message
    assert "object id" in info.value.message
    # an edit that still carries the UPN is refused; one that replaces it is accepted
    invalid({"principals": ["alice"]}, "by UPN", base=p)
    fixed = policy_from_document({"approvers": {"users": [C]}}, tenant_id=TID, base=p)
    assert fixed.unresolved_names() == () and fixed.is_approver(CAROL)


def test_guests_are_refused_unless_a_rule_admits_them():
    guest = replace(BOB, guest=True, groups=frozenset({GDEV}))
    p = make(rules=[{"groups": [GDEV], "action": "auto"}], principals=["deploy"])
    with pytest.raises(Denied) as info:
        evaluate(guest, req(principal="deploy"), p)
    assert "guest" in info.value.message
    admitted = make(rules=[{"groups": [GDEV], "guests": True, "action": "auto"}], principals=["deploy"])
    assert evaluate(guest, req(principal="deploy"), admitted).action == "auto"
    # a deny rule denies guests whatever its `guests` says
    deny_first = make(rules=[{"users": ["*"], "action": "deny"}, {"groups": [GDEV], "guests": True, "action": "auto"}])
    with pytest.raises(Denied):
        evaluate(guest, req(principal="deploy"), deny_first)
    invalid(doc(rules=[{"users": ["*"], "guests": "yes", "action": "auto"}]), "guests must be true or false")


def test_a_login_refusal_names_the_policy_that_offered_username_and_why_it_stood_for_nothing():
    """Two policies cover the host; the one whose rules admit the caller is named, the other listed."""
    unverified = replace(BOB, upn="bob@subsidiary.example", domain_verified=False)
    offers = make(id="web", rules=[{"groups": [GDEV], "action": "auto"}], principals=["{username}"])
    other = make(id="aaa-ops", rules=[{"groups": [GOPS], "action": "auto"}])
    with pytest.raises(PrincipalNotAllowed) as info:
        choose_policy(unverified, req(principal="bob"), [other, offers])
    msg = info.value.message
    assert msg.startswith("Policy 'web' does not allow you the login 'bob'; allowed: none."), msg
    assert "'subsidiary.example' is not one of your tenant's verified domains" in msg
    assert "Also evaluated for this host: aaa-ops" in msg and info.value.details["policy"] == "web"
    guest = replace(BOB, guest=True)
    with pytest.raises(PrincipalNotAllowed) as info:
        evaluate(guest, req(principal="bob"), make(rules=[{"groups": [GDEV], "guests": True, "action": "auto"}],
                                                   principals=["{username}"]))
    assert "guest accounts never get {username}" in info.value.message
    root = replace(BOB, upn="root@contoso.example")
    with pytest.raises(PrincipalNotAllowed) as info:
        evaluate(root, req(principal="root"), offers)
    assert "'root' (your UPN's local part) is a reserved system account" in info.value.message
    # a policy that never offered {username} says nothing about it
    with pytest.raises(PrincipalNotAllowed) as info:
        evaluate(unverified, req(principal="bob"), make(rules=[{"groups": [GDEV], "action": "auto"}]))
    assert "{username}" not in info.value.message
