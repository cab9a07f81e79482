"""`ezssh audit`: read the audit log (tenant admins; policy admins for their policies)."""

from __future__ import annotations

import sys
import time

from ..context import Ctx
from ..durations import duration_arg
from ..errors import OK
from ..output import fmt_time, out_json


def cmd_audit(args) -> int:
    from urllib.parse import quote

    params: dict[str, str] = {"limit": str(args.limit)}
    if args.since:
        params["since"] = str(int(time.time()) - args.since)
    for name in ("request_id", "policy", "key_id", "serial", "user"):
        if getattr(args, name):
            params[name] = getattr(args, name)
    api = Ctx().api
    entries: list = []
    while True:
        query = "&".join(f"{k}={quote(v, safe='')}" for k, v in params.items())
        page = api.call("GET", f"/api/audit?{query}", ok=(200,)).json()
        entries += page["entries"]
        if not page.get("next"):
            break
        if not args.all:
            print("more entries follow: --all reads every page", file=sys.stderr)
            break
        params["continuation"] = page["next"]
    if args.json:
        out_json(entries)
        return OK
    for e in entries:
        who = e.get("actor_upn") or "-"
        what = " ".join(
            f"{k}={e[k]}"
            for k in ("request_id", "policy_id", "host", "principal", "key_id", "serial", "error_code")
            if e.get(k)
        )
        flag = "" if e.get("intact", True) else "  [HASH MISMATCH]"
        print(f"{fmt_time(e['at'])}  {e['action']:<28} {e['outcome']:<8} {who:<28} {what}{flag}")
    return OK


def register(sub, fmt) -> None:
    c = sub.add_parser("audit", help="read the audit log (admins)")
    c.add_argument("--since", type=duration_arg, metavar="DURATION", help="how far back, e.g. 30m, 8h, 2d")
    c.add_argument("--request", dest="request_id", metavar="ID", help="one request's story")
    c.add_argument("--policy", metavar="ID")
    c.add_argument(
        "--key-id", dest="key_id", metavar="KEY_ID", help="as sshd logs it: ID ezssh/<policy>/<request>/<upn>"
    )
    c.add_argument("--serial", metavar="N", help="as sshd logs it: (serial N)")
    c.add_argument("--user", metavar="OBJECT_ID", help="what one person did (their Entra object id)")
    c.add_argument("--limit", type=int, default=100, help="entries per page (1-1000; oldest first)")
    c.add_argument("--all", action="store_true", help="follow every page, not only the first")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_audit)
