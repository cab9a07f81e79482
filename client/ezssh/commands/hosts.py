"""`ezssh hosts enrol`, `ezssh hosts job` and `ezssh hosts list`: push a policy's CA to Azure VMs, and
see how it went; `ezssh hosts token` and `ezssh hosts trust`: host certificates.

    ezssh hosts enrol --policy ID --vm /subscriptions/<id>/resourceGroups/<rg>/providers/Microsoft.Compute/virtualMachines/<vm>
    ezssh hosts enrol --policy ID --resource-group RG --tag ezssh=yes [--no-wait] [--wait SECONDS]
    ezssh hosts job --policy ID JOB_ID [--wait SECONDS]
    ezssh hosts list --policy ID [--json]
    ezssh hosts token [--policy ID] [--ttl DURATION] NAME...   a one-time host enrolment token (admins)
    ezssh hosts trust                                          refresh the host CAs ssh checks hosts with
    ezssh hosts namespaces [--replace NAMESPACE...]            where the tenant's hosts live (set: tenant admins)

The service queues a job and answers at once; `enrol` follows the job (up to --wait seconds, 600 by
default) and exits 0 when every VM named succeeded, 1 when one failed (its output tail is shown), and
6 when some are still queued, running or being retried (follow them with `ezssh hosts job`).
"""

from __future__ import annotations

import time

from ..context import Ctx
from ..errors import ERROR, OK, UNAVAILABLE, USAGE, EzsshError
from ..output import err, fmt_time, out_json, print_table
from .requests import _page_size

COLUMNS = ("VM", "STATE", "ATTEMPTS", "UPDATED", "NEXT TRY", "ERROR")


def _vm_name(vm_id: str) -> str:
    parts = vm_id.split("/")
    return f"{parts[4]}/{parts[8]}" if len(parts) >= 9 else vm_id


def _table(recs: list[dict]) -> None:
    print_table(
        COLUMNS,
        [
            (
                _vm_name(r.get("vm_id", "")),
                r.get("state", ""),
                r.get("attempts", 0),
                fmt_time(r.get("updated_at")),
                fmt_time(r.get("next_attempt_at")),
                (r.get("last_error") or "")[:100],
            )
            for r in recs
        ],
    )


def _follow(args, data: dict) -> dict:
    """GET the job until it is done or --wait seconds have passed."""
    deadline = time.monotonic() + max(0, args.wait)
    path = f"/api/policies/{args.policy}/enrolment-jobs/{data['job']['id']}"
    while not data["job"].get("done") and time.monotonic() < deadline:
        time.sleep(1)
        _, data = Ctx().api.json("GET", path)
    return data


def _report(args, data: dict) -> int:
    items = data.get("items", [])
    if args.json:
        out_json(data)
    elif items:
        _table(items)
    if not items:
        err("ezssh: no VM matched; nothing was pushed.")
        return OK
    job = data["job"]
    for r in items:
        if r.get("state") == "failed":
            err(f"\n{_vm_name(r['vm_id'])}: failed: {r.get('last_error')}")
            if r.get("output_tail"):
                err("--- output (tail) ---\n" + r["output_tail"].rstrip() + "\n---")
        elif r.get("state") != "succeeded":
            err(f"{_vm_name(r['vm_id'])}: {r['state']}: {r.get('last_error') or 'waiting for a worker'}")
    if not job.get("done"):
        err(
            f"ezssh: job {job['id']} is still {job['state']}; follow it with "
            f"`ezssh hosts job --policy {args.policy} {job['id']}`."
        )
        return UNAVAILABLE
    return ERROR if job.get("state") == "failed" else OK


