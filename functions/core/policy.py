"""Access policies and their evaluation.

A policy is an identity perimeter with its own CA. `evaluate()` turns (identity, request, policy)
into a Decision: auto-approve with a Grant, approval needed (with the Grant that an approval would
yield), or a Denied error. Nothing here does I/O.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import re
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Literal

from .certificate import DEFAULT_BACKDATE, KNOWN_EXTENSIONS, Grant
from .errors import Denied, InvalidRequest, NoPolicyForHost, PolicyNeedsUpdate, PrincipalNotAllowed, TtlTooLong
from .hostcert import DEFAULT_HOST_CERT_TTL, MAX_HOST_CERT_TTL, MIN_HOST_CERT_TTL
from .ids import is_guid
from .text import address_is_public, normalize_host, printable_text

Action = Literal["auto", "approval", "deny"]
ACTIONS = ("auto", "approval", "deny")

# A deployment-wide ceiling. Settings may lower it; a policy's max_ttl may not exceed it.
TTL_CEILING = 24 * 3600
MIN_TTL = 60
POLICY_ID_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
PRINCIPAL_RE = re.compile(r"^[a-z_][a-z0-9_.-]{0,31}\$?$", re.IGNORECASE)
GLOB_RE = re.compile(r"^[A-Za-z0-9*?.\-_\[\]!]{1,253}$")
ADMIN_ROLE = "EZSSH.Admin"
# Table Storage holds a policy as one string property (its JSON): at most 64 KiB, i.e. 32,768 UTF-16
# code units, in an entity of at most 1 MiB. An update's audit entry holds the changed fields before
# and after, and rotation adds CA keys, so a policy document may use less than half of that.
STORED_PROPERTY_UNITS = 32 * 1024
MAX_POLICY_UNITS = 14_000
CA_RESERVE_UNITS = 3_000  # room for the CA keys (current, previous) a policy carries
# A login entry that stands for the requester's own login: the local part of their UPN, but only
# for members (not guests) whose UPN is in one of their tenant's verified domains.
USERNAME_TEMPLATE = "{username}"
# Accounts {username} never expands to, whatever a UPN says (root@..., ubuntu@...): operating system
# accounts, service accounts and the default accounts of cloud images. A policy that means to allow
# one must name it literally (an admin's explicit choice).
RESERVED_LOGINS = frozenset({
    # system and service accounts of common distributions
    "root", "toor", "admin", "administrator", "adm", "daemon", "bin", "sys", "sync", "games", "man", "lp",
    "mail", "news", "uucp", "proxy", "www-data", "backup", "list", "irc", "gnats", "nobody", "nogroup",
    "nfsnobody", "sshd", "messagebus", "syslog", "_apt", "polkitd", "omsagent", "operator", "halt",
    "shutdown", "ftp", "tss", "dbus", "rpc", "rpcuser", "chrony", "ntp", "postfix", "uuidd", "tcpdump",
    "landscape", "pollinate", "lxd", "dnsmasq", "usbmux", "avahi", "colord", "geoclue", "pulse",
    "rtkit", "saned", "whoopsie", "kernoops", "hplip", "cups-pk-helper", "sssd", "unbound", "apache",
    "nginx", "httpd", "mysql", "postgres", "redis", "mongodb", "docker", "git", "jenkins", "guest",
    "wheel", "sudo", "staff", "users", "video", "disk", "kmem", "tty", "shadow", "utmp", "audio",
    # default accounts of cloud and virtual machine images
    "azureuser", "ubuntu", "ec2-user", "centos", "debian", "fedora", "opc", "cloud-user", "core",
    "rocky", "almalinux", "alpine", "arch", "bitnami", "vagrant", "pi", "freebsd", "suse",
    "oracle", "cloudadmin", "azureadmin", "clouduser", "linuxadmin",
})
# Prefixes reserved the same way (systemd-network, systemd-resolve, _chrony, ...).
RESERVED_LOGIN_PREFIXES = ("systemd-", "_")


def is_reserved_login(login: str) -> bool:
    login = login.lower()
    return login in RESERVED_LOGINS or login.startswith(RESERVED_LOGIN_PREFIXES)


def upn_domain(upn: str) -> str:
    """The domain of a UPN, lower-cased ("" when it has none)."""
    local, at, domain = upn.rpartition("@")
    return domain.strip().lower().rstrip(".") if at and local else ""


def username_from_upn(upn: str) -> str | None:
    """The login {username} would stand for: the UPN's local part, lower-cased, if it is a valid
    unix login and not a reserved account. Whether it may be used at all is Identity.username's call."""
    local, at, _ = upn.rpartition("@")
    if not at or "#" in upn:
        return None
    local = local.lower()
    if not PRINCIPAL_RE.match(local) or local.endswith("$") or is_reserved_login(local):
        return None
    return local


