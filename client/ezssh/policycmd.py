"""`ezssh policy ...`: create, list, show, update, delete and rotate the CA of access policies.

Standard library only at import time: PyYAML is loaded only to read a YAML file, requests/msal only
when a command talks to the service (through cli.Ctx).

Every change is conditional on the policy's ETag (If-Match). A lost race (HTTP 412, or 409 on an
existing policy) ends with exit code 7 and changes nothing.
"""

from __future__ import annotations

import json
import re
import sys
import time
from typing import Any

from .errors import CHANGED, ERROR, OK, USAGE, EzsshError

# Fields an admin may write (the service's own list is authoritative and rejects the rest).
EDITABLE_FIELDS = (
    "id", "name", "rules", "hosts", "principals", "approvers", "approvals_required", "admins",
    "default_ttl", "max_ttl", "request_ttl", "extensions", "force_command", "source_address",
    "webhook_url", "webhook_format",
)
# What `policy show --json` adds that the service sets itself: dropped from documents read with -f.
READ_ONLY_FIELDS = ("etag", "you", "ca", "tenant_id", "deleted", "host_token")
TTL_FIELDS = ("default_ttl", "max_ttl", "request_ttl")
LIST_FIELDS = ("hosts", "principals", "extensions", "source_address")
SUBJECT_FIELDS = ("approvers", "admins")
STRING_FIELDS = ("name", "force_command", "webhook_url", "webhook_format")
ACTIONS = ("auto", "approval", "deny")
SUBJECT_KINDS = {"user": "users", "users": "users", "group": "groups", "groups": "groups"}

_TTL_RE = re.compile(r"(\d+)([dhms]?)")
_UNIT = {"d": 86400, "h": 3600, "m": 60, "s": 1, "": 1}


def usage(msg: str) -> EzsshError:
    return EzsshError(msg, USAGE)


# ---- value parsing (also used as argparse `type=` functions) -------------------------------------


def parse_ttl(text: str | int) -> int:
    """Seconds from `3600`, `90s`, `30m`, `8h`, `1d` or a combination such as `1h30m`."""
    if isinstance(text, bool):
        raise ValueError("a duration is not true/false")
    if isinstance(text, int):
        if text <= 0:
            raise ValueError(f"duration {text} must be positive")
        return text
    s = str(text).strip().lower()
    pos, total, units = 0, 0, []
    for m in _TTL_RE.finditer(s):
        if m.start() != pos:
            break
        pos = m.end()
        if m.group(2) in units or (not m.group(2) and units):
            raise ValueError(f"{text!r} is not a duration")
        units.append(m.group(2))
        total += int(m.group(1)) * _UNIT[m.group(2)]
    if not s or pos != len(s) or ("" in units and len(units) > 1):
        raise ValueError(f"{text!r} is not a duration: use seconds or e.g. 30m, 8h, 1h30m, 1d")
    if total <= 0:
        raise ValueError(f"duration {text!r} must be positive")
    return total


