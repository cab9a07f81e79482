"""Policy documents: the fields an admin writes, parsed from flags, `--set` and YAML/JSON files, and a
readable rendering. Stdlib only at import time (PyYAML loads only to read a YAML file)."""

from __future__ import annotations

import json
import sys
from typing import Any

from .durations import fmt_duration, parse_duration
from .errors import USAGE, EzsshError
from .output import fmt_time

# Fields an admin may write (the service's own list is authoritative and rejects the rest).
EDITABLE_FIELDS = (
    "id",
    "name",
    "rules",
    "hosts",
    "principals",
    "logins",
    "approvers",
    "approvals_required",
    "admins",
    "default_ttl",
    "max_ttl",
    "request_ttl",
    "extensions",
    "force_command",
    "source_address",
    "webhook_url",
    "webhook_format",
    "host_cert_ttl",
)
# What `policy show --json` adds that the service sets itself: dropped from documents read with -f.
READ_ONLY_FIELDS = ("etag", "you", "ca", "host_ca", "tenant_id", "deleted", "host_token")
TTL_FIELDS = ("default_ttl", "max_ttl", "request_ttl", "host_cert_ttl")
LIST_FIELDS = ("hosts", "principals", "extensions", "source_address")
SUBJECT_FIELDS = ("approvers", "admins")
STRING_FIELDS = ("name", "force_command", "webhook_url", "webhook_format")
ACTIONS = ("auto", "approval", "deny")
SUBJECT_KINDS = {"user": "users", "users": "users", "group": "groups", "groups": "groups"}


def usage(msg: str) -> EzsshError:
    return EzsshError(msg, USAGE)


# ---- value parsing -------------------------------------------------------------------------------


def _split(values: list[str] | str | None, sep: str = ",") -> list[str]:
    if values is None:
        return []
    if isinstance(values, str):
        values = [values]
    return [v.strip() for item in values for v in item.split(sep) if v.strip()]


def parse_subject(spec: str) -> tuple[str, str]:
    """`user=<object id|*>` or `group=<object id>` -> ("users"|"groups", value). A bare value containing
    `@`, or `*`, is a user (the service refuses UPNs with a message saying how to find the object id)."""
    spec = spec.strip()
    kind, sep, value = spec.partition("=")
    if sep and kind.strip().lower() in SUBJECT_KINDS:
        value = value.strip()
        if not value:
            raise usage(f"{spec!r}: nothing after '='.")
        return SUBJECT_KINDS[kind.strip().lower()], value
    if not sep and ("@" in spec or spec == "*"):
        return "users", spec
    raise usage(f"{spec!r} is not a user or group: write user=<object id|*> or group=<object id>.")


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
        raise usage(
            f"Rule {spec!r}: write ACTION:SUBJECT[,SUBJECT...] with ACTION one of "
            f"{', '.join(ACTIONS)}, e.g. auto:group=<object id> or approval:user=bob@contoso.com."
        )
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
            return field, (parse_duration(raw) if field in TTL_FIELDS else int(raw))
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
                doc[f] = parse_duration(doc[f])
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
    for field, values in (
        ("hosts", args.host),
        ("principals", args.principal),
        ("extensions", args.extension),
        ("source_address", args.source_address),
    ):
        if values:
            doc[field] = _split(values)
    for field, values in (("approvers", args.approver), ("admins", args.admin)):
        if values:
            doc[field] = {k: v for k, v in parse_subjects(values).items() if v}
    for field in (
        "approvals_required",
        "default_ttl",
        "max_ttl",
        "request_ttl",
        "force_command",
        "webhook_url",
        "webhook_format",
    ):
        value = getattr(args, field)
        if value is not None:
            doc[field] = value
    return doc


# ---- rendering ------------------------------------------------------------------------------------


def fmt_subjects(s: dict | None, names: dict | None = None) -> list[str]:
    """`user=...`/`group=...` as the flags take them; a group's display name, where known, as a comment."""
    s = s or {}
    return [f"user={u}" for u in s.get("users") or []] + [
        f"group={g}" + (f"  # {names[g]}" if isinstance(names, dict) and names.get(g) else "")
        for g in s.get("groups") or []
    ]


def fmt_rule(r: dict) -> str:
    return f"{r.get('action')}:{','.join(fmt_subjects(r))}"


def you_roles(p: dict) -> str:
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
    scalar("you", you_roles(p))
    items("hosts", list(p.get("hosts") or []))
    items("principals", list(p.get("principals") or []))
    items("rules", [fmt_rule(r) for r in p.get("rules") or []])
    items("approvers", fmt_subjects(p.get("approvers"), p.get("group_names")))
    scalar("approvals_required", p.get("approvals_required"))
    items("admins", fmt_subjects(p.get("admins"), p.get("group_names")))
    for f in TTL_FIELDS:
        v = p.get(f)
        scalar(f, f"{fmt_duration(v)} ({v} s)" if isinstance(v, int) else v)
    items("extensions", list(p.get("extensions") or []))
    scalar("force_command", p.get("force_command"))
    items("source_address", list(p.get("source_address") or []))
    scalar("webhook_url", p.get("webhook_url"))
    if p.get("webhook_url"):
        scalar("webhook_format", p.get("webhook_format") or "guess from the URL")
    for field in ("ca", "host_ca"):
        cas = []
        for c in p.get(field) or []:
            when = f"created {fmt_time(c.get('created_at'), seconds=False)}"
            if c.get("state") == "previous" and c.get("retire_after"):
                when += f", trusted until {fmt_time(c.get('retire_after'), seconds=False)}"
            cas.append(f"{c.get('state', '?'):8}  {c.get('fingerprint', '?')}  ({when})")
        if field == "ca" or cas:
            items(field, cas)
    return "\n".join(lines) + "\n"