@dataclass(frozen=True)
class Identity:
    """Who is calling, as the token says. `oid`+`tid` is the identity; names are for display.

    `guest`: an account from outside the tenant (Entra B2B: the `acct` claim is 1, the UPN carries
    `#EXT#`, or the token's `idp` names another issuer). `domain_verified`: the UPN's domain is one
    the tenant admin listed as verified (settings); only then may {username} stand for its local part.
    """

    oid: str
    tid: str
    upn: str
    name: str = ""
    groups: frozenset[str] = frozenset()
    roles: frozenset[str] = frozenset()
    guest: bool = False
    domain_verified: bool = False

    @property
    def is_tenant_admin(self) -> bool:
        return ADMIN_ROLE in self.roles

    @property
    def upn_domain(self) -> str:
        return upn_domain(self.upn)

    @property
    def username(self) -> str | None:
        """The login {username} stands for, or None: never for guests, never for an unverified domain."""
        if self.guest or not self.domain_verified:
            return None
        return username_from_upn(self.upn)

    def same_person(self, other: "Identity | tuple[str, str]") -> bool:
        oid, tid = (other.oid, other.tid) if isinstance(other, Identity) else other
        return self.oid.lower() == oid.lower() and self.tid.lower() == tid.lower()


@dataclass(frozen=True)
class Subjects:
    """A set of users (by object id, or "*" for every member of the tenant) and groups (by object id).

    Guests match only where `guests` is true. `unresolved` holds entries of policies stored before
    people were named by object id (UPNs): they never match anyone, and the policy is refused until an
    admin replaces them (see Policy.unresolved_names)."""

    users: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()
    guests: bool = False
    unresolved: tuple[str, ...] = ()

    def matches(self, who: Identity, *, any_account: bool = False) -> bool:
        """`any_account`: guests match too (deny rules deny guests whatever `guests` says)."""
        if who.guest and not (self.guests or any_account):
            return False
        oid = who.oid.lower()
        if any(u == "*" or u == oid for u in self.users):
            return True
        mine = {g.lower() for g in who.groups}
        return any(g in mine for g in self.groups)

    def is_empty(self) -> bool:
        return not self.users and not self.groups

    def to_dict(self) -> dict:
        d: dict = {"users": list(self.users) + list(self.unresolved), "groups": list(self.groups)}
        if self.guests:
            d["guests"] = True
        return d

    @classmethod
    def from_row(cls, d: dict | None) -> "Subjects":
        d = d or {}
        users = [str(u) for u in d.get("users", ())]
        good = tuple(u.lower() for u in users if u == "*" or is_guid(u))
        bad = tuple(u for u in users if not (u == "*" or is_guid(u)))
        groups = [str(g) for g in d.get("groups", ())]
        bad += tuple(g for g in groups if not is_guid(g))
        return cls(good, tuple(g.lower() for g in groups if is_guid(g)),
                   bool(d.get("guests", False)), bad)