def cmd_enrol(args) -> int:
    if bool(args.vm) == bool(args.resource_group):
        raise EzsshError("Give --vm VM_ID, or --resource-group RG with --tag NAME=VALUE.", USAGE)
    if args.resource_group and (not args.tag or "=" not in args.tag):
        raise EzsshError("--resource-group needs --tag NAME=VALUE.", USAGE)
    if args.vm and args.tag:
        raise EzsshError("--tag goes with --resource-group, not with --vm.", USAGE)
    body = {"vm_id": args.vm} if args.vm else {"resource_group": args.resource_group, "tag": args.tag}
    _, data = Ctx().api.json("POST", f"/api/policies/{args.policy}/enrolments", body=body)
    if data.get("items") and not args.no_wait:
        err(
            f"ezssh: job {data['job']['id']} queued for {len(data['items'])} VM(s); pushing the host setup through "
            "Azure Run Command (this takes a while)..."
        )
        data = _follow(args, data)
    return _report(args, data)


def cmd_job(args) -> int:
    _, data = Ctx().api.json("GET", f"/api/policies/{args.policy}/enrolment-jobs/{args.job_id}")
    return _report(args, _follow(args, data))


def cmd_list(args) -> int:
    recs, token = Ctx().api.pages(
        f"/api/policies/{args.policy}/enrolments", "enrolments", {"limit": str(args.limit)}, follow=args.all
    )
    if args.json:
        out_json({"enrolments": recs, "next": token})
        return OK
    if not recs and not token:
        err(f"ezssh: no host is enrolled in policy {args.policy}.")
        return OK
    _table(recs)
    if token:
        err("ezssh: more hosts follow; add --all for every page (or --limit N for bigger pages).")
    return OK


def cmd_token(args) -> int:
    """Mint a one-time enrolment token bound to the named hosts; print it (stdout) and how to use it."""
    from ..durations import parse_duration

    ctx = Ctx()
    policy = args.policy
    if not policy:
        _, data = ctx.api.json("GET", "/api/policies")
        mine = [p["id"] for p in data.get("policies", []) if (p.get("you") or {}).get("admin")]
        if len(mine) != 1:
            raise EzsshError(
                "Name the policy with --policy ID" + (f" (you administer: {', '.join(mine)})." if mine else "."), USAGE
            )
        policy = mine[0]
    body: dict = {"hosts": list(args.names)}
    if args.ttl:
        body["ttl_seconds"] = parse_duration(args.ttl)
    _, tok = ctx.api.json("POST", f"/api/policies/{policy}/host-tokens", body=body)
    if args.json:
        out_json(tok)
        return OK
    print(tok["token"])
    err(
        f"ezssh: a one-time token for {', '.join(tok['hosts'])} (policy {policy}), valid until "
        f"{fmt_time(tok['expires_at'])}. On that host, as root:\n"
        f"  ezssh policy host-setup {policy} > setup.sh   (or GET /api/policies/{policy}/host-setup)\n"
        f"  EZSSH_ENROL_TOKEN=<the token> sh setup.sh\n"
        "It gets host certificates for the host's own keys; they renew on their own."
    )
    return OK


def cmd_trust(args) -> int:
    from .. import knownhosts
    from ..home import home_dir

    home = home_dir()
    n = knownhosts.refresh(Ctx().api, home)
    known, krl = knownhosts.paths(home)
    if args.json:
        out_json({"known_hosts": str(known), "krl": str(krl), "host_cas": n})
    err(f"ezssh: {n} host CA line{'s' if n != 1 else ''} in {known}; revoked host certificates in {krl}.")
    # what the service could not write exactly (or at all) is left out, and it says why in comments
    for line in known.read_text().splitlines() if known.exists() else []:
        if line.startswith("# ezssh: ") and not line.startswith("# ezssh: host CAs of"):
            err(line[2:])
    return OK


