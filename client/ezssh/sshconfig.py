"""ssh_config, both ways. Stdlib only.

- `resolve()` asks OpenSSH itself (`ssh -G`) what a command line means after ~/.ssh/config: the real
  host name (an alias's HostName), the login (`User`) and the port. `ezssh ssh` asks the service for
  that host and login, as plain ssh would connect.
- `render_block()` / `install()` / `uninstall()`: `ezssh config` writes an ssh_config file it owns
  ($EZSSH_HOME/ssh_config) and one `Include` of it at the top of ~/.ssh/config, so plain ssh, scp,
  sftp, rsync, git and VS Code get a certificate before they connect; `--remove` takes exactly those
  lines out again.

The block is a `Match final host PATTERNS exec "... ezssh cert ensure %r@%h -p %p"`: `final` makes ssh
evaluate it after the whole configuration, so %h is the HostName an alias points to and %r the User
it sets, whichever file sets them. The exec is skipped for hosts the patterns do not name.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .certs import EXPIRES
from .errors import USAGE, EzsshError

IN_SSH_ENV = "EZSSH_IN_SSH"  # set for the ssh that `ezssh ssh` runs: its certificate is given already
OWNED_FILE = "ssh_config"
KNOWN_HOSTS = "known_hosts"  # ezssh's own known-hosts file (host CAs, as @cert-authority lines)
MARK = "# ezssh: the Include below was added by `ezssh config`; `ezssh config --remove` takes it out."
MAX_CIDR_PATTERNS = 64
# Names that hold a character some shell reads specially never reach the `exec` line: the Match
# lists, as negated patterns, every such character that an ssh_config pattern can carry. The list
# goes in double quotes, the one quoting every OpenSSH since 8.0 reads alike (8.0-9.3 split Match
# arguments with strdelim, which knows only double quotes and keeps a backslash; later ones with
# argv_split, where a bare single quote opens a quoted word). Left: `"`, `,`, `*` and `?`, which no
# pattern can name; sh reads them as they are inside the single quotes %r and %h stand in.
SHELL_SPECIAL = "'\\`$;&|<>(){}^%~#! \t"
SAFE_NAME = ",".join(f"!*{c}*" for c in SHELL_SPECIAL)
_GLOB_OK = re.compile(r"^[A-Za-z0-9.*?_:\[\]-]+$")


# ---- ssh -G ---------------------------------------------------------------------------------------


def resolve(ssh: list[str], pre_args: list[str], destination: str, post_args: list[str]) -> dict | None:
    """{hostname, user, port, ...} as `ssh -G` prints them for this command line, or None when the
    program gives no such answer (it is not OpenSSH, or the options are not valid)."""
    from .spawn import run

    env = dict(os.environ)
    env[IN_SSH_ENV] = "1"  # our own Match block need not run `cert ensure` for this
    try:
        rc, out = run([*ssh, "-G", *pre_args, destination, *post_args], env, capture=True)
    except OSError:
        return None
    if rc != 0:
        return None
    opts: dict[str, str] = {}
    for line in out.decode(errors="replace").splitlines():
        key, _, value = line.partition(" ")
        opts.setdefault(key.lower(), value)
    if not opts.get("hostname") or not opts.get("user"):
        return None
    return opts


# ---- the owned block --------------------------------------------------------------------------------


def host_patterns(policy_hosts: list[str]) -> tuple[list[str], list[str]]:
    """(ssh_config `Match host` patterns, policy patterns that ssh cannot express).

    Name globs pass as they are; IPv4 CIDRs become octet globs (10.1.0.0/16 -> 10.1.*), enumerated
    when the prefix is not on an octet boundary (at most 64); tags, Azure resource ids and IPv6
    ranges have no ssh_config form (name their hosts with --host)."""
    import ipaddress

    out: list[str] = []
    skipped: list[str] = []
    for raw in policy_hosts:
        p = raw.strip()
        if not p:
            continue
        if "/" in p and not p.startswith("/"):
            try:
                net = ipaddress.ip_network(p, strict=False)
            except ValueError:
                skipped.append(p)
                continue
            if net.version != 4:
                skipped.append(p)
                continue
            octets = net.prefixlen // 8 + (1 if net.prefixlen % 8 else 0)
            subnets = list(net.subnets(new_prefix=octets * 8)) if net.prefixlen % 8 else [net]
            if len(subnets) > MAX_CIDR_PATTERNS:
                skipped.append(p)
                continue
            for sn in subnets:
                parts = str(sn.network_address).split(".")[:octets]
                out.append(".".join(parts) if octets == 4 else ".".join(parts + ["*"]))
        elif _GLOB_OK.match(p):
            out.append(p.lower())
        else:
            skipped.append(p)
    return list(dict.fromkeys(out)), skipped


def _cfg_quote(value: str) -> str:
    """A value for an ssh_config line: %-tokens kept only where we put them, spaces in double quotes."""
    return f'"{value}"' if any(c.isspace() for c in value) else value


def _esc(path: str) -> str:
    return path.replace("%", "%%")


def render_block(
    *, home: Path, slot_root: Path, patterns: list[str], command: list[str], server: str, agent: bool = False
) -> str:
    """The content of $EZSSH_HOME/ssh_config."""
    import shlex

    ensure = (
        f"EZSSH_HOME={shlex.quote(_esc(str(home)))} "
        + " ".join(shlex.quote(_esc(c)) for c in command)
        + " cert ensure"
        + (" --agent" if agent else "")
    )
    slot = _esc(str(slot_root)) + "/%r@%h"
    if "'" in slot:
        raise EzsshError(f"ezssh's directory {slot_root} holds a quote (') that ssh_config cannot carry.", USAGE)
    # %r and %h go to sh inside single quotes, and the Match line leaves out any login or host with a
    # quote, backslash or other shell-special character (SAFE_NAME): no name that could mean
    # something to a shell reaches one, and the rest are one word.
    # Before starting ezssh at all, sh reads the slot's reuse-until time: a cached certificate costs
    # one `date`. (Not in agent mode: ezssh itself puts the certificate into the current agent.)
    cached = "" if agent else f"{{ read t < '{slot}/{EXPIRES}' && test $t -gt $(date +%%s); }} 2>/dev/null || "
    exec_cmd = f"test x${{{IN_SSH_ENV}}} = x1 || {cached}{ensure} '%r@%h' -p %p"
    if '"' in exec_cmd:
        raise EzsshError(f"The ezssh command {command!r} cannot go into ssh_config (it holds a double quote).", USAGE)
    known = _esc(str(home / KNOWN_HOSTS))
    return (
        f"# Written by `ezssh config` for {server}. ezssh rewrites this file; edit the patterns with\n"
        f"# `ezssh config --host PATTERN` instead. `ezssh config --remove` takes it out of ~/.ssh/config.\n"
        f"#\n"
        f"# For these hosts ssh first runs `ezssh cert ensure`, which reuses or obtains a short-lived\n"
        f"# certificate for the login (%r) and the real host name (%h) after aliases, then offers it.\n"
        f'Match final host "{",".join(patterns)},{SAFE_NAME}" user "*,{SAFE_NAME}" exec "{exec_cmd}"\n'
        f"    IdentityFile {_cfg_quote(slot + '/id_ed25519')}\n"
        f"    CertificateFile {_cfg_quote(slot + '/id_ed25519-cert.pub')}\n"
        f"    UserKnownHostsFile ~/.ssh/known_hosts ~/.ssh/known_hosts2 {_cfg_quote(known)}\n"
        f"    RevokedHostKeys {_cfg_quote(known + '.krl')}\n"
    )


_WRITTEN_FOR = re.compile(r"^# Written by `ezssh config` for (\S+)\. ", re.M)


def block_problem(block: str, home: Path, server: str) -> str | None:
    """Why ezssh's block does not fit this configuration (None when it does): written for another
    server, or naming key paths or an ezssh directory other than this one's."""
    from .certs import certs_root, same_server

    m = _WRITTEN_FOR.search(block)
    if m is None or not same_server(m[1], server):
        return f"it was written for {m[1] if m else 'an unknown server'}, but ezssh is configured for {server}"
    want = f"IdentityFile {_cfg_quote(_esc(str(certs_root(home))) + '/%r@%h/id_ed25519')}"
    if want not in block.splitlines() and f"    {want}" not in block.splitlines():
        return f"its key paths are not {certs_root(home)}/%r@%h (an older ezssh, or another EZSSH_HOME)"
    return None


