"""`ezssh certs ...`: the certificates this machine holds, and revocation."""

from __future__ import annotations

import re

from ..context import Ctx
from ..errors import OK, USAGE, EzsshError
from ..output import err, out_json

SERIAL_RE = re.compile(r"^[0-9]{1,19}$")


def cmd_revoke(args) -> int:
    if not SERIAL_RE.match(args.serial) or int(args.serial) == 0:
        raise EzsshError(f"Serial {args.serial!r} is not a certificate serial (a decimal number).", USAGE)
    body = {"reason": args.reason} if args.reason else {}
    resp = Ctx().api.call("POST", f"/api/certificates/{args.policy}/{args.serial}/revoke", body=body, ok=(200,))
    rec = resp.json()
    if args.json:
        out_json(rec)
    else:
        err(f"Revoked certificate {rec.get('serial')} ({rec.get('key_id')}) of policy {rec.get('policy')}. "
            "Hosts refuse it once they fetch the policy's KRL (every 15 minutes).")
    return OK


def register(sub, fmt) -> None:
    certs = sub.add_parser("certs", help="certificates: revoke one")
    cs = certs.add_subparsers(dest="certs_command", metavar="ACTION", required=True)
    c = cs.add_parser("revoke", help="revoke a certificate (yours, or any of a policy you administer)")
    c.add_argument("policy", metavar="POLICY")
    c.add_argument("serial", metavar="SERIAL")
    c.add_argument("--reason", help="why (recorded in the audit log)")
    c.add_argument("--json", action="store_true", help="print the revocation record as JSON")
    c.set_defaults(func=cmd_revoke)
