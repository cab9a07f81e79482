"""Deciding a request: which policy covers the host, whether it lets this identity in, which logins
it maps to them, the TTL, and the Grant the certificate builder turns into a certificate."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from .certificate import DEFAULT_BACKDATE, Grant
from .errors import Denied, InvalidRequest, NoPolicyForHost, PolicyNeedsUpdate, PrincipalNotAllowed, TtlTooLong
from .policy import MIN_TTL, USERNAME_TEMPLATE, Action, Identity, Policy, is_reserved_login


@dataclass(frozen=True)
class AccessRequest:
    host: str
    principal: str
    ttl_seconds: int | None = None
    policy_id: str | None = None
    reason: str | None = None


@dataclass(frozen=True)
class Decision:
    policy: Policy
    action: Action  # auto | approval
    ttl_seconds: int


def allowed_logins(policy: Policy, who: Identity) -> tuple[str, ...]:
    """The logins a policy maps to this caller: every `principals` entry (for every member), and the
    `logins` entries for their object id or groups. {username} stands for Identity.username: only
    members of a verified domain, never guests, never a reserved account."""
    out = []
    for m in policy.login_map():
        if not m.matches(who):
            continue
        for login in m.logins:
            if login == USERNAME_TEMPLATE:
                if who.username is not None:
                    out.append(who.username)
            else:
                out.append(login)
    return tuple(dict.fromkeys(out))


def why_no_username(who: Identity) -> str | None:
    """Why {username} stands for no login for this caller (None when it does), in one clause."""
    if who.username is not None:
        return None
    if who.guest:
        return "guest accounts never get {username}"
    if not who.domain_verified:
        domain = who.upn_domain
        return (
            f"your UPN's domain {domain!r} is not one of your tenant's verified domains (the service's "
            "verifiedDomains setting, EZSSH_VERIFIED_DOMAINS)"
            if domain
            else "your account has no UPN with a verified domain"
        )
    local = who.upn.rpartition("@")[0].lower()
    if is_reserved_login(local):
        return f"{local!r} (your UPN's local part) is a reserved system account, never given by {{username}}"
    return f"{local!r} (your UPN's local part) is not a valid login name"


def _login_refusal(policy: Policy, who: Identity, principal: str, allowed: tuple[str, ...]) -> str:
    msg = f"Policy {policy.id!r} does not allow you the login {principal!r}; allowed: {', '.join(allowed) or 'none'}."
    why = why_no_username(who)
    offers_username = any(USERNAME_TEMPLATE in m.logins for m in policy.login_map() if m.matches(who))
    if why and offers_username:
        msg += f" It gives you {{username}}, which stands for no login here: {why}."
    return msg


def make_grant(
    policy: Policy, request_id: str, who: Identity, principal: str, ttl_seconds: int, backdate: int = DEFAULT_BACKDATE
) -> Grant:
    if not isinstance(who, Identity):
        raise TypeError("make_grant needs the requester's Identity")
    if principal not in allowed_logins(policy, who):
        raise PrincipalNotAllowed(f"Policy {policy.id!r} does not allow the login {principal!r}.")
    return Grant(
        tenant_id=policy.tenant_id,
        policy_id=policy.id,
        request_id=request_id,
        upn=who.upn,
        principals=(principal,),
        ttl_seconds=ttl_seconds,
        extensions=tuple(sorted(policy.extensions)),
        critical_options=policy.critical_options(),
        backdate_seconds=backdate,
    )


def resolve_ttl(policy: Policy, requested: int | None) -> int:
    if requested is None:
        return policy.default_ttl
    if isinstance(requested, bool) or not isinstance(requested, int) or requested < MIN_TTL:
        raise InvalidRequest(
            f"ttl_seconds must be a whole number of at least {MIN_TTL}.", field="ttl_seconds", min=MIN_TTL
        )
    if requested > policy.max_ttl:
        raise TtlTooLong(
            f"ttl_seconds {requested} is over policy {policy.id!r}'s maximum of {policy.max_ttl} seconds.",
            max_ttl=policy.max_ttl,
            requested=requested,
            policy=policy.id,
        )
    return requested


def evaluate(who: Identity, request: AccessRequest, policy: Policy) -> Decision:
    """One policy: does it let `who` in as `request.principal` on `request.host`?"""
    if policy.tenant_id != who.tid or policy.deleted:
        raise NoPolicyForHost(f"No access policy covers host {request.host!r}.")
    unresolved = policy.unresolved_names()
    if unresolved:
        raise PolicyNeedsUpdate(
            f"Policy {policy.id!r} names people by UPN ({', '.join(unresolved[:3])}"
            f"{', ...' if len(unresolved) > 3 else ''}), which are never matched; it grants nothing until an "
            "admin replaces them with object ids (ezssh policy resolve-names, or edit the policy).",
            policy=policy.id,
        )
    rule = policy.rule_for(who)
    if rule is None or rule.action == "deny":
        if who.guest and any(r.action != "deny" and not r.subjects.guests for r in policy.rules):
            raise Denied(f"Policy {policy.id!r} does not admit guest accounts.", policy=policy.id)
        raise Denied(f"Policy {policy.id!r} does not grant you access to {request.host!r}.", policy=policy.id)
    allowed = allowed_logins(policy, who)
    if request.principal not in allowed:
        raise PrincipalNotAllowed(_login_refusal(policy, who, request.principal, allowed), policy=policy.id)
    ttl = resolve_ttl(policy, request.ttl_seconds)
    return Decision(policy=policy, action=rule.action, ttl_seconds=ttl)


def choose_policy(
    who: Identity,
    request: AccessRequest,
    policies: Iterable[Policy],
    tags: dict[str, str] | None = None,
) -> Decision:
    """Pick the policy for a request: the one named, else the best of those covering the host.

    Among several that cover the host and let the user in, auto-approve wins over approval, then
    the policy id breaks the tie so the choice is stable.
    """
    covering = [p for p in policies if p.tenant_id == who.tid and not p.deleted and p.covers_host(request.host, tags)]
    if request.policy_id is not None:
        covering = [p for p in covering if p.id == request.policy_id]
    if not covering:
        raise NoPolicyForHost(
            f"No access policy covers host {request.host!r}"
            + (f" under policy {request.policy_id!r}." if request.policy_id else ".")
        )
    decisions: list[Decision] = []
    first_error: Denied | TtlTooLong | None = None
    for p in sorted(covering, key=lambda p: p.id):
        try:
            decisions.append(evaluate(who, request, p))
        except (Denied, TtlTooLong) as exc:
            if first_error is None or (isinstance(first_error, Denied) and type(first_error) is Denied):
                first_error = exc
    if not decisions:
        assert first_error is not None
        others = sorted(p.id for p in covering if p.id != getattr(first_error, "details", {}).get("policy"))
        if others and isinstance(first_error, Denied):
            raise type(first_error)(
                f"{first_error.message} (Also evaluated for this host: {', '.join(others)}.)", **first_error.details
            )
        raise first_error
    decisions.sort(key=lambda d: (d.action != "auto", d.policy.id))
    return decisions[0]
