"""`ezssh ls`: where you may log in. The policies you are a member of (from GET /api/policies), their
host patterns, the logins they give you, and whether you get a certificate at once or need approval.

Logins and the access column are what the service says of you (`you.logins`, `you.access`: matched by
object id and groups, {username} only for your tenant's verified domains); with an older service
they are worked out here from the policy and your token (display only: the service decides every
request).
"""

from __future__ import annotations

from ..context import Ctx
from ..durations import fmt_duration
from ..errors import OK
from ..output import err, out_json, print_table


def _me(ctx: Ctx) -> dict:
    from ..tokens import claims

    c = claims(ctx.token())
    upn = c.get("preferred_username") or c.get("upn") or ""
    return {"upn": upn.lower(), "oid": c.get("oid"), "groups": set(c.get("groups") or [])}


def access_for(policy: dict, me: dict) -> str:
    """auto | approval | deny (the first rule naming you), as the service would decide for you."""
    said = (policy.get("you") or {}).get("access")
    if said in ("auto", "approval", "deny"):
        return said
    for rule in policy.get("rules") or []:
        users = {str(u).lower() for u in rule.get("users") or []}
        if (
            "*" in users
            or me["upn"] in users
            or (me["oid"] and me["oid"].lower() in users)
            or me["groups"] & set(rule.get("groups") or [])
        ):
            return str(rule.get("action") or "deny")
    return "deny"


def logins_for(policy: dict, me: dict) -> list[str]:
    said = (policy.get("you") or {}).get("logins")
    if isinstance(said, list):
        return [str(x) for x in said]
    local = me["upn"].split("@", 1)[0] if me["upn"] else "{username}"
    return [local if p == "{username}" else p for p in policy.get("principals") or []]


def cmd_ls(args) -> int:
    ctx = Ctx()
    _, data = ctx.api.json("GET", "/api/policies")
    me = _me(ctx)
    rows = []
    for p in data.get("policies") or []:
        you = p.get("you") or {}
        access = access_for(p, me)
        if not args.all and (not you.get("member") and access == "deny"):
            continue
        rows.append(
            {
                "policy": p.get("id"),
                "name": p.get("name"),
                "hosts": list(p.get("hosts") or []),
                "logins": logins_for(p, me),
                "access": access,
                "default_ttl": p.get("default_ttl"),
                "max_ttl": p.get("max_ttl"),
                "approvals_required": p.get("approvals_required"),
            }
        )
    if args.json:
        out_json(rows)
        return OK
    if not rows:
        err("No policy gives you access yet (ask an admin to add you to one).")
        return OK
    words = {"auto": "yes, at once", "approval": "after approval", "deny": "no"}
    print_table(
        ("POLICY", "HOSTS", "LOGINS", "ACCESS", "TTL (MAX)"),
        [
            (
                r["policy"],
                ",".join(r["hosts"]),
                ",".join(r["logins"]) or "-",
                words.get(r["access"], r["access"])
                + (
                    f" ({r['approvals_required']})"
                    if r["access"] == "approval" and (r["approvals_required"] or 1) > 1
                    else ""
                ),
                f"{fmt_duration(r['default_ttl'])} ({fmt_duration(r['max_ttl'])})",
            )
            for r in rows
        ],
    )
    err("Log in with: ezssh ssh <login>@<host>   (or plain ssh after `ezssh config`)")
    return OK


def register(sub, fmt) -> None:
    c = sub.add_parser(
        "ls",
        help="where you may log in: policies, host patterns, logins, approval needed",
        formatter_class=fmt,
        description=__doc__,
    )
    c.add_argument("--all", action="store_true", help="also policies that give you no access (you administer them)")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_ls)