def ttl_arg(text: str) -> int:
    import argparse

    try:
        return parse_ttl(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def fmt_ttl(seconds: Any) -> str:
    if not isinstance(seconds, int) or isinstance(seconds, bool) or seconds <= 0:
        return str(seconds)
    out = ""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size:
            out += f"{seconds // size}{unit}"
            seconds %= size
    return out


def _split(values: list[str] | str | None, sep: str = ",") -> list[str]:
    if values is None:
        return []
    if isinstance(values, str):
        values = [values]
    return [v.strip() for item in values for v in item.split(sep) if v.strip()]


def parse_subject(spec: str) -> tuple[str, str]:
    """`user=<upn|oid|*>` or `group=<object id>` -> ("users"|"groups", value). A bare value containing
    `@`, or `*`, is a user."""
    spec = spec.strip()
    kind, sep, value = spec.partition("=")
    if sep and kind.strip().lower() in SUBJECT_KINDS:
        value = value.strip()
        if not value:
            raise usage(f"{spec!r}: nothing after '='.")
        return SUBJECT_KINDS[kind.strip().lower()], value
    if not sep and ("@" in spec or spec == "*"):
        return "users", spec
    raise usage(f"{spec!r} is not a user or group: write user=<upn|object id|*> or group=<object id>.")


def parse_subjects(specs: list[str] | str | None) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {"users": [], "groups": []}
    for spec in _split(specs):
        kind, value = parse_subject(spec)
        if value not in out[kind]:
            out[kind].append(value)
    return out


def parse_rule(spec: str) -> dict:
    """`ACTION:SUBJECT[,SUBJECT...]`, e.g. `auto:group=<id>`, `approval:user=bob@contoso.com,user=carol@...`."""
    action, sep, rest = spec.partition(":")
    action = action.strip().lower()
    if not sep or action not in ACTIONS:
        raise usage(f"Rule {spec!r}: write ACTION:SUBJECT[,SUBJECT...] with ACTION one of "
                    f"{', '.join(ACTIONS)}, e.g. auto:group=<object id> or approval:user=bob@contoso.com.")
    subjects = parse_subjects(rest)
    if not subjects["users"] and not subjects["groups"]:
        raise usage(f"Rule {spec!r} names no users or groups.")
    return {**{k: v for k, v in subjects.items() if v}, "action": action}


def _json_or_none(text: str, opener: str) -> Any:
    if text.lstrip().startswith(opener):
        try:
            return json.loads(text)
        except ValueError as exc:
            raise usage(f"{text!r} is not valid JSON: {exc}.") from None
    return None


def parse_set(assignment: str) -> tuple[str, Any]:
    """`field=value` for `policy update --set`, typed by field (TTLs accept 8h; lists are comma-separated)."""
    field, sep, value = assignment.partition("=")
    field = field.strip().replace("-", "_")
    if not sep or not field:
        raise usage(f"--set {assignment!r}: write field=value (fields: {', '.join(EDITABLE_FIELDS)}).")
    if field == "id":
        raise usage("A policy's id cannot change.")
    if field in READ_ONLY_FIELDS:
        raise usage(f"{field!r} is set by the service, not by --set.")
    raw = value.strip()
    if field in TTL_FIELDS or field == "approvals_required":
        try:
            return field, (parse_ttl(raw) if field in TTL_FIELDS else int(raw))
        except ValueError as exc:
            raise usage(f"--set {field}: {exc}.") from None
    if field in STRING_FIELDS:
        return field, None if raw in ("", "null") else value
    if field in LIST_FIELDS:
        parsed = _json_or_none(raw, "[")
        return field, parsed if parsed is not None else _split(raw)
    if field in SUBJECT_FIELDS:
        parsed = _json_or_none(raw, "{")
        return field, parsed if parsed is not None else {k: v for k, v in parse_subjects(raw).items() if v}
    if field == "rules":
        parsed = _json_or_none(raw, "[")
        return field, parsed if parsed is not None else [parse_rule(r) for r in _split(raw, ";")]
    # A field this client does not know (a newer service): JSON if it parses, else the string.
    try:
        return field, json.loads(raw)
    except ValueError:
        return field, value


# ---- documents ---------------------------------------------------------------------------------


def load_document(path: str) -> tuple[dict, str | None]:
    """Read a policy document (YAML or JSON; `-` is stdin). Returns (editable fields, etag found in it).

    Fields the service sets itself (as `policy show --json` prints them) are dropped; TTL fields may be
    written as durations (`8h`)."""
    if path == "-":
        text, name = sys.stdin.read(), "stdin"
    else:
        from pathlib import Path

        p = Path(path).expanduser()
        try:
            text = p.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise usage(f"Cannot read {p}: {getattr(exc, 'strerror', None) or exc}.") from None
        name = str(p)
    doc: Any
    if name.endswith(".json"):
        try:
            doc = json.loads(text)
        except ValueError as exc:
            raise usage(f"{name} is not valid JSON: {exc}.") from None
    else:
        try:
            doc = json.loads(text)
        except ValueError:
            doc = _load_yaml(text, name)
    if not isinstance(doc, dict):
        raise usage(f"{name} must hold one policy: a mapping of fields (id, name, rules, hosts, ...).")
    etag = doc.get("etag") if isinstance(doc.get("etag"), str) else None
    doc = {k: v for k, v in doc.items() if k not in READ_ONLY_FIELDS}
    for f in TTL_FIELDS:
        if isinstance(doc.get(f), str):
            try:
                doc[f] = parse_ttl(doc[f])
            except ValueError as exc:
                raise usage(f"{name}: {f}: {exc}.") from None
    return doc, etag


def _load_yaml(text: str, name: str) -> Any:
    try:
        import yaml
    except ImportError:
        raise usage(f"{name} is not JSON, and reading YAML needs PyYAML (pip install PyYAML).") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise usage(f"{name} is neither valid JSON nor valid YAML: {exc}") from None


def document_from_flags(args) -> dict:
    """The fields given as flags (create and update share them; on update a list flag replaces the list)."""
    doc: dict[str, Any] = {}
    if getattr(args, "id_flag", None):
        doc["id"] = args.id_flag
    if args.name is not None:
        doc["name"] = args.name
    if args.rule:
        doc["rules"] = [parse_rule(r) for r in args.rule]
    for field, values in (("hosts", args.host), ("principals", args.principal),
                          ("extensions", args.extension), ("source_address", args.source_address)):
        if values:
            doc[field] = _split(values)
    for field, values in (("approvers", args.approver), ("admins", args.admin)):
        if values:
            doc[field] = {k: v for k, v in parse_subjects(values).items() if v}
    for field in ("approvals_required", "default_ttl", "max_ttl", "request_ttl", "force_command",
                  "webhook_url", "webhook_format"):
        value = getattr(args, field)
        if value is not None:
            doc[field] = value
    return doc


# ---- rendering ------------------------------------------------------------------------------------


def _ts(t: Any) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(t)) if isinstance(t, (int, float)) and t else "-"