@dataclass(frozen=True)
class LoginMap:
    """Logins for one user (object id), one group (object id), or every member the rules admit."""

    logins: tuple[str, ...]
    oid: str | None = None
    group: str | None = None
    members: bool = False
    display: str | None = None  # a name for people reading the policy; never matched

    def matches(self, who: Identity) -> bool:
        if self.members:
            return True
        if self.oid is not None:
            return self.oid == who.oid.lower()
        return self.group is not None and self.group in {g.lower() for g in who.groups}

    def to_dict(self) -> dict:
        d: dict = {}
        if self.oid is not None:
            d["oid"] = self.oid
        elif self.group is not None:
            d["group"] = self.group
        else:
            d["members"] = True
        d["logins"] = list(self.logins)
        if self.display:
            d["display"] = self.display
        return d

    @classmethod
    def from_row(cls, d: dict) -> "LoginMap":
        return cls(logins=tuple(d.get("logins", ())), oid=d.get("oid"), group=d.get("group"),
                   members=bool(d.get("members", False)), display=d.get("display"))


@dataclass(frozen=True)
class Rule:
    subjects: Subjects
    action: Action

    def to_dict(self) -> dict:
        return {**self.subjects.to_dict(), "action": self.action}


@dataclass(frozen=True)
class CaKeyRef:
    """One CA key of a policy. `state` is current | previous | retired."""

    key_ref: str
    backend: str
    public_key: str  # OpenSSH line
    fingerprint: str
    state: str = "current"
    created_at: int = 0
    retire_after: int | None = None
    # A customer's own key (bring your own key): ezssh signs with it but never disables it.
    customer_owned: bool = False

    def to_dict(self) -> dict:
        return {
            "key_ref": self.key_ref,
            "backend": self.backend,
            "public_key": self.public_key,
            "fingerprint": self.fingerprint,
            "state": self.state,
            "created_at": self.created_at,
            "retire_after": self.retire_after,
            "customer_owned": self.customer_owned,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "CaKeyRef":
        backend = d.get("backend") or ""
        # Rows written before `customer_owned` existed marked such keys with a "-byok" backend.
        legacy_customer = backend.endswith("-byok")
        return cls(key_ref=d["key_ref"], backend=backend.removesuffix("-byok"), public_key=d["public_key"],
                   fingerprint=d["fingerprint"], state=d.get("state", "current"),
                   created_at=int(d.get("created_at") or 0), retire_after=d.get("retire_after"),
                   customer_owned=bool(d.get("customer_owned", legacy_customer)))


@dataclass(frozen=True)
class Policy:
    id: str
    tenant_id: str
    name: str
    rules: tuple[Rule, ...]
    hosts: tuple[str, ...]
    principals: tuple[str, ...]  # logins for every member the rules admit
    approvers: Subjects = Subjects()
    approvals_required: int = 1
    admins: Subjects = Subjects()
    default_ttl: int = 3600
    max_ttl: int = 8 * 3600
    request_ttl: int = 3600
    extensions: tuple[str, ...] = ("permit-pty",)
    force_command: str | None = None
    source_address: tuple[str, ...] = ()
    webhook_url: str | None = None
    webhook_format: str | None = None  # teams | slack | None (guess from the URL's host)
    ca: tuple[CaKeyRef, ...] = ()
    # The host CA: a separate key that signs host certificates (current + previous during rotation).
    host_ca: tuple[CaKeyRef, ...] = ()
    host_cert_ttl: int = DEFAULT_HOST_CERT_TTL
    deleted: bool = False
    logins: tuple[LoginMap, ...] = ()  # logins by object id or group
    audit_head: str = field(default="0" * 64, compare=False)  # last entry of this policy's audit chain
    etag: str | None = field(default=None, compare=False)

    # -- derived ---------------------------------------------------------------------------
    @property
    def current_ca(self) -> CaKeyRef | None:
        return next((c for c in self.ca if c.state == "current"), None)

    @property
    def trusted_ca(self) -> tuple[CaKeyRef, ...]:
        """The CA keys hosts trust: the current one first, then previous ones still in their window."""
        return tuple(c for c in self.ca if c.state == "current") + tuple(c for c in self.ca if c.state == "previous")

    @property
    def current_host_ca(self) -> CaKeyRef | None:
        return next((c for c in self.host_ca if c.state == "current"), None)

    @property
    def trusted_host_ca(self) -> tuple[CaKeyRef, ...]:
        """The host CA keys clients trust: current first, then previous ones in their window."""
        return (tuple(c for c in self.host_ca if c.state == "current")
                + tuple(c for c in self.host_ca if c.state == "previous"))

    def ca_keys(self, kind: str) -> tuple[CaKeyRef, ...]:
        """All keys of one kind: "user" (signs user certificates) or "host"."""
        return self.host_ca if kind == "host" else self.ca

    def critical_options(self) -> tuple[tuple[str, str], ...]:
        opts = []
        if self.force_command:
            opts.append(("force-command", self.force_command))
        if self.source_address:
            opts.append(("source-address", ",".join(self.source_address)))
        return tuple(opts)

    def covers_host(self, host: str, tags: dict[str, str] | None = None) -> bool:
        return any(_host_matches(pattern, host, tags or {}) for pattern in self.hosts)

    def rule_for(self, who: Identity) -> Rule | None:
        return next((r for r in self.rules if r.subjects.matches(who, any_account=r.action == "deny")), None)

    def is_member(self, who: Identity) -> bool:
        rule = self.rule_for(who)
        return rule is not None and rule.action != "deny"

    def is_approver(self, who: Identity) -> bool:
        return self.approvers.matches(who)

    def is_admin(self, who: Identity) -> bool:
        return who.is_tenant_admin or self.admins.matches(who)

    def unresolved_names(self) -> tuple[str, ...]:
        """People named by something other than an object id (UPNs of policies stored before names
        were refused). They never match; the policy grants nothing until an admin replaces them."""
        out: list[str] = []
        for s in (*(r.subjects for r in self.rules), self.approvers, self.admins):
            out.extend(s.unresolved)
        return tuple(dict.fromkeys(out))

    def login_map(self) -> tuple[LoginMap, ...]:
        """Every login mapping: `principals` (every member) first, then `logins`."""
        everyone = (LoginMap(self.principals, members=True),) if self.principals else ()
        return everyone + self.logins

    # -- (de)serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "tenant_id": self.tenant_id,
            "rules": [r.to_dict() for r in self.rules],
            "hosts": list(self.hosts),
            "principals": list(self.principals),
            "logins": [m.to_dict() for m in self.logins],
            "approvers": self.approvers.to_dict(),
            "approvals_required": self.approvals_required,
            "admins": self.admins.to_dict(),
            "default_ttl": self.default_ttl,
            "max_ttl": self.max_ttl,
            "request_ttl": self.request_ttl,
            "extensions": list(self.extensions),
            "force_command": self.force_command,
            "source_address": list(self.source_address),
            "webhook_url": self.webhook_url,
            "webhook_format": self.webhook_format,
            "ca": [c.to_dict() for c in self.ca],
            "host_ca": [c.to_dict() for c in self.host_ca],
            "host_cert_ttl": self.host_cert_ttl,
            "deleted": self.deleted,
        }


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


