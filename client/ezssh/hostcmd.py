"""`ezssh policy host-setup ID` and `ezssh certs revoke POLICY SERIAL`.

Standard library only at import time; the API client loads when a command runs.
"""

from __future__ import annotations

import json
import re
import sys

from .errors import OK, USAGE, EzsshError

SERIAL_RE = re.compile(r"^[0-9]{1,19}$")


def cmd_host_setup(args) -> int:
    from .cli import Ctx

    resp = Ctx().api.call("GET", f"/api/policies/{args.id}/host-setup", ok=(200,))
    sys.stdout.write(resp.text)
    print("ezssh: run this as root on the host (sh script.sh); it is idempotent. "
          "Sandbox: EZSSH_ROOT=/path or --root /path.", file=sys.stderr)
    return OK


def cmd_certs_revoke(args) -> int:
    from .cli import Ctx

    if not SERIAL_RE.match(args.serial) or int(args.serial) == 0:
        raise EzsshError(f"Serial {args.serial!r} is not a certificate serial (a decimal number).", USAGE)
    body = {"reason": args.reason} if args.reason else {}
    resp = Ctx().api.call("POST", f"/api/certificates/{args.policy}/{args.serial}/revoke", body=body, ok=(200,))
    rec = resp.json()
    if args.json:
        print(json.dumps(rec, indent=2, sort_keys=True))
    else:
        print(f"Revoked certificate {rec.get('serial')} ({rec.get('key_id')}) of policy {rec.get('policy')}. "
              "Hosts refuse it once they fetch the policy's KRL (every 15 minutes).", file=sys.stderr)
    return OK


def add_policy_host_setup(policy_subparsers) -> None:
    c = policy_subparsers.add_parser("host-setup", help="print the setup script that makes a host trust the policy")
    c.add_argument("id", metavar="ID")
    c.set_defaults(func=cmd_host_setup)


def add_certs_commands(sub) -> None:
    certs = sub.add_parser("certs", help="certificates: revoke one")
    cs = certs.add_subparsers(dest="certs_command", metavar="ACTION", required=True)
    c = cs.add_parser("revoke", help="revoke a certificate (yours, or any of a policy you administer)")
    c.add_argument("policy", metavar="POLICY")
    c.add_argument("serial", metavar="SERIAL")
    c.add_argument("--reason", help="why (recorded in the audit log)")
    c.add_argument("--json", action="store_true", help="print the revocation record as JSON")
    c.set_defaults(func=cmd_certs_revoke)