def cmd_namespaces(args) -> int:
    """The tenant's host namespaces (host certificates name only hosts inside them); `--replace` replaces
    them (tenant admins), conditional on the ETag just read."""
    ctx = Ctx()
    resp = ctx.api.call("GET", "/api/host-namespaces")
    data = resp.json()
    if args.replace is not None:
        etag = resp.headers.get("etag")
        _, data = ctx.api.json(
            "PUT",
            "/api/host-namespaces",
            body={"namespaces": list(args.replace)},
            headers={"If-Match": etag} if etag else None,
        )
        err(f"ezssh: the tenant's host namespaces are now {', '.join(data['namespaces']) or '(none)'}.")
    if args.json:
        out_json(data)
        return OK
    for ns in data["namespaces"]:
        print(ns)
    if not data["namespaces"]:
        err(
            "ezssh: your tenant has declared no host namespaces: no host certificate is issued, and no host CA "
            "trusted, until a tenant admin sets them (ezssh hosts namespaces --replace '*.contoso.internal' ...)."
        )
    elif data.get("source") == "setting":
        err("ezssh: (from the deployment's setting; a tenant admin may replace them with --replace)")
    return OK


def register(sub, fmt) -> None:
    hosts = sub.add_parser(
        "hosts", help="Azure VMs: push a policy's CA (Run Command) and list enrolments; host certificates"
    )
    hs = hosts.add_subparsers(dest="hosts_command", metavar="ACTION", required=True)
    c = hs.add_parser(
        "enrol", help="push the policy's host setup script to a VM, or to the VMs of a resource group that carry a tag"
    )
    c.add_argument("--policy", required=True, metavar="ID")
    c.add_argument("--vm", metavar="VM_ID", help="the VM's resource id")
    c.add_argument("--resource-group", metavar="RG", help="a resource group name or id")
    c.add_argument("--tag", metavar="NAME=VALUE", help="with --resource-group: only VMs with this tag")
    c.add_argument("--json", action="store_true", help="print the job as JSON")
    c.add_argument("--no-wait", action="store_true", help="print the queued job and return")
    c.add_argument("--wait", type=int, default=600, metavar="SECONDS", help="follow the job this long (600)")
    c.set_defaults(func=cmd_enrol)
    c = hs.add_parser("job", help="an enrolment job: each VM's state, attempts, last error")
    c.add_argument("--policy", required=True, metavar="ID")
    c.add_argument("job_id", metavar="JOB_ID")
    c.add_argument(
        "--wait", type=int, default=0, metavar="SECONDS", help="follow the job until done, at most this long"
    )
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_job)
    c = hs.add_parser("list", help="the policy's enrolments: state, attempts, last error")
    c.add_argument("--policy", required=True, metavar="ID")
    c.add_argument("--limit", type=_page_size, default=100, metavar="N", help="hosts a page (1-1000, default 100)")
    c.add_argument("--all", action="store_true", help="every page, not only the first")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_list)
    c = hs.add_parser(
        "token",
        help="mint a one-time enrolment token for named hosts (policy admins)",
        description="The host presents the token and its public host keys (the setup script does,\n"
        "with EZSSH_ENROL_TOKEN) and gets host certificates naming exactly these hosts.",
    )
    c.add_argument("names", nargs="+", metavar="NAME", help="host names or IP addresses inside the policy's hosts")
    c.add_argument("--policy", metavar="ID", help="the policy (default: the one you administer)")
    c.add_argument("--ttl", metavar="DURATION", help="how long the token stays valid (default 1h)")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_token)
    c = hs.add_parser("trust", help="refresh the host CAs and host revocations ssh checks hosts with")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_trust)
    c = hs.add_parser(
        "namespaces",
        help="where the tenant's hosts live: host certificates name only hosts inside",
        description="DNS suffixes (*.contoso.internal), host names and IP ranges (10.20.0.0/16). A host\n"
        "certificate names only hosts inside them and inside its policy's host patterns,\n"
        "and clients trust each policy's host CA for exactly that. --replace: tenant admins.",
    )
    c.add_argument("--replace", nargs="+", metavar="NAMESPACE", help="replace them (tenant admins)")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_namespaces)