def _str_list(doc: dict, key: str, *, required: bool = False) -> tuple[str, ...]:
    value = doc.get(key, [] if not required else None)
    if value is None:
        raise InvalidRequest(f"'{key}' is required.")
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise InvalidRequest(f"'{key}' must be a list of non-empty strings.")
    return tuple(v.strip() for v in value)


def _int(doc: dict, key: str, default: int, lo: int, hi: int) -> int:
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
                f"object id cannot (find it with: az ad user show --id {v} --query id -o tsv).")
        elif not is_guid(v):
            raise InvalidRequest(f"{where}: {v!r} is not an object id (a GUID such as "
                                 "0e2d7f4c-6a1b-4c3e-9a57-5d2b8e0c1a01).")
        else:
            out.append(v.lower())
    return tuple(dict.fromkeys(out))


def _guests(value: dict, where: str) -> bool:
    g = value.get("guests", False)
    if not isinstance(g, bool):
        raise InvalidRequest(f"{where}.guests must be true or false.")
    return g


def _subjects(doc: dict, key: str) -> Subjects:
    value = doc.get(key) or {}
    if not isinstance(value, dict):
        raise InvalidRequest(f"'{key}' must be an object with 'users' and/or 'groups'.")
    unknown = set(value) - {"users", "groups", "guests"}
    if unknown:
        raise InvalidRequest(f"'{key}' has unknown fields: {', '.join(sorted(unknown))}.")
    return Subjects(users=_object_ids(_str_list(value, "users"), f"{key}.users", allow_everyone=True),
                    groups=_object_ids(_str_list(value, "groups"), f"{key}.groups", allow_everyone=False),
                    guests=_guests(value, key))


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


