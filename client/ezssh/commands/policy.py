"""`ezssh policy ...`: create, list, show, update, delete access policies, rotate their CA, print their
CA keys and host setup script.

Every change is conditional on the policy's ETag (If-Match). A lost race (HTTP 412, or 409 on an
existing policy) ends with exit code 7 and changes nothing. Stdlib only at import time.
"""

from __future__ import annotations

import sys
from typing import Any

from ..context import Ctx
from ..durations import duration_arg, fmt_duration
from ..errors import CHANGED, ERROR, EXIT_CODES_HELP, OK, EzsshError
from ..output import err, fmt_time, out_json, print_table
from ..policydoc import document_from_flags, load_document, parse_set, render_policy, usage, you_roles


def _path(pid: str) -> str:
    from urllib.parse import quote

    return f"/api/policies/{quote(pid, safe='')}"


def _read(api, pid: str) -> tuple[dict, str]:
    resp = api.call("GET", _path(pid), ok=(200,))
    body = resp.json()
    return body, resp.headers.get("ETag") or body.get("etag") or ""


def lost_race(exc: EzsshError, pid: str, etag: str | None) -> EzsshError:
    """A 412 (or 409 on an existing policy): someone else changed it since it was read."""
    pinned = f" (ETag {etag})" if etag else ""
    return EzsshError(
        f"Policy {pid!r} was changed by someone else since it was read{pinned}; nothing was changed. "
        f"Look at the current version (`ezssh policy show {pid}`) and retry.",
        CHANGED,
        request_id=exc.request_id,
        error=exc.error,
    )


def _conditional(api, method: str, pid: str, etag: str, suffix: str = "", body: dict | None = None):
    try:
        return api.call(
            method, _path(pid) + suffix, body=body, headers={"If-Match": etag} if etag else None, ok=(200, 201, 204)
        )
    except EzsshError as exc:
        if exc.error in ("precondition_failed", "conflict"):
            raise lost_race(exc, pid, etag) from None
        raise


def cmd_create(args) -> int:
    doc: dict[str, Any] = {}
    if args.file:
        doc, _ = load_document(args.file)  # a copied policy's etag means nothing for a new one
    doc.update(document_from_flags(args))
    if not doc.get("id"):
        raise usage("A new policy needs an id: --id ID, or `id:` in the file.")
    ctx = Ctx()
    _, p = ctx.api.json("POST", "/api/policies", body=doc, ok=(201, 200))
    if args.json:
        out_json(p)
    ca: dict = next((c for c in p.get("ca") or [] if c.get("state") == "current"), {})
    err(
        f"Created policy {p.get('id')} ({p.get('name')}) with its own CA {ca.get('fingerprint', '?')}. "
        f"Hosts trust it with the lines from `ezssh policy ca {p.get('id')}`."
    )
    return OK


def cmd_list(args) -> int:
    _, data = Ctx().api.json("GET", "/api/policies")
    if args.json:
        out_json(data)
        return OK
    policies = data.get("policies") or []
    if not policies:
        err("You see no policies (you are neither an admin, member nor approver of any).")
        return OK
    rows = []
    for p in policies:
        actions = ",".join(dict.fromkeys(r.get("action", "?") for r in p.get("rules") or []))
        rows.append(
            (
                p.get("id", ""),
                (p.get("name") or "")[:40],
                ",".join(p.get("hosts") or [])[:40],
                ",".join(p.get("principals") or [])[:30],
                f"{len(p.get('rules') or [])} ({actions})",
                fmt_duration(p.get("max_ttl")),
                you_roles(p),
            )
        )
    print_table(("ID", "NAME", "HOSTS", "LOGINS", "RULES", "MAX TTL", "YOU"), rows)
    return OK


def cmd_show(args) -> int:
    p, _ = _read(Ctx().api, args.id)
    if args.json:
        out_json(p)
    else:
        sys.stdout.write(render_policy(p))
    return OK


def cmd_update(args) -> int:
    doc: dict[str, Any] = {}
    file_etag = None
    if args.file:
        doc, file_etag = load_document(args.file)
    doc.update(document_from_flags(args))
    for assignment in args.set or []:
        field, value = parse_set(assignment)
        doc[field] = value
    if not doc:
        raise usage("Nothing to change: give -f FILE, --set field=value or field flags (ezssh policy update --help).")
    if doc.get("id", args.id) != args.id:
        raise usage(f"A policy's id cannot change (the document says {doc['id']!r}, not {args.id!r}).")
    api = Ctx().api
    before = None
    etag = args.if_match or file_etag
    if not etag:
        before, etag = _read(api, args.id)
    p = _conditional(api, "PATCH", args.id, etag, body=doc).json()
    if args.json:
        out_json(p)
    if before is not None:
        changed = [k for k in doc if before.get(k) != p.get(k)]
        what = f"changed: {', '.join(changed)}" if changed else "nothing changed"
    else:
        what = f"fields sent: {', '.join(doc)}"
    err(f"Updated policy {args.id} ({what}); new ETag {p.get('etag')}.")
    return OK


