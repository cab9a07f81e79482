"""Host namespaces: the DNS suffixes, host names and IP ranges a tenant's hosts live in, declared by
its tenant admins (a policy admin can't widen them). A host certificate names only hosts inside the
namespaces AND inside its policy's own host patterns; clients trust each host CA (one
`@cert-authority` line) for exactly that intersection, written in the patterns ssh reads.

    ns = parse_namespaces(["*.contoso.internal", "bastion.contoso.com", "10.20.0.0/16"], is_public)
    inside(ns, "web1.contoso.internal")                      # True
    scope = trust_scope(policy.hosts, ns)                     # what a client may trust the CA for
    scope.names, scope.ipv4, scope.ipv6, scope.left_out       # ssh patterns, and what was left out

Entries: `*.<suffix>` (every name under a suffix of at least two labels that is no public suffix),
an exact host name (not itself a public suffix), or an IP range (a CIDR or one address). Never `*`,
a top-level or public suffix, or every address. `is_public` says whether a name is a public suffix
(the Public Suffix List; the service passes it in, core reads no data files).

Pure: stdlib only.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from .errors import InvalidRequest
from .hostmatch import host_matches

IsPublic = Callable[[str], bool]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

MAX_NAMESPACES = 64
MAX_ENUMERATED = 64  # IPv6 addresses written one by one in a known_hosts line; a wider range is left out
LABEL_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
_OCTET_GLOB = re.compile(r"^((?:\d{1,3}\.){1,3})\*$")
_WILD = set("*?[]!")
# A known_hosts line of IP patterns also lists these negated patterns: a name with a letter, a
# hyphen or an underscore is no IP address, so `10.20.*` matches only the addresses it stands for.
NOT_AN_ADDRESS = tuple(f"!*{c}*" for c in "abcdefghijklmnopqrstuvwxyz-_")


@dataclass(frozen=True)
class Namespace:
    kind: str  # "suffix" | "name" | "net"
    value: str  # the suffix without "*.", the name, or the network in CIDR form
    net: Network | None = None

    def __str__(self) -> str:
        return f"*.{self.value}" if self.kind == "suffix" else self.value

    def holds(self, name: str) -> bool:
        """Is the (normalised) host name or address inside?"""
        if self.kind == "net":
            try:
                addr = ipaddress.ip_address(name)
            except ValueError:
                return False
            return self.net is not None and addr in self.net
        if self.kind == "name":
            return name == self.value
        return name.endswith("." + self.value)


def _dns_name(text: str) -> bool:
    labels = text.split(".")
    return len(text) <= 253 and all(LABEL_RE.match(label) for label in labels) and not labels[-1].isdigit()


def parse_namespace(raw: object, is_public: IsPublic) -> Namespace:
    if not isinstance(raw, str) or not raw.strip():
        raise InvalidRequest("A host namespace is empty.")
    text = raw.strip().lower().rstrip(".")
    shown = repr(raw[:100])
    if text in ("*", "*.*") or text.startswith("*") and not text.startswith("*."):
        raise InvalidRequest(
            f"Host namespace {shown} names every host; declare the DNS suffixes and IP ranges "
            "your hosts live in, e.g. *.contoso.internal or 10.20.0.0/16."
        )
    if "/" in text or ":" in text or re.match(r"^[0-9.]+$", text):
        try:
            net = ipaddress.ip_network(text, strict=True)
        except ValueError:
            raise InvalidRequest(f"Host namespace {shown} is not a valid IP range (host bits must be zero).") from None
        if net.prefixlen == 0:
            raise InvalidRequest(f"Host namespace {shown} is every address; declare your own ranges.")
        return Namespace("net", str(net), net)
    if text.startswith("*."):
        suffix = text[2:]
        if _WILD & set(suffix) or not _dns_name(suffix):
            raise InvalidRequest(f"Host namespace {shown} is not '*.' followed by a DNS suffix.")
        if "." not in suffix or is_public(suffix):
            raise InvalidRequest(
                f"Host namespace {shown} is a top-level or public suffix (anyone can register "
                "names under it); declare a domain of your own, e.g. *.contoso.internal."
            )
        return Namespace("suffix", suffix)
    if _WILD & set(text) or not _dns_name(text):
        raise InvalidRequest(
            f"Host namespace {shown} is not a DNS suffix ('*.contoso.internal'), a host name or an IP range."
        )
    if is_public(text):
        raise InvalidRequest(f"Host namespace {shown} is a public suffix, not a host.")
    return Namespace("name", text)


def parse_namespaces(entries: object, is_public: IsPublic) -> tuple[Namespace, ...]:
    if not isinstance(entries, (list, tuple)):
        raise InvalidRequest(
            "'namespaces' must be a list of DNS suffixes ('*.contoso.internal'), host names and IP ranges."
        )
    if len(entries) > MAX_NAMESPACES:
        raise InvalidRequest(f"At most {MAX_NAMESPACES} host namespaces.")
    out: dict[str, Namespace] = {}
    for raw in entries:
        ns = parse_namespace(raw, is_public)
        out.setdefault(str(ns), ns)
    return tuple(out.values())


def inside(namespaces: Iterable[Namespace], name: str) -> bool:
    return any(ns.holds(name) for ns in namespaces)


# ---- what clients trust a host CA for -------------------------------------------------------


@dataclass(frozen=True)
class TrustScope:
    names: tuple[str, ...]  # DNS patterns (ssh's * and ?)
    ipv4: tuple[str, ...]  # IPv4 patterns; their line also lists NOT_AN_ADDRESS
    ipv6: tuple[str, ...]  # IPv6 addresses, each written out (canonical form)
    left_out: tuple[str, ...]  # what could not be written exactly, one sentence each


def _pattern_network(pattern: str) -> Network | None:
    """A policy host pattern as an IP network, where it is one (a CIDR, an address, or `10.20.*`)."""
    if "/" in pattern or re.match(r"^[0-9.]+$", pattern) or ":" in pattern:
        try:
            return ipaddress.ip_network(pattern, strict=False)
        except ValueError:
            return None
    m = _OCTET_GLOB.match(pattern)
    if m:
        octets = m.group(1).rstrip(".").split(".")
        try:
            return ipaddress.ip_network(".".join(octets + ["0"] * (4 - len(octets))) + f"/{8 * len(octets)}")
        except ValueError:
            return None
    return None


def _glob_in_suffix(glob: str, suffix: str) -> str | None:
    """The names both the glob and `*.suffix` match, as one ssh pattern, or None when that can't be
    written exactly (ssh patterns know * and ? only, not fnmatch's [...])."""
    dotted = "." + suffix
    if "[" in glob or "]" in glob:
        return None
    if not set(glob) & _WILD:  # one name
        return glob if glob.endswith(dotted) else ""
    if glob.endswith(dotted):  # every name it matches ends with the suffix
        return glob
    rest = glob[1:]
    if glob.startswith("*") and not set(rest) & _WILD and dotted.endswith(rest):
        return "*" + dotted  # the glob matches the whole namespace
    pre = glob[:-1]
    if glob.endswith("*") and pre and not set(pre) & _WILD:
        # names that start with pre and end with the suffix: pre*.suffix, and where the two can
        # share characters (pre ends where the suffix begins) the names they make together
        shared = [pre + dotted[k:] for k in range(1, min(len(pre), len(dotted)) + 1) if pre[-k:] == dotted[:k]]
        return ",".join([pre + "*" + dotted] + [n for n in shared if n.endswith(dotted)])
    # both end every name they match with a literal: one must end with the other, or none is in both
    tail = re.split(r"[*?]", glob)[-1]
    if tail and not dotted.endswith(tail) and not tail.endswith(dotted):
        return ""
    return None


def _subnet_of(a: Network, b: Network) -> bool:
    """`a` inside `b` (False across IP versions)."""
    if isinstance(a, ipaddress.IPv4Network) and isinstance(b, ipaddress.IPv4Network):
        return a.subnet_of(b)
    if isinstance(a, ipaddress.IPv6Network) and isinstance(b, ipaddress.IPv6Network):
        return a.subnet_of(b)
    return False


def _address_patterns(net: Network) -> list[str] | None:
    """ssh patterns that match exactly the addresses of `net` (with NOT_AN_ADDRESS on the line), or
    None when they can't be written (an IPv6 range of more than MAX_ENUMERATED addresses)."""
    if net.version == 6:
        if net.num_addresses > MAX_ENUMERATED:
            return None
        return [str(a) for a in net] if net.num_addresses > 1 else [str(net.network_address)]
    if net.prefixlen == 32:
        return [str(net.network_address)]
    whole = -(-net.prefixlen // 8)  # octets fixed once rounded up to an octet boundary
    subnets = net.subnets(new_prefix=whole * 8) if net.prefixlen % 8 else [net]
    out = []
    for sn in subnets:
        octets = str(sn.network_address).split(".")[:whole]
        out.append(".".join(octets) if whole == 4 else ".".join(octets) + ".*")
    return out


def trust_scope(policy_hosts: Iterable[str], namespaces: Iterable[Namespace]) -> TrustScope:
    """The patterns a host CA of a policy with these host patterns may be trusted for: the
    intersection of its name globs and CIDRs with the namespaces, each written exactly or left out."""
    nss = tuple(namespaces)
    names: list[str] = []
    nets: list[Network] = []
    left: list[str] = []
    for pattern in policy_hosts:
        if pattern.startswith(("tag:", "/subscriptions/")):
            continue
        p = pattern.lower()
        pnet = _pattern_network(p)
        for ns in nss:
            if ns.kind == "net":
                assert ns.net is not None
                if pnet is not None:
                    if pnet.version == ns.net.version and pnet.overlaps(ns.net):
                        nets.append(pnet if _subnet_of(pnet, ns.net) else ns.net)
                elif p.strip("*") == "":
                    nets.append(ns.net)
                continue
            if pnet is not None and "/" in p:
                continue  # addresses are no DNS names
            if ns.kind == "name":
                if host_matches(p, ns.value, {}):
                    names.append(ns.value)
                continue
            got = _glob_in_suffix(p, ns.value)
            if got is None:
                left.append(
                    f"Host pattern {pattern!r} within namespace {str(ns)!r} can't be written as an ssh "
                    f"pattern; its hosts are not trusted through this CA (name them with patterns "
                    f"ending in .{ns.value})."
                )
            elif got:
                names += got.split(",")
    v4: list[str] = []
    v6: list[str] = []
    for net in dict.fromkeys(nets):
        pats = _address_patterns(net)
        if pats is None:
            left.append(
                f"IP range {net} is too wide to list address by address; its hosts are not trusted "
                "through this CA by address (name them by DNS name or a narrower range)."
            )
        else:
            (v6 if net.version == 6 else v4).extend(pats)
    return TrustScope(
        tuple(dict.fromkeys(names)), tuple(dict.fromkeys(v4)), tuple(dict.fromkeys(v6)), tuple(dict.fromkeys(left))
    )