def _login_maps(doc: dict) -> tuple[LoginMap, ...]:
    raw = doc.get("logins", [])
    if raw is None:
        raw = []
    if not isinstance(raw, list):
        raise InvalidRequest("'logins' must be a list of {\"oid\"|\"group\"|\"members\", \"logins\"} objects.")
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
            raise InvalidRequest(f"{where} must name exactly one of 'oid' (a user's object id), 'group' "
                                 "(a group's object id) or 'members': true.")
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
        out.append(LoginMap(logins, oid=oid, display=display) if keys[0] == "oid"
                   else LoginMap(logins, group=oid, display=display))
    return tuple(out)


def validate_host_pattern(pattern: str) -> None:
    if pattern.startswith("tag:"):
        k, sep, v = pattern[4:].partition("=")
        if not sep or not k or not v:
            raise InvalidRequest(f"Host pattern {pattern!r}: a tag pattern looks like 'tag:name=value'.")
        return
    if pattern.startswith("/subscriptions/"):
        if not re.match(r"^/subscriptions/[^/]+/resourceGroups/[^/]+(/providers/Microsoft\.Compute/virtualMachines/[^/]+)?$",
                        pattern, re.IGNORECASE):
            raise InvalidRequest(f"Host pattern {pattern!r} is not an Azure VM or resource group id.")
        return
    if "/" in pattern or _looks_like_ip(pattern):
        try:
            ipaddress.ip_network(pattern, strict=True)
        except ValueError:
            raise InvalidRequest(f"Host pattern {pattern!r} is not a valid CIDR (host bits must be zero).") from None
        return
    if not GLOB_RE.match(pattern) or pattern.count("[") != pattern.count("]"):
        raise InvalidRequest(f"Host pattern {pattern!r} is not a valid host name glob.")


def _looks_like_ip(s: str) -> bool:
    return bool(re.match(r"^[0-9.]+$", s)) or ":" in s


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
        raise InvalidRequest("'id' must be 1-63 lowercase letters, digits or dashes, not starting or ending with a dash.")
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
            "(for every member); a certificate never has empty principals.")

    max_ttl = _int(doc, "max_ttl", min(8 * 3600, ttl_ceiling), MIN_TTL, ttl_ceiling)
    default_ttl = _int(doc, "default_ttl", min(3600, max_ttl), MIN_TTL, max_ttl)
    request_ttl = _int(doc, "request_ttl", 3600, 60, 7 * 24 * 3600)

    extensions = _str_list(doc, "extensions") if "extensions" in doc else ("permit-pty",)
    extensions = tuple(dict.fromkeys(extensions))  # the certificate builder refuses duplicates
    bad = [e for e in extensions if e not in KNOWN_EXTENSIONS]
    if bad:
        raise InvalidRequest(
            f"Unknown extension(s): {', '.join(bad)}. Known: {', '.join(sorted(KNOWN_EXTENSIONS))}."
        )

    force_command = doc.get("force_command")
    if force_command is not None and (not isinstance(force_command, str) or not force_command.strip()
                                      or "\n" in force_command):
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

    fields = dict(
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
            "patterns, or split it into several policies.")


def policy_from_row(d: dict, etag: str | None = None, audit_head: str | None = None) -> Policy:
    """Rebuild a stored policy (already validated when written). People stored by UPN (policies
    written before names were refused) land in Subjects.unresolved: they match nobody."""
    return Policy(
        id=d["id"],
        tenant_id=d["tenant_id"],
        name=d["name"],
        rules=tuple(
            Rule(Subjects.from_row({**r, "guests": r.get("guests", False)}), r["action"]) for r in d["rules"]
        ),
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
        etag=etag,
    )


# ---- webhook destinations ----------------------------------------------------------------------