def fmt_subjects(s: dict | None) -> list[str]:
    s = s or {}
    return [f"user={u}" for u in s.get("users") or []] + [f"group={g}" for g in s.get("groups") or []]


def fmt_rule(r: dict) -> str:
    return f"{r.get('action')}:{','.join(fmt_subjects(r))}"


def _you(p: dict) -> str:
    you = p.get("you") or {}
    return ",".join(k for k in ("admin", "approver", "member") if you.get(k)) or "-"


def render_policy(p: dict) -> str:
    """A YAML-like view for people (the subjects and rules in the same syntax as the flags)."""
    lines: list[str] = []

    def scalar(key: str, value: Any) -> None:
        lines.append(f"{key}: {'-' if value in (None, '') else value}")

    def items(key: str, values: list[str]) -> None:
        if not values:
            lines.append(f"{key}: []")
            return
        lines.append(f"{key}:")
        lines.extend(f"  - {v}" for v in values)

    scalar("id", p.get("id"))
    scalar("name", p.get("name"))
    scalar("etag", p.get("etag"))
    scalar("you", _you(p))
    items("hosts", list(p.get("hosts") or []))
    items("principals", list(p.get("principals") or []))
    items("rules", [fmt_rule(r) for r in p.get("rules") or []])
    items("approvers", fmt_subjects(p.get("approvers")))
    scalar("approvals_required", p.get("approvals_required"))
    items("admins", fmt_subjects(p.get("admins")))
    for f in TTL_FIELDS:
        v = p.get(f)
        scalar(f, f"{fmt_ttl(v)} ({v} s)" if isinstance(v, int) else v)
    items("extensions", list(p.get("extensions") or []))
    scalar("force_command", p.get("force_command"))
    items("source_address", list(p.get("source_address") or []))
    scalar("webhook_url", p.get("webhook_url"))
    if p.get("webhook_url"):
        scalar("webhook_format", p.get("webhook_format") or "guess from the URL")
    cas = []
    for c in p.get("ca") or []:
        when = f"created {_ts(c.get('created_at'))}"
        if c.get("state") == "previous" and c.get("retire_after"):
            when += f", trusted until {_ts(c.get('retire_after'))}"
        cas.append(f"{c.get('state', '?'):8}  {c.get('fingerprint', '?')}  ({when})")
    items("ca", cas)
    return "\n".join(lines) + "\n"


def print_table(cols: tuple[str, ...], rows: list[tuple]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(cols, *rows)]
    for row in (cols, *rows):
        print("  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip())


# ---- commands -------------------------------------------------------------------------------------


def _ctx():
    from .cli import Ctx

    return Ctx()


def _err(msg: str) -> None:
    sys.stderr.write(msg + "\n")
    sys.stderr.flush()


def _out_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True) + "\n")
    sys.stdout.flush()


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
        CHANGED, request_id=exc.request_id, error=exc.error)