def _confirm(question: str) -> bool:
    sys.stderr.write(question + " [y/N] ")
    sys.stderr.flush()
    try:
        answer = sys.stdin.readline()
    except (EOFError, OSError):
        return False
    return answer.strip().lower() in ("y", "yes")


def cmd_delete(args) -> int:
    interactive = sys.stdin.isatty() and sys.stderr.isatty()
    if not args.yes and not interactive:
        raise usage(f"Refusing to delete policy {args.id!r} without confirmation: pass --yes.")
    api = Ctx().api
    etag, name = args.if_match, args.id
    if not etag or not args.yes:
        p, current = _read(api, args.id)
        name, etag = p.get("name") or args.id, etag or current
    if not args.yes and not _confirm(
        f"Delete policy {args.id} ({name})? Issuance stops at once and its CA keys are disabled."
    ):
        err(f"Not deleted: policy {args.id} stays.")
        return ERROR
    _conditional(api, "DELETE", args.id, etag)
    if args.json:
        out_json({"id": args.id, "deleted": True})
    err(f"Deleted policy {args.id}: it issues no more certificates and its CA keys are disabled.")
    return OK


def cmd_rotate_ca(args) -> int:
    api = Ctx().api
    kind = "host_ca" if args.host else "ca"
    p = _conditional(
        api, "POST", args.id, args.if_match or "", suffix="/rotate-ca" + ("?kind=host" if args.host else "")
    ).json()
    trusted = [c for c in p.get(kind) or [] if c.get("state") == "current"] + [
        c for c in p.get(kind) or [] if c.get("state") == "previous"
    ]
    if args.json:
        out_json(p)
    else:
        sys.stdout.write("".join(c.get("public_key", "").strip() + "\n" for c in trusted))
    new = trusted[0] if trusted else {}
    prev = [f"{c.get('fingerprint')} (until {fmt_time(c.get('retire_after'))})" for c in trusted[1:]]
    if args.host:
        err(
            f"Rotated the host CA of policy {args.id}: new key {new.get('fingerprint', '?')} signs host certificates "
            "from now on"
            + (f"; still trusted: {', '.join(prev)}" if prev else "")
            + ". Clients pick the lines up with their next refresh (ezssh hosts trust)."
        )
        return OK
    err(
        f"Rotated the CA of policy {args.id}: new key {new.get('fingerprint', '?')} signs from now on"
        + (f"; still trusted: {', '.join(prev)}" if prev else "")
        + ". Give hosts all of these lines (`ezssh policy ca "
        + args.id
        + "`)."
    )
    return OK


# ---- parser ---------------------------------------------------------------------------------------

FLAGS_HELP = """\
rules, approvers and admins name subjects as user=<upn|object id|*> or group=<object id>:
  --rule auto:group=<id>               members of the group get certificates at once
  --rule approval:user=bob@contoso.com  bob's requests need approval
  --rule deny:user=*                   everyone else is refused (no matching rule denies too)
  Rules are tried in the order given; several subjects: --rule auto:user=a@x.com,group=<id>.
durations: seconds or 30m, 8h, 1h30m, 1d."""


def _add_field_flags(c, *, with_id: bool) -> None:
    g = c.add_argument_group("policy fields (on update, a flag replaces that whole field)")
    if with_id:
        g.add_argument("--id", dest="id_flag", metavar="ID", help="policy id: lowercase letters, digits, dashes")
    g.add_argument("--name", metavar="TEXT", help="display name")
    g.add_argument(
        "--host",
        action="append",
        metavar="PATTERN",
        help="host name glob, CIDR, tag:name=value or Azure resource id (repeatable)",
    )
    g.add_argument(
        "--principal",
        action="append",
        metavar="LOGIN",
        help="unix login allowed; {username} = the user's UPN local part (repeatable)",
    )
    g.add_argument(
        "--rule",
        action="append",
        metavar="ACTION:SUBJECTS",
        help="auto|approval|deny:user=..|group=.. (repeatable, first match wins)",
    )
    g.add_argument("--approver", action="append", metavar="SUBJECT", help="user=.. or group=.. (repeatable)")
    g.add_argument("--approvals-required", type=int, metavar="N", help="approvals a request needs (default 1)")
    g.add_argument("--admin", action="append", metavar="SUBJECT", help="policy admin: user=.. or group=.. (repeatable)")
    g.add_argument("--default-ttl", type=duration_arg, metavar="TTL", help="certificate lifetime by default")
    g.add_argument("--max-ttl", type=duration_arg, metavar="TTL", help="longest certificate lifetime")
    g.add_argument("--request-ttl", type=duration_arg, metavar="TTL", help="how long a request waits for approval")
    g.add_argument(
        "--extension", action="append", metavar="EXT", help="certificate extension, e.g. permit-pty (repeatable)"
    )
    g.add_argument("--force-command", metavar="CMD", help="force-command critical option")
    g.add_argument(
        "--source-address", action="append", metavar="CIDR", help="source-address critical option (repeatable)"
    )
    g.add_argument("--webhook-url", metavar="URL", help="Teams/Slack webhook for approval notices")
    g.add_argument("--webhook-format", choices=("teams", "slack"), help="webhook format (default: from the URL)")


