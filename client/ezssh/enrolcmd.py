"""`ezssh hosts enrol` and `ezssh hosts list`: push a policy's CA to Azure VMs, and see how it went.

    ezssh hosts enrol --policy ID --vm /subscriptions/<id>/resourceGroups/<rg>/providers/Microsoft.Compute/virtualMachines/<vm>
    ezssh hosts enrol --policy ID --resource-group RG --tag ezssh=yes
    ezssh hosts list --policy ID [--json]

Standard library only at import time; the API client loads when a command runs. `enrol` exits 0
when every VM named succeeded, 1 when one failed (its output tail is shown), and 6 when all that
did not succeed are still being retried by the service.
"""

from __future__ import annotations

import json
import sys
import time

from .errors import ERROR, OK, UNAVAILABLE, USAGE, EzsshError

COLUMNS = ("VM", "STATE", "ATTEMPTS", "UPDATED", "NEXT TRY", "ERROR")


def _vm_name(vm_id: str) -> str:
    parts = vm_id.split("/")
    return f"{parts[4]}/{parts[8]}" if len(parts) >= 9 else vm_id


def _ts(t) -> str:  # noqa: ANN001
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t)) if isinstance(t, (int, float)) and t else "-"


def _table(recs: list[dict]) -> None:
    rows = [(_vm_name(r.get("vm_id", "")), r.get("state", ""), str(r.get("attempts", 0)), _ts(r.get("updated_at")),
             _ts(r.get("next_attempt_at")), (r.get("last_error") or "")[:100]) for r in recs]
    widths = [max(len(str(x)) for x in col) for col in zip(COLUMNS, *rows)]
    for row in (COLUMNS, *rows):
        print("  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip())


def cmd_hosts_enrol(args) -> int:  # noqa: ANN001
    from .cli import Ctx

    if bool(args.vm) == bool(args.resource_group):
        raise EzsshError("Give --vm VM_ID, or --resource-group RG with --tag NAME=VALUE.", USAGE)
    if args.resource_group and (not args.tag or "=" not in args.tag):
        raise EzsshError("--resource-group needs --tag NAME=VALUE.", USAGE)
    if args.vm and args.tag:
        raise EzsshError("--tag goes with --resource-group, not with --vm.", USAGE)
    body = {"vm_id": args.vm} if args.vm else {"resource_group": args.resource_group, "tag": args.tag}
    print(f"ezssh: pushing policy {args.policy}'s host setup through Azure Run Command (this takes a while)...",
          file=sys.stderr)
    _, data = Ctx().api.json("POST", f"/api/policies/{args.policy}/enrolments", body=body)
    recs = data.get("enrolments", [])
    if args.json:
        print(json.dumps(data, indent=2, sort_keys=True))
    elif recs:
        _table(recs)
    if not recs:
        print("ezssh: no VM matched; nothing was pushed.", file=sys.stderr)
        return OK
    for r in recs:
        if r.get("state") == "failed":
            print(f"\n{_vm_name(r['vm_id'])}: failed: {r.get('last_error')}", file=sys.stderr)
            if r.get("output_tail"):
                print("--- output (tail) ---\n" + r["output_tail"].rstrip() + "\n---", file=sys.stderr)
        elif r.get("state") in ("retrying", "pending"):
            print(f"{_vm_name(r['vm_id'])}: {r['state']}: {r.get('last_error') or 'queued'}; the service retries "
                  f"(see `ezssh hosts list --policy {args.policy}`).", file=sys.stderr)
    states = {r.get("state") for r in recs}
    if "failed" in states:
        return ERROR
    if states - {"succeeded"}:
        return UNAVAILABLE
    return OK


def cmd_hosts_list(args) -> int:  # noqa: ANN001
    from .cli import Ctx

    _, data = Ctx().api.json("GET", f"/api/policies/{args.policy}/enrolments")
    if args.json:
        print(json.dumps(data, indent=2, sort_keys=True))
        return OK
    recs = data.get("enrolments", [])
    if not recs:
        print(f"ezssh: no host is enrolled in policy {args.policy}.", file=sys.stderr)
        return OK
    _table(recs)
    return OK


def add_hosts_commands(sub) -> None:  # noqa: ANN001
    hosts = sub.add_parser("hosts", help="Azure VMs: push a policy's CA (Run Command) and list enrolments")
    hs = hosts.add_subparsers(dest="hosts_command", metavar="ACTION", required=True)
    c = hs.add_parser("enrol", help="push the policy's host setup script to a VM, or to the VMs of a resource "
                                    "group that carry a tag")
    c.add_argument("--policy", required=True, metavar="ID")
    c.add_argument("--vm", metavar="VM_ID", help="the VM's resource id")
    c.add_argument("--resource-group", metavar="RG", help="a resource group name or id")
    c.add_argument("--tag", metavar="NAME=VALUE", help="with --resource-group: only VMs with this tag")
    c.add_argument("--json", action="store_true", help="print the enrolment records as JSON")
    c.set_defaults(func=cmd_hosts_enrol)
    c = hs.add_parser("list", help="the policy's enrolments: state, attempts, last error")
    c.add_argument("--policy", required=True, metavar="ID")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_hosts_list)