def validate_webhook_url(url: object, *, allow_loopback_http: bool = False) -> str:
    """A webhook URL an admin may store: https, a host name or a public IP, no user info. Plain http
    only to a loopback address, and only where the deployment allows it (local development)."""
    from urllib.parse import urlsplit

    if not isinstance(url, str) or not url.strip() or len(url) > 2048:
        raise InvalidRequest("'webhook_url' must be an https URL of at most 2048 characters, or null.")
    url = url.strip()
    if any(ord(ch) < 0x21 or ord(ch) == 0x7F or ord(ch) > 0x7E for ch in url):
        raise InvalidRequest("'webhook_url' must be a URL of printable ASCII characters without spaces.")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise InvalidRequest("'webhook_url' is not a valid URL.") from None
    host = (parts.hostname or "").lower()
    if not host:
        raise InvalidRequest("'webhook_url' names no host.")
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        raise InvalidRequest("'webhook_url' must not carry a user name or password.")
    if parts.fragment:
        raise InvalidRequest("'webhook_url' must not have a #fragment.")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    loopback = ip is not None and (ip.is_loopback or (isinstance(ip, ipaddress.IPv6Address)
                                                      and ip.ipv4_mapped is not None and ip.ipv4_mapped.is_loopback))
    if parts.scheme == "http":
        if not (allow_loopback_http and loopback):
            raise InvalidRequest("'webhook_url' must be an https URL.")
        return url
    if parts.scheme != "https":
        raise InvalidRequest("'webhook_url' must be an https URL.")
    if port == 0:
        raise InvalidRequest("'webhook_url' has port 0.")
    if ip is not None and not address_is_public(ip) and not (allow_loopback_http and loopback):
        raise InvalidRequest("'webhook_url' points at a private, loopback or otherwise non-public address.")
    if ip is None:
        if host == "localhost" or host.endswith(".localhost") or host.endswith(".local") or "." not in host:
            raise InvalidRequest("'webhook_url' must name a public host (a fully qualified domain name).")
        try:
            normalize_host(host)
        except InvalidRequest:
            raise InvalidRequest("'webhook_url' has an invalid host name.") from None
    return url


# ---- host matching ---------------------------------------------------------------------------


_CANONICAL_HOST_RE = re.compile(r"^[a-z0-9.:-]{1,253}$")


def _host_matches(pattern: str, host: str, tags: dict[str, str]) -> bool:
    host = host.strip().lower().rstrip(".")
    if not _CANONICAL_HOST_RE.fullmatch(host.strip("[]")) and not pattern.startswith(("tag:", "/subscriptions/")):
        return False  # only normalised names match (fnmatch's * would match a newline)
    if pattern.startswith("tag:"):
        k, _, v = pattern[4:].partition("=")
        return tags.get(k) == v
    if pattern.startswith("/subscriptions/"):
        resource_id = tags.get("_resource_id", "").lower()
        p = pattern.lower()
        return bool(resource_id) and (resource_id == p or resource_id.startswith(p + "/"))
    if "/" in pattern or _looks_like_ip(pattern):
        try:
            return ipaddress.ip_address(host.strip("[]")) in ipaddress.ip_network(pattern, strict=False)
        except ValueError:
            return False
    return fnmatch.fnmatchcase(host, pattern.lower())


# ---- evaluation ------------------------------------------------------------------------------


@dataclass(frozen=True)
class AccessRequest:
    host: str
    principal: str
    ttl_seconds: int | None = None
    policy_id: str | None = None
    reason: str | None = None


@dataclass(frozen=True)
class Decision:
    policy: Policy
    action: Action  # auto | approval
    ttl_seconds: int


def allowed_logins(policy: Policy, who: Identity) -> tuple[str, ...]:
    """The logins a policy maps to this caller: every `principals` entry (for every member), and the
    `logins` entries for their object id or groups. {username} stands for Identity.username: only
    members of a verified domain, never guests, never a reserved account."""
    out = []
    for m in policy.login_map():
        if not m.matches(who):
            continue
        for login in m.logins:
            if login == USERNAME_TEMPLATE:
                if who.username is not None:
                    out.append(who.username)
            else:
                out.append(login)
    return tuple(dict.fromkeys(out))


