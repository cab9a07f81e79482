"""`ezssh requests list|approve|deny|cancel`: access requests that wait for approval."""

from __future__ import annotations

import argparse

from ..context import Ctx
from ..errors import OK
from ..output import err, fmt_left, out_json, person_label, print_table


def cmd_list(args) -> int:
    ctx = Ctx()
    params = {"role": "requester" if args.mine else "approver"}
    if args.pending or not args.mine:
        params["state"] = "pending"
    params["limit"] = str(args.limit)
    reqs, token = ctx.api.pages("/api/requests", "requests", params, follow=args.all)
    if args.json:
        out_json({"requests": reqs, "next": token})
        return OK
    if not reqs and not token:
        err("No pending requests await your approval." if not args.mine else "You have no matching requests.")
        return OK
    print_table(
        ("ID", "STATUS", "REQUESTER", "LOGIN@HOST", "POLICY", "APPROVALS", "EXPIRES", "REASON"),
        [
            (
                r.get("id", ""),
                r.get("status", ""),
                person_label(r.get("requester_name"), r.get("requester")) if r.get("requester") else "-",
                f"{r.get('principal')}@{r.get('host')}",
                r.get("policy") or "-",
                f"{len(r.get('approvals') or [])}/{r.get('approvals_required', '?')}",
                fmt_left(r.get("expires_at")) if r.get("status") == "pending" else "-",
                (r.get("reason") or "").replace("\n", " ")[:60],
            )
            for r in reqs
        ],
    )
    if token:
        err("More requests follow; add --all for every page (or --limit N for bigger pages).")
    return OK


def _page_size(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if not 1 <= n <= 1000:
        raise argparse.ArgumentTypeError("a number from 1 to 1000")
    return n


def decide(action: str, args) -> int:
    ctx = Ctx()
    body = {"comment": args.comment} if getattr(args, "comment", None) else {}
    _, rec = ctx.api.json("POST", f"/api/requests/{args.id}/{action}", body=body)
    if getattr(args, "json", False):
        out_json(rec)
    state = rec.get("status", "?")
    done = {"approve": "Approved", "deny": "Denied", "cancel": "Cancelled"}[action]
    extra = ""
    if action == "approve" and state == "pending":
        extra = f" ({len(rec.get('approvals') or [])}/{rec.get('approvals_required', '?')} approvals so far)"
    err(f"{done} request {args.id}: now {state}{extra}.")
    return OK


def register(sub, fmt) -> None:
    r = sub.add_parser("requests", help="list, approve, deny or cancel access requests")
    rs = r.add_subparsers(dest="requests_command", metavar="ACTION", required=True)
    c = rs.add_parser("list", help="requests waiting for your approval (default), or your own (--mine)")
    c.add_argument("--pending", action="store_true", help="only pending requests (always so without --mine)")
    c.add_argument("--mine", action="store_true", help="requests you made")
    c.add_argument("--limit", type=_page_size, default=100, metavar="N", help="requests per page (1-1000, default 100)")
    c.add_argument("--all", action="store_true", help="every page, not only the first")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_list)
    for action, helptext in (
        ("approve", "approve a request"),
        ("deny", "deny a request"),
        ("cancel", "cancel your own request"),
    ):
        c = rs.add_parser(action, help=helptext)
        c.add_argument("id", metavar="ID")
        if action != "cancel":
            c.add_argument("--comment", metavar="TEXT")
        c.add_argument("--json", action="store_true", help="print the updated request as JSON")
        c.set_defaults(func=lambda a, _act=action: decide(_act, a))
