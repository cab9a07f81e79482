"""An admin's policy document -> a validated Policy (create, or a partial update over the stored
one), the limits storage puts on it, and a stored row back to a Policy."""

from __future__ import annotations

import ipaddress
from dataclasses import replace
from typing import Any

from .certificate import KNOWN_EXTENSIONS
from .errors import InvalidRequest
from .hostcert import DEFAULT_HOST_CERT_TTL, MAX_HOST_CERT_TTL, MIN_HOST_CERT_TTL
from .hostmatch import validate_host_pattern
from .ids import is_guid
from .policy import (
    ACTIONS,
    CA_RESERVE_UNITS,
    MAX_POLICY_UNITS,
    MIN_TTL,
    POLICY_ID_RE,
    PRINCIPAL_RE,
    TTL_CEILING,
    USERNAME_TEMPLATE,
    CaKeyRef,
    LoginMap,
    Policy,
    Rule,
    Subjects,
)
from .text import printable_text, validate_webhook_url

# Fields an admin may write. Server-managed ones (tenant_id, ca, deleted, etag) are never taken
# from a client document.
EDITABLE_FIELDS = frozenset(
    {
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
    }
)


def _str_list(doc: dict[str, Any], key: str, *, required: bool = False) -> tuple[str, ...]:
    value = doc.get(key, [] if not required else None)
    if value is None:
        raise InvalidRequest(f"'{key}' is required.")
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise InvalidRequest(f"'{key}' must be a list of non-empty strings.")
    return tuple(v.strip() for v in value)


def _int(doc: dict[str, Any], key: str, default: int, lo: int, hi: int) -> int:
    value = doc.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(f"'{key}' must be a whole number.")
    if not lo <= value <= hi:
        raise InvalidRequest(f"'{key}' must be between {lo} and {hi}; got {value}.")
    return value


def _object_ids(values: tuple[str, ...], where: str, *, allow_everyone: bool) -> tuple[str, ...]:
    out = []
    for v in values:
        if allow_everyone and v == "*":
            out.append(v)
        elif "@" in v:
            raise InvalidRequest(
                f"{where} names {v!r} by UPN. Name people by object id: a UPN can be renamed or reused, an "
                f"object id cannot (find it with: az ad user show --id {v} --query id -o tsv)."
            )
        elif not is_guid(v):
            raise InvalidRequest(
                f"{where}: {v!r} is not an object id (a GUID such as 0e2d7f4c-6a1b-4c3e-9a57-5d2b8e0c1a01)."
            )
        else:
            out.append(v.lower())
    return tuple(dict.fromkeys(out))


def _guests(value: dict[str, Any], where: str) -> bool:
    g = value.get("guests", False)
    if not isinstance(g, bool):
        raise InvalidRequest(f"{where}.guests must be true or false.")
    return g


def _subjects(doc: dict[str, Any], key: str) -> Subjects:
    value = doc.get(key) or {}
    if not isinstance(value, dict):
        raise InvalidRequest(f"'{key}' must be an object with 'users' and/or 'groups'.")
    unknown = set(value) - {"users", "groups", "guests"}
    if unknown:
        raise InvalidRequest(f"'{key}' has unknown fields: {', '.join(sorted(unknown))}.")
    return Subjects(
        users=_object_ids(_str_list(value, "users"), f"{key}.users", allow_everyone=True),
        groups=_object_ids(_str_list(value, "groups"), f"{key}.groups", allow_everyone=False),
        guests=_guests(value, key),
    )


def _login_names(values: object, where: str) -> tuple[str, ...]:
    if not isinstance(values, list) or not values or not all(isinstance(v, str) and v.strip() for v in values):
        raise InvalidRequest(f"{where} must be a non-empty list of logins.")
    out = []
    for v in values:
        v = v.strip()
        if v != USERNAME_TEMPLATE and not PRINCIPAL_RE.match(v):
            raise InvalidRequest(f"Login {v!r} in {where} is not a valid unix login name.")
        out.append(v)
    return tuple(dict.fromkeys(out))


def _login_maps(doc: dict[str, Any]) -> tuple[LoginMap, ...]:
    raw = doc.get("logins", [])
    if raw is None:
        raw = []
    if not isinstance(raw, list):
        raise InvalidRequest('\'logins\' must be a list of {"oid"|"group"|"members", "logins"} objects.')
    out = []
    for i, e in enumerate(raw):
        where = f"logins[{i}]"
        if not isinstance(e, dict):
            raise InvalidRequest(f"{where} must be an object.")
        unknown = set(e) - {"oid", "group", "members", "logins", "display"}
        if unknown:
            raise InvalidRequest(f"{where} has unknown fields: {', '.join(sorted(unknown))}.")
        keys = [k for k in ("oid", "group", "members") if k in e]
        if len(keys) != 1:
            raise InvalidRequest(
                f"{where} must name exactly one of 'oid' (a user's object id), 'group' "
                "(a group's object id) or 'members': true."
            )
        logins = _login_names(e.get("logins"), f"{where}.logins")
        display = e.get("display")
        if display is not None:
            display = printable_text(display, f"{where}.display", 200)
        if keys[0] == "members":
            if e["members"] is not True:
                raise InvalidRequest(f"{where}.members must be true.")
            out.append(LoginMap(logins, members=True, display=display))
            continue
        value = e[keys[0]]
        if not isinstance(value, str):
            raise InvalidRequest(f"{where}.{keys[0]} must be an object id.")
        (oid,) = _object_ids((value.strip(),), f"{where}.{keys[0]}", allow_everyone=False)
        out.append(
            LoginMap(logins, oid=oid, display=display)
            if keys[0] == "oid"
            else LoginMap(logins, group=oid, display=display)
        )
    return tuple(out)