def _conditional(api, method: str, pid: str, etag: str, suffix: str = "", body: dict | None = None):
    try:
        return api.call(method, _path(pid) + suffix, body=body, headers={"If-Match": etag} if etag else None,
                        ok=(200, 201, 204))
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
    ctx = _ctx()
    _, p = ctx.api.json("POST", "/api/policies", body=doc, ok=(201, 200))
    if args.json:
        _out_json(p)
    ca = next((c for c in p.get("ca") or [] if c.get("state") == "current"), {})
    _err(f"Created policy {p.get('id')} ({p.get('name')}) with its own CA {ca.get('fingerprint', '?')}. "
         f"Hosts trust it with the lines from `ezssh policy ca {p.get('id')}`.")
    return OK


def cmd_list(args) -> int:
    _, data = _ctx().api.json("GET", "/api/policies")
    if args.json:
        _out_json(data)
        return OK
    policies = data.get("policies") or []
    if not policies:
        _err("You see no policies (you are neither an admin, member nor approver of any).")
        return OK
    rows = []
    for p in policies:
        actions = ",".join(dict.fromkeys(r.get("action", "?") for r in p.get("rules") or []))
        rows.append((p.get("id", ""), (p.get("name") or "")[:40], ",".join(p.get("hosts") or [])[:40],
                     ",".join(p.get("principals") or [])[:30], f"{len(p.get('rules') or [])} ({actions})",
                     fmt_ttl(p.get("max_ttl")), _you(p)))
    print_table(("ID", "NAME", "HOSTS", "LOGINS", "RULES", "MAX TTL", "YOU"), rows)
    return OK


def cmd_show(args) -> int:
    p, _ = _read(_ctx().api, args.id)
    if args.json:
        _out_json(p)
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
    api = _ctx().api
    before = None
    etag = args.if_match or file_etag
    if not etag:
        before, etag = _read(api, args.id)
    p = _conditional(api, "PATCH", args.id, etag, body=doc).json()
    if args.json:
        _out_json(p)
    if before is not None:
        changed = [k for k in doc if before.get(k) != p.get(k)]
        what = f"changed: {', '.join(changed)}" if changed else "nothing changed"
    else:
        what = f"fields sent: {', '.join(doc)}"
    _err(f"Updated policy {args.id} ({what}); new ETag {p.get('etag')}.")
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
    api = _ctx().api
    etag, name = args.if_match, args.id
    if not etag or not args.yes:
        p, current = _read(api, args.id)
        name, etag = p.get("name") or args.id, etag or current
    if not args.yes and not _confirm(
            f"Delete policy {args.id} ({name})? Issuance stops at once and its CA keys are disabled."):
        _err(f"Not deleted: policy {args.id} stays.")
        return ERROR
    _conditional(api, "DELETE", args.id, etag)
    if args.json:
        _out_json({"id": args.id, "deleted": True})
    _err(f"Deleted policy {args.id}: it issues no more certificates and its CA keys are disabled.")
    return OK


