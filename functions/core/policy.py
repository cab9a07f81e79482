"""Access policies: who is calling (Identity), who a policy names (Subjects, LoginMap, Rule), its CA
keys (CaKeyRef) and the Policy itself. Nothing here does I/O.

Around it: core/policydoc.py turns an admin's document into a Policy (and a stored row back),
core/evaluation.py decides a request under a policy, core/hostmatch.py matches host patterns.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

from .hostcert import DEFAULT_HOST_CERT_TTL
from .hostmatch import host_matches
from .ids import is_guid

Action = Literal["auto", "approval", "deny"]
ACTIONS = ("auto", "approval", "deny")

# A deployment-wide ceiling. Settings may lower it; a policy's max_ttl may not exceed it.
TTL_CEILING = 24 * 3600
MIN_TTL = 60
POLICY_ID_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
PRINCIPAL_RE = re.compile(r"^[a-z_][a-z0-9_.-]{0,31}\$?$", re.IGNORECASE)
ADMIN_ROLE = "EZSSH.Admin"
# The app role an Entra app (a service principal or managed identity) needs for app-only tokens.
WORKLOAD_ROLE = "EZSSH.Workload"
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
RESERVED_LOGINS = frozenset(
    {
        # system and service accounts of common distributions
        "root",
        "toor",
        "admin",
        "administrator",
        "adm",
        "daemon",
        "bin",
        "sys",
        "sync",
        "games",
        "man",
        "lp",
        "mail",
        "news",
        "uucp",
        "proxy",
        "www-data",
        "backup",
        "list",
        "irc",
        "gnats",
        "nobody",
        "nogroup",
        "nfsnobody",
        "sshd",
        "messagebus",
        "syslog",
        "_apt",
        "polkitd",
        "omsagent",
        "operator",
        "halt",
        "shutdown",
        "ftp",
        "tss",
        "dbus",
        "rpc",
        "rpcuser",
        "chrony",
        "ntp",
        "postfix",
        "uuidd",
        "tcpdump",
        "landscape",
        "pollinate",
        "lxd",
        "dnsmasq",
        "usbmux",
        "avahi",
        "colord",
        "geoclue",
        "pulse",
        "rtkit",
        "saned",
        "whoopsie",
        "kernoops",
        "hplip",
        "cups-pk-helper",
        "sssd",
        "unbound",
        "apache",
        "nginx",
        "httpd",
        "mysql",
        "postgres",
        "redis",
        "mongodb",
        "docker",
        "git",
        "jenkins",
        "guest",
        "wheel",
        "sudo",
        "staff",
        "users",
        "video",
        "disk",
        "kmem",
        "tty",
        "shadow",
        "utmp",
        "audio",
        # default accounts of cloud and virtual machine images
        "azureuser",
        "ubuntu",
        "ec2-user",
        "centos",
        "debian",
        "fedora",
        "opc",
        "cloud-user",
        "core",
        "rocky",
        "almalinux",
        "alpine",
        "arch",
        "bitnami",
        "vagrant",
        "pi",
        "freebsd",
        "suse",
        "oracle",
        "cloudadmin",
        "azureadmin",
        "clouduser",
        "linuxadmin",
    }
)
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
    `app`: a workload (an app-only token of a service principal or managed identity, `oid` its object
    id). Policies map it only where they name it (its object id or a group); it never gets
    {username}, never a `members` login, and is never an approver or an admin.
    """

    oid: str
    tid: str
    upn: str
    name: str = ""
    groups: frozenset[str] = frozenset()
    roles: frozenset[str] = frozenset()
    guest: bool = False
    domain_verified: bool = False
    app: bool = False

    @property
    def is_tenant_admin(self) -> bool:
        return not self.app and ADMIN_ROLE in self.roles

    @property
    def upn_domain(self) -> str:
        return upn_domain(self.upn)

    @property
    def username(self) -> str | None:
        """The login {username} stands for, or None: never for guests, never for an unverified domain."""
        if self.guest or self.app or not self.domain_verified:
            return None
        return username_from_upn(self.upn)

    def same_person(self, other: Identity | tuple[str, str]) -> bool:
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
        """`any_account`: guests and workloads match "*" too (deny rules deny them whatever `guests`
        says); otherwise a workload matches only its own object id or a group."""
        if who.guest and not (self.guests or any_account):
            return False
        oid = who.oid.lower()
        everyone = any_account or not who.app
        if any((u == "*" and everyone) or u == oid for u in self.users):
            return True
        mine = {g.lower() for g in who.groups}
        return any(g in mine for g in self.groups)

    def is_empty(self) -> bool:
        return not self.users and not self.groups

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"users": list(self.users) + list(self.unresolved), "groups": list(self.groups)}
        if self.guests:
            d["guests"] = True
        return d

    @classmethod
    def from_row(cls, d: dict[str, Any] | None) -> Subjects:
        d = d or {}
        users = [str(u) for u in d.get("users", ())]
        good = tuple(u.lower() for u in users if u == "*" or is_guid(u))
        bad = tuple(u for u in users if not (u == "*" or is_guid(u)))
        groups = [str(g) for g in d.get("groups", ())]
        bad += tuple(g for g in groups if not is_guid(g))
        return cls(good, tuple(g.lower() for g in groups if is_guid(g)), bool(d.get("guests", False)), bad)


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
            return not who.app  # a workload's logins are the ones mapped to it by name
        if self.oid is not None:
            return self.oid == who.oid.lower()
        return self.group is not None and self.group in {g.lower() for g in who.groups}

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {}
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
    def from_row(cls, d: dict[str, Any]) -> LoginMap:
        return cls(
            logins=tuple(d.get("logins", ())),
            oid=d.get("oid"),
            group=d.get("group"),
            members=bool(d.get("members", False)),
            display=d.get("display"),
        )


@dataclass(frozen=True)
class Rule:
    subjects: Subjects
    action: Action

    def to_dict(self) -> dict[str, Any]:
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

    def to_dict(self) -> dict[str, Any]:
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
    def from_dict(cls, d: dict[str, Any]) -> CaKeyRef:
        backend = d.get("backend") or ""
        # Rows written before `customer_owned` existed marked such keys with a "-byok" backend.
        legacy_customer = backend.endswith("-byok")
        return cls(
            key_ref=d["key_ref"],
            backend=backend.removesuffix("-byok"),
            public_key=d["public_key"],
            fingerprint=d["fingerprint"],
            state=d.get("state", "current"),
            created_at=int(d.get("created_at") or 0),
            retire_after=d.get("retire_after"),
            customer_owned=bool(d.get("customer_owned", legacy_customer)),
        )


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
    audit_seq: int = field(default=0, compare=False)  # that entry's sequence number
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
        return tuple(c for c in self.host_ca if c.state == "current") + tuple(
            c for c in self.host_ca if c.state == "previous"
        )

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
        return any(host_matches(pattern, host, tags or {}) for pattern in self.hosts)

    def rule_for(self, who: Identity) -> Rule | None:
        return next((r for r in self.rules if r.subjects.matches(who, any_account=r.action == "deny")), None)

    def is_member(self, who: Identity) -> bool:
        rule = self.rule_for(who)
        return rule is not None and rule.action != "deny"

    def is_approver(self, who: Identity) -> bool:
        return not who.app and self.approvers.matches(who)

    def is_admin(self, who: Identity) -> bool:
        return not who.app and (who.is_tenant_admin or self.admins.matches(who))

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