def policy_from_document(
    doc: object,
    *,
    tenant_id: str,
    ttl_ceiling: int = TTL_CEILING,
    base: Policy | None = None,
    allow_loopback_http: bool = False,
) -> Policy:
    """Validate an admin's policy document (create, or a partial update over `base`)."""
    if not isinstance(doc, dict):
        raise InvalidRequest("A policy document must be a JSON object.")
    unknown = set(doc) - EDITABLE_FIELDS
    if unknown:
        raise InvalidRequest(f"Unknown or read-only policy fields: {', '.join(sorted(unknown))}.")
    if base is not None:
        if "id" in doc and doc["id"] != base.id:
            raise InvalidRequest("A policy's id cannot change.")
        merged = {k: v for k, v in base.to_dict().items() if k in EDITABLE_FIELDS}
        merged.update(doc)
        doc = merged

    pid = doc.get("id")
    if not isinstance(pid, str) or not POLICY_ID_RE.match(pid):
        raise InvalidRequest(
            "'id' must be 1-63 lowercase letters, digits or dashes, not starting or ending with a dash."
        )
    name = doc.get("name", pid)
    if not isinstance(name, str) or not name.strip() or len(name) > 200:
        raise InvalidRequest("'name' must be a non-empty string of at most 200 characters.")
    name = printable_text(name, "name", 200)

    raw_rules = doc.get("rules")
    if not isinstance(raw_rules, list) or not raw_rules:
        raise InvalidRequest("'rules' must be a non-empty list; without rules nobody gets in.")
    rules = []
    for i, r in enumerate(raw_rules):
        if not isinstance(r, dict):
            raise InvalidRequest(f"rules[{i}] must be an object.")
        unknown = set(r) - {"users", "groups", "guests", "action"}
        if unknown:
            raise InvalidRequest(f"rules[{i}] has unknown fields: {', '.join(sorted(unknown))}.")
        action = r.get("action")
        if action not in ACTIONS:
            raise InvalidRequest(f"rules[{i}].action must be one of auto, approval, deny.")
        subjects = Subjects(
            users=_object_ids(_str_list(r, "users"), f"rules[{i}].users", allow_everyone=True),
            groups=_object_ids(_str_list(r, "groups"), f"rules[{i}].groups", allow_everyone=False),
            guests=_guests(r, f"rules[{i}]"),
        )
        if subjects.is_empty():
            raise InvalidRequest(f"rules[{i}] names no users or groups.")
        rules.append(Rule(subjects, action))

    hosts = _str_list(doc, "hosts", required=True)
    if not hosts:
        raise InvalidRequest("'hosts' must name at least one host pattern.")
    for h in hosts:
        validate_host_pattern(h)

    principals = _str_list(doc, "principals") if doc.get("principals") is not None else ()
    for p in principals:
        if p != USERNAME_TEMPLATE and not PRINCIPAL_RE.match(p):
            raise InvalidRequest(f"Principal {p!r} is not a valid unix login name.")
    principals = tuple(dict.fromkeys(principals))
    logins = _login_maps(doc)
    if not principals and not logins:
        raise InvalidRequest(
            "A policy must map at least one login: 'logins' (by user or group object id) or 'principals' "
            "(for every member); a certificate never has empty principals."
        )

    max_ttl = _int(doc, "max_ttl", min(8 * 3600, ttl_ceiling), MIN_TTL, ttl_ceiling)
    default_ttl = _int(doc, "default_ttl", min(3600, max_ttl), MIN_TTL, max_ttl)
    request_ttl = _int(doc, "request_ttl", 3600, 60, 7 * 24 * 3600)

    extensions = _str_list(doc, "extensions") if "extensions" in doc else ("permit-pty",)
    extensions = tuple(dict.fromkeys(extensions))  # the certificate builder refuses duplicates
    bad = [e for e in extensions if e not in KNOWN_EXTENSIONS]
    if bad:
        raise InvalidRequest(f"Unknown extension(s): {', '.join(bad)}. Known: {', '.join(sorted(KNOWN_EXTENSIONS))}.")

    force_command = doc.get("force_command")
    if force_command is not None and (
        not isinstance(force_command, str) or not force_command.strip() or "\n" in force_command
    ):
        raise InvalidRequest("'force_command' must be a non-empty single-line string or null.")
    source_address = _str_list(doc, "source_address")
    for cidr in source_address:
        try:
            # OpenSSH refuses a source-address CIDR with host bits set (and then the whole cert).
            ipaddress.ip_network(cidr, strict=True)
        except ValueError:
            raise InvalidRequest(
                f"source_address {cidr!r} is not a valid address or CIDR (host bits must be zero)."
            ) from None

    approvers = _subjects(doc, "approvers")
    admins = _subjects(doc, "admins")
    approvals_required = _int(doc, "approvals_required", 1, 1, 10)
    if any(r.action == "approval" for r in rules):
        if approvers.is_empty():
            raise InvalidRequest("A rule needs approval but the policy names no approvers.")
        named_only = not approvers.groups and "*" not in approvers.users
        if named_only and len(approvers.users) < approvals_required:
            raise InvalidRequest(
                f"approvals_required is {approvals_required} but only {len(approvers.users)} approver(s) are named."
            )
        if named_only and len(approvers.users) == approvals_required:
            # Every named approver is needed, so any of them who asks could never be approved.
            requesters = [r for r in rules if r.action == "approval"]
            overlap = [u for u in approvers.users if any(u in r.subjects.users for r in requesters)]
            if overlap:
                raise InvalidRequest(
                    f"Approver(s) {', '.join(overlap)} would have to approve their own requests; "
                    "nobody approves their own request. Add more approvers or lower approvals_required."
                )

    webhook_url = doc.get("webhook_url")
    if webhook_url is not None:
        webhook_url = validate_webhook_url(webhook_url, allow_loopback_http=allow_loopback_http)
    webhook_format = doc.get("webhook_format")
    if webhook_format not in (None, "teams", "slack"):
        raise InvalidRequest("'webhook_format' must be teams, slack or null (guess from the URL).")
    host_cert_ttl = _int(doc, "host_cert_ttl", DEFAULT_HOST_CERT_TTL, MIN_HOST_CERT_TTL, MAX_HOST_CERT_TTL)

    fields: dict[str, Any] = dict(
        id=pid,
        tenant_id=tenant_id,
        name=name.strip(),
        rules=tuple(rules),
        hosts=hosts,
        principals=principals,
        logins=logins,
        approvers=approvers,
        approvals_required=approvals_required,
        admins=admins,
        default_ttl=default_ttl,
        max_ttl=max_ttl,
        request_ttl=request_ttl,
        extensions=tuple(extensions),
        force_command=force_command,
        source_address=source_address,
        webhook_url=webhook_url,
        webhook_format=webhook_format,
        host_cert_ttl=host_cert_ttl,
    )
    out = replace(base, **fields) if base is not None else Policy(**fields)
    check_storage_limits(out)
    return out