def cmd_rotate_ca(args) -> int:
    api = _ctx().api
    p = _conditional(api, "POST", args.id, args.if_match or "", suffix="/rotate-ca").json()
    trusted = [c for c in p.get("ca") or [] if c.get("state") == "current"] + \
              [c for c in p.get("ca") or [] if c.get("state") == "previous"]
    if args.json:
        _out_json(p)
    else:
        sys.stdout.write("".join(c.get("public_key", "").strip() + "\n" for c in trusted))
    new = trusted[0] if trusted else {}
    prev = [f"{c.get('fingerprint')} (until {_ts(c.get('retire_after'))})" for c in trusted[1:]]
    _err(f"Rotated the CA of policy {args.id}: new key {new.get('fingerprint', '?')} signs from now on"
         + (f"; still trusted: {', '.join(prev)}" if prev else "") +
         ". Give hosts all of these lines (`ezssh policy ca " + args.id + "`).")
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
    g.add_argument("--host", action="append", metavar="PATTERN",
                   help="host name glob, CIDR, tag:name=value or Azure resource id (repeatable)")
    g.add_argument("--principal", action="append", metavar="LOGIN",
                   help="unix login allowed; {username} = the user's UPN local part (repeatable)")
    g.add_argument("--rule", action="append", metavar="ACTION:SUBJECTS",
                   help="auto|approval|deny:user=..|group=.. (repeatable, first match wins)")
    g.add_argument("--approver", action="append", metavar="SUBJECT", help="user=.. or group=.. (repeatable)")
    g.add_argument("--approvals-required", type=int, metavar="N", help="approvals a request needs (default 1)")
    g.add_argument("--admin", action="append", metavar="SUBJECT",
                   help="policy admin: user=.. or group=.. (repeatable)")
    g.add_argument("--default-ttl", type=ttl_arg, metavar="TTL", help="certificate lifetime by default")
    g.add_argument("--max-ttl", type=ttl_arg, metavar="TTL", help="longest certificate lifetime")
    g.add_argument("--request-ttl", type=ttl_arg, metavar="TTL", help="how long a request waits for approval")
    g.add_argument("--extension", action="append", metavar="EXT",
                   help="certificate extension, e.g. permit-pty (repeatable)")
    g.add_argument("--force-command", metavar="CMD", help="force-command critical option")
    g.add_argument("--source-address", action="append", metavar="CIDR",
                   help="source-address critical option (repeatable)")
    g.add_argument("--webhook-url", metavar="URL", help="Teams/Slack webhook for approval notices")
    g.add_argument("--webhook-format", choices=("teams", "slack"), help="webhook format (default: from the URL)")


def add_policy_commands(ps, fmt, epilog: str) -> None:
    """Register create/list/show/update/delete/rotate-ca under `ezssh policy`."""
    c = ps.add_parser("create", help="create a policy (admins) from a YAML/JSON file and/or flags",
                      formatter_class=fmt, epilog=FLAGS_HELP + "\n\n" + epilog)
    c.add_argument("-f", "--file", metavar="FILE", help="policy document, YAML or JSON; - reads stdin; flags override it")
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

    c = ps.add_parser("update", help="change a policy (conditional on its ETag)", formatter_class=fmt,
                      epilog="The policy is read first for its ETag (or the `etag` in FILE, or --if-match) and\n"
                             "changed only if nobody changed it meanwhile; otherwise exit 7, nothing changed.\n"
                             "--set takes any field: lists comma-separated (hosts=web*,10.0.0.0/8), subjects\n"
                             "as for the flags (approvers=group=<id>), rules ';'-separated, or JSON; null clears.\n\n"
                             + FLAGS_HELP + "\n\n" + epilog)
    c.add_argument("id", metavar="ID")
    c.add_argument("-f", "--file", metavar="FILE", help="fields to change, YAML or JSON (e.g. edited `show --json`); - reads stdin")
    c.add_argument("--set", action="append", metavar="FIELD=VALUE", help="set one field (repeatable)")
    c.add_argument("--if-match", metavar="ETAG", help="change only if the policy still has this ETag")
    _add_field_flags(c, with_id=False)
    c.add_argument("--json", action="store_true", help="print the updated policy as JSON")
    c.set_defaults(func=cmd_update)

    c = ps.add_parser("delete", help="delete a policy (tenant admins): issuance stops, its CA keys are disabled",
                      formatter_class=fmt, epilog=epilog)
    c.add_argument("id", metavar="ID")
    c.add_argument("-y", "--yes", action="store_true", help="do not ask (required without a terminal)")
    c.add_argument("--if-match", metavar="ETAG", help="delete only if the policy still has this ETag")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_delete)

    c = ps.add_parser("rotate-ca", help="new CA key for a policy; the old one stays trusted until max_ttl passes",
                      formatter_class=fmt, epilog="Prints the CA lines hosts should trust now (as `ezssh policy ca`).\n\n" + epilog)
    c.add_argument("id", metavar="ID")
    c.add_argument("--if-match", metavar="ETAG", help="rotate only if the policy still has this ETag")
    c.add_argument("--json", action="store_true", help="print the policy as JSON instead of the CA lines")
    c.set_defaults(func=cmd_rotate_ca)