# ---- ~/.ssh/config --------------------------------------------------------------------------------


def include_lines(owned: Path) -> str:
    return f"{MARK}\nInclude {_cfg_quote(_esc(str(owned)))}\n"


def install(user_config: Path, owned: Path) -> tuple[bool, bool]:
    """Put the Include of `owned` at the top of `user_config` (before any Host or Match line, where it
    applies to every host). Returns (changed, created). Idempotent: an existing Include stays."""
    lines = include_lines(owned)
    try:
        before = user_config.read_bytes()
    except FileNotFoundError:
        before = None
    if before is not None and lines.encode() in before:
        return False, False
    created = before is None
    if created:
        user_config.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    data = lines.encode() + (before or b"")
    _write_like(user_config, data)
    return True, created


def uninstall(user_config: Path, owned: Path, created: bool) -> bool:
    """Take exactly the lines `install` added out of `user_config`; delete the file if `install` made it
    and nothing else is in it. Returns whether anything changed."""
    lines = include_lines(owned).encode()
    try:
        before = user_config.read_bytes()
    except FileNotFoundError:
        return False
    if lines not in before:
        return False
    after = before.replace(lines, b"", 1)
    if created and not after:
        user_config.unlink()
    else:
        _write_like(user_config, after)
    return True


def _write_like(path: Path, data: bytes) -> None:
    """Replace `path` atomically, keeping its mode (0600 for a new file); through a symlink, its target."""
    from .home import write_private

    try:
        mode = path.stat().st_mode & 0o7777
    except FileNotFoundError:
        mode = 0o600
    write_private(path.resolve() if path.is_symlink() else path, data, mode)