def utf16_units(text: str) -> int:
    return len(text.encode("utf-16-le")) // 2


def check_storage_limits(policy: Policy) -> None:
    """Refuse a policy that storage could not hold (or could not audit) before anything is created
    for it: its JSON must stay well under Table Storage's 64 KiB string property."""
    import json

    doc = policy.to_dict()
    ca = doc.pop("ca")
    size = utf16_units(json.dumps(doc, separators=(",", ":")))
    ca_size = utf16_units(json.dumps(ca, separators=(",", ":")))
    limit = MAX_POLICY_UNITS - max(CA_RESERVE_UNITS, ca_size)
    if size > limit:
        raise InvalidRequest(
            f"The policy is {size} characters of JSON; a policy is stored as one Table Storage property (at most "
            f"64 KiB), so it may be at most {limit}. Use groups instead of long lists of people, fewer host "
            "patterns, or split it into several policies."
        )


def policy_from_row(
    d: dict[str, Any], etag: str | None = None, audit_head: str | None = None, audit_seq: int = 0
) -> Policy:
    """Rebuild a stored policy (already validated when written). People stored by UPN (policies
    written before names were refused) land in Subjects.unresolved: they match nobody."""
    return Policy(
        id=d["id"],
        tenant_id=d["tenant_id"],
        name=d["name"],
        rules=tuple(Rule(Subjects.from_row({**r, "guests": r.get("guests", False)}), r["action"]) for r in d["rules"]),
        hosts=tuple(d["hosts"]),
        principals=tuple(d.get("principals", ())),
        logins=tuple(LoginMap.from_row(m) for m in d.get("logins", ())),
        approvers=Subjects.from_row(d.get("approvers")),
        approvals_required=d.get("approvals_required", 1),
        admins=Subjects.from_row(d.get("admins")),
        default_ttl=d["default_ttl"],
        max_ttl=d["max_ttl"],
        request_ttl=d.get("request_ttl", 3600),
        extensions=tuple(d.get("extensions", ())),
        force_command=d.get("force_command"),
        source_address=tuple(d.get("source_address", ())),
        webhook_url=d.get("webhook_url"),
        webhook_format=d.get("webhook_format"),
        ca=tuple(CaKeyRef.from_dict(c) for c in d.get("ca", ())),
        host_ca=tuple(CaKeyRef.from_dict(c) for c in d.get("host_ca", ())),
        host_cert_ttl=int(d.get("host_cert_ttl") or DEFAULT_HOST_CERT_TTL),
        deleted=bool(d.get("deleted", False)),
        audit_head=audit_head or "0" * 64,
        audit_seq=audit_seq,
        etag=etag,
    )
