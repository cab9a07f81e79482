"""`ezssh config`: make plain ssh, scp, sftp, rsync, git and VS Code Remote-SSH use ezssh certificates.

Writes $EZSSH_HOME/ssh_config (ezssh owns it and rewrites it) and adds one Include of it at the top of
~/.ssh/config; `--remove` takes exactly those lines out again (the file is then byte for byte what it
was). See sshconfig.py for the block itself.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from .. import sshconfig
from ..errors import OK, USAGE, EzsshError
from ..home import home_dir, load_config, save_config, write_private
from ..output import err, out_json


def self_command() -> list[str]:
    """How ssh should run this ezssh: the console script if that is what runs, else `python -m ezssh`."""
    prog = Path(sys.argv[0]) if sys.argv and sys.argv[0] else None
    if prog is not None and prog.name in ("ezssh", "ezssh.exe") and prog.exists():
        return [os.path.abspath(prog)]
    return [sys.executable, "-m", "ezssh"]


def _policy_hosts() -> list[str]:
    from ..context import Ctx

    _, data = Ctx().api.json("GET", "/api/policies")
    hosts: list[str] = []
    for p in data.get("policies") or []:
        you = p.get("you") or {}
        if you and not you.get("member"):
            continue  # policies you only administer or approve for give you no logins
        hosts += list(p.get("hosts") or [])
    return hosts


def cmd_config(args) -> int:
    home = home_dir()
    cfg = load_config(home)
    owned = home / sshconfig.OWNED_FILE
    state = cfg.get("ssh_config") or {}
    user_config = Path(args.ssh_config or state.get("path") or Path.home() / ".ssh" / "config").expanduser().absolute()

    if args.remove:
        changed = sshconfig.uninstall(user_config, owned, bool(state.get("created")))
        try:
            owned.unlink()
        except FileNotFoundError:
            pass
        cfg.pop("ssh_config", None)
        save_config(cfg, home)
        err(
            f"Removed ezssh's Include from {user_config}."
            if changed
            else f"{user_config} holds no Include of ezssh's; nothing to remove there."
        )
        return OK

    hosts = [h for item in args.host for h in item.split(",")] if args.host else None
    command = args.command.split() if args.command else self_command()
    block, patterns, skipped = write_block(
        cfg, home, hosts=hosts, command=command, agent=args.agent, dry_run=args.print
    )
    if args.print:
        sys.stdout.write(block)
        return OK
    changed, created = sshconfig.install(user_config, owned)
    cfg["ssh_config"] = {
        "path": str(user_config),
        "created": created if changed else bool(state.get("created")),
        "hosts": hosts,
        "command": command,
        "agent": args.agent,
    }
    save_config(cfg, home)
    if args.json:
        out_json(
            {
                "ssh_config": str(user_config),
                "include": str(owned),
                "patterns": patterns,
                "skipped": skipped,
                "changed": changed,
            }
        )
    default_config = os.path.realpath(Path(_account_home() or Path.home()) / ".ssh" / "config")
    plain = "ssh" if os.path.realpath(user_config) == default_config else f"ssh -F {user_config}"
    err(
        f"ssh now gets ezssh certificates for: {' '.join(patterns)}\n"
        f"  {owned} (ezssh's block){'' if changed else ' rewritten'}; "
        f"{'added its Include to' if changed else 'already included by'} {user_config}.\n"
        f"Try: {plain} <login>@<host>   (undo: ezssh config --remove)"
    )
    account_home = _account_home()
    if account_home and not args.ssh_config and os.path.realpath(Path.home()) != os.path.realpath(account_home):
        err(
            f"Note: ssh reads ~/.ssh/config from your account's home ({account_home}), not from $HOME: "
            f"give ssh `-F {user_config}`, or run `ezssh config --ssh-config {account_home}/.ssh/config`."
        )
    return OK


def write_block(
    cfg: dict, home: Path, *, hosts: list[str] | None, command: list[str], agent: bool, dry_run: bool = False
) -> tuple[str, list[str], list[str]]:
    """Render $EZSSH_HOME/ssh_config for the configured server (its policies' hosts unless `hosts`
    names them) and write it unless `dry_run`. Returns (block, patterns, skipped)."""
    patterns, skipped = sshconfig.host_patterns(hosts if hosts is not None else _policy_hosts())
    if skipped:
        err(
            "ezssh: these host patterns have no ssh_config form and are left out (name such hosts with "
            f"--host): {', '.join(skipped)}"
        )
    if not patterns:
        raise EzsshError(
            "No host patterns to configure: your policies name none that ssh_config can match.",
            USAGE,
            hint="Name them: ezssh config --host 'web-*' --host 10.0.0.4",
        )
    from ..certs import certs_root

    block = sshconfig.render_block(
        home=home, slot_root=certs_root(home), patterns=patterns, command=command, server=cfg["server"], agent=agent
    )
    if not dry_run:
        write_private(home / sshconfig.OWNED_FILE, block, 0o644)
        from .. import knownhosts

        knownhosts.ensure_files(home)  # ezssh's own known hosts (host CAs) and their KRL, empty until fetched
    return block, patterns, skipped


def fix_command(state: dict) -> str:
    """The `ezssh config` command line that writes the block again with the options it was made with."""
    import shlex

    parts = ["ezssh", "config"] + [a for h in state.get("hosts") or [] for a in ("--host", h)]
    if state.get("agent"):
        parts.append("--agent")
    default = str(Path.home() / ".ssh" / "config")
    if state.get("path") and os.path.realpath(state["path"]) != os.path.realpath(default):
        parts += ["--ssh-config", state["path"]]
    return shlex.join(parts)


def follow_server(cfg: dict, home: Path) -> str | None:
    """After a sign-in: if ezssh's block was written for another server (or an older layout), write it
    again for this one, with the options it was made with. Returns what was done, or None."""
    state = cfg.get("ssh_config")
    owned = home / sshconfig.OWNED_FILE
    if not state or not owned.exists():
        return None
    if sshconfig.block_problem(owned.read_text(errors="replace"), home, cfg["server"]) is None:
        return None
    command = state.get("command") or self_command()
    write_block(cfg, home, hosts=state.get("hosts"), command=command, agent=bool(state.get("agent")))
    return f"rewrote {owned} for {cfg['server']}"


def _account_home() -> str | None:
    try:
        import pwd
    except ImportError:  # Windows: ssh uses %USERPROFILE%, which is what Path.home() reads
        return None
    try:
        return pwd.getpwuid(os.getuid()).pw_dir
    except KeyError:
        return None


def register(sub, fmt) -> None:
    c = sub.add_parser(
        "config",
        formatter_class=fmt,
        help="make plain ssh/scp/sftp/rsync/git/VS Code use ezssh certificates (ssh_config)",
        description="Write an ssh_config block (in a file ezssh owns, Included at the top of ~/.ssh/config)\n"
        "that makes every OpenSSH client get a valid certificate before it connects to the hosts\n"
        "of your policies (or the --host patterns you name). Aliases, HostName, User and Port\n"
        "resolve as ssh resolves them. Running it again rewrites the block; --remove undoes it.",
        epilog="The block:\n"
        '  Match final host PATTERNS exec "... ezssh cert ensure %r@%h -p %p"\n'
        "      IdentityFile     $EZSSH_HOME/certs/%r@%h/id_ed25519\n"
        "      CertificateFile  $EZSSH_HOME/certs/%r@%h/id_ed25519-cert.pub\n"
        "      UserKnownHostsFile ~/.ssh/known_hosts ~/.ssh/known_hosts2 $EZSSH_HOME/known_hosts",
    )
    c.add_argument(
        "--host",
        action="append",
        metavar="PATTERN",
        help="host name glob or IPv4 CIDR to cover (repeatable; default: your policies' hosts)",
    )
    c.add_argument("--ssh-config", metavar="FILE", help="the ssh_config to add the Include to (default ~/.ssh/config)")
    c.add_argument("--agent", action="store_true", help="agent mode: also add each certificate to ssh-agent")
    c.add_argument("--command", metavar="CMD", help="how ssh runs ezssh (default: this ezssh, by its full path)")
    c.add_argument("--print", action="store_true", help="print the block instead of writing anything")
    c.add_argument("--remove", action="store_true", help="take ezssh's Include out of the ssh_config again")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_config)