def cmd_ca(args) -> int:
    resp = Ctx().api.call("GET", f"{_path(args.id)}/ca", params={"kind": "host"} if args.host else None, ok=(200,))
    text = resp.text if resp.text.endswith("\n") or not resp.text else resp.text + "\n"
    sys.stdout.write(text)
    return OK


def cmd_host_setup(args) -> int:
    resp = Ctx().api.call("GET", f"{_path(args.id)}/host-setup", ok=(200,))
    sys.stdout.write(resp.text)
    err(
        "ezssh: run this as root on the host (sh script.sh); it is idempotent. "
        "Sandbox: EZSSH_ROOT=/path or --root /path."
    )
    return OK


def register(sub, fmt) -> None:
    """`ezssh policy` and its actions."""
    epilog = EXIT_CODES_HELP
    pol = sub.add_parser("policy", help="create, list, show, update, delete access policies; their CA keys")
    ps = pol.add_subparsers(dest="policy_command", metavar="ACTION", required=True)
    c = ps.add_parser("ca", help="print the policy's CA public keys (one OpenSSH key per line)")
    c.add_argument("id", metavar="ID")
    c.add_argument("--host", action="store_true", help="the host CA (what clients trust hosts by) instead")
    c.set_defaults(func=cmd_ca)
    c = ps.add_parser("host-setup", help="print the setup script that makes a host trust the policy")
    c.add_argument("id", metavar="ID")
    c.set_defaults(func=cmd_host_setup)
    c = ps.add_parser(
        "create",
        help="create a policy (admins) from a YAML/JSON file and/or flags",
        formatter_class=fmt,
        epilog=FLAGS_HELP + "\n\n" + epilog,
    )
    c.add_argument(
        "-f", "--file", metavar="FILE", help="policy document, YAML or JSON; - reads stdin; flags override it"
    )
    _add_field_flags(c, with_id=True)
    c.add_argument("--json", action="store_true", help="print the created policy as JSON")
    c.set_defaults(func=cmd_create)

    c = ps.add_parser("list", help="policies you administer, belong to or approve for")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_list)

    c = ps.add_parser("show", help="one policy (readable view; --json for the full document with its ETag)")
    c.add_argument("id", metavar="ID")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_show)

    c = ps.add_parser(
        "update",
        help="change a policy (conditional on its ETag)",
        formatter_class=fmt,
        epilog="The policy is read first for its ETag (or the `etag` in FILE, or --if-match) and\n"
        "changed only if nobody changed it meanwhile; otherwise exit 7, nothing changed.\n"
        "--set takes any field: lists comma-separated (hosts=web*,10.0.0.0/8), subjects\n"
        "as for the flags (approvers=group=<id>), rules ';'-separated, or JSON; null clears.\n\n"
        + FLAGS_HELP
        + "\n\n"
        + epilog,
    )
    c.add_argument("id", metavar="ID")
    c.add_argument(
        "-f", "--file", metavar="FILE", help="fields to change, YAML or JSON (e.g. edited `show --json`); - reads stdin"
    )
    c.add_argument("--set", action="append", metavar="FIELD=VALUE", help="set one field (repeatable)")
    c.add_argument("--if-match", metavar="ETAG", help="change only if the policy still has this ETag")
    _add_field_flags(c, with_id=False)
    c.add_argument("--json", action="store_true", help="print the updated policy as JSON")
    c.set_defaults(func=cmd_update)

    c = ps.add_parser(
        "delete",
        help="delete a policy (tenant admins): issuance stops, its CA keys are disabled",
        formatter_class=fmt,
        epilog=epilog,
    )
    c.add_argument("id", metavar="ID")
    c.add_argument("-y", "--yes", action="store_true", help="do not ask (required without a terminal)")
    c.add_argument("--if-match", metavar="ETAG", help="delete only if the policy still has this ETag")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_delete)

    c = ps.add_parser(
        "rotate-ca",
        help="new CA key for a policy; the old one stays trusted until max_ttl passes",
        formatter_class=fmt,
        epilog="Prints the CA lines hosts should trust now (as `ezssh policy ca`).\n\n" + epilog,
    )
    c.add_argument("id", metavar="ID")
    c.add_argument("--if-match", metavar="ETAG", help="rotate only if the policy still has this ETag")
    c.add_argument("--host", action="store_true", help="rotate the host CA (signs host certificates) instead")
    c.add_argument("--json", action="store_true", help="print the policy as JSON instead of the CA lines")
    c.set_defaults(func=cmd_rotate_ca)