def make_grant(policy: Policy, request_id: str, who: Identity, principal: str, ttl_seconds: int,
               backdate: int = DEFAULT_BACKDATE) -> Grant:
    if not isinstance(who, Identity):
        raise TypeError("make_grant needs the requester's Identity")
    if principal not in allowed_logins(policy, who):
        raise PrincipalNotAllowed(f"Policy {policy.id!r} does not allow the login {principal!r}.")
    return Grant(
        tenant_id=policy.tenant_id,
        policy_id=policy.id,
        request_id=request_id,
        upn=who.upn,
        principals=(principal,),
        ttl_seconds=ttl_seconds,
        extensions=tuple(sorted(policy.extensions)),
        critical_options=policy.critical_options(),
        backdate_seconds=backdate,
    )


def resolve_ttl(policy: Policy, requested: int | None) -> int:
    if requested is None:
        return policy.default_ttl
    if isinstance(requested, bool) or not isinstance(requested, int) or requested < MIN_TTL:
        raise InvalidRequest(f"ttl_seconds must be a whole number of at least {MIN_TTL}.")
    if requested > policy.max_ttl:
        raise TtlTooLong(
            f"ttl_seconds {requested} is over policy {policy.id!r}'s maximum of {policy.max_ttl} seconds.",
            max_ttl=policy.max_ttl,
        )
    return requested


def evaluate(who: Identity, request: AccessRequest, policy: Policy) -> Decision:
    """One policy: does it let `who` in as `request.principal` on `request.host`?"""
    if policy.tenant_id != who.tid or policy.deleted:
        raise NoPolicyForHost(f"No access policy covers host {request.host!r}.")
    unresolved = policy.unresolved_names()
    if unresolved:
        raise PolicyNeedsUpdate(
            f"Policy {policy.id!r} names people by UPN ({', '.join(unresolved[:3])}"
            f"{', ...' if len(unresolved) > 3 else ''}), which are never matched; it grants nothing until an "
            "admin replaces them with object ids (ezssh policy resolve-names, or edit the policy).",
            policy=policy.id)
    rule = policy.rule_for(who)
    if rule is None or rule.action == "deny":
        if who.guest and any(r.action != "deny" and not r.subjects.guests for r in policy.rules):
            raise Denied(f"Policy {policy.id!r} does not admit guest accounts.", policy=policy.id)
        raise Denied(f"Policy {policy.id!r} does not grant you access to {request.host!r}.", policy=policy.id)
    allowed = allowed_logins(policy, who)
    if request.principal not in allowed:
        raise PrincipalNotAllowed(
            f"Policy {policy.id!r} does not allow you the login {request.principal!r}; "
            f"allowed: {', '.join(allowed) or 'none'}.",
            policy=policy.id,
        )
    ttl = resolve_ttl(policy, request.ttl_seconds)
    return Decision(policy=policy, action=rule.action, ttl_seconds=ttl)


def choose_policy(
    who: Identity,
    request: AccessRequest,
    policies: Iterable[Policy],
    tags: dict[str, str] | None = None,
) -> Decision:
    """Pick the policy for a request: the one named, else the best of those covering the host.

    Among several that cover the host and let the user in, auto-approve wins over approval, then
    the policy id breaks the tie so the choice is stable.
    """
    covering = [p for p in policies if p.tenant_id == who.tid and not p.deleted
                and p.covers_host(request.host, tags)]
    if request.policy_id is not None:
        covering = [p for p in covering if p.id == request.policy_id]
    if not covering:
        raise NoPolicyForHost(f"No access policy covers host {request.host!r}" +
                              (f" under policy {request.policy_id!r}." if request.policy_id else "."))
    decisions: list[Decision] = []
    first_error: Denied | None = None
    for p in sorted(covering, key=lambda p: p.id):
        try:
            decisions.append(evaluate(who, request, p))
        except (Denied, TtlTooLong) as exc:
            if first_error is None or (isinstance(first_error, Denied) and type(first_error) is Denied):
                first_error = exc  # type: ignore[assignment]
    if not decisions:
        assert first_error is not None
        raise first_error
    decisions.sort(key=lambda d: (d.action != "auto", d.policy.id))
    return decisions[0]
