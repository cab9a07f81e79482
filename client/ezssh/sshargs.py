"""`ezssh ssh` argument handling and the ssh command line. Stdlib only.

    ezssh ssh [-e] [--policy P] [--ttl DURATION] [--reason TEXT] [--new] [--agent] [ssh options] [user@]host [ssh args...]

ezssh's own options come first. Everything after the destination goes to ssh verbatim (OpenSSH reads
options after the host too: `ezssh ssh alice@h -p 2222 whoami`). ssh options placed before the
destination are recognised with ssh's own option grammar and passed on before it (except `-e`, which
is ezssh's --explain here; ssh's escape character option still works after the destination).
"""

from __future__ import annotations

import os

from .errors import USAGE, EzsshError

# ssh(1) options that take an argument (OpenSSH 9.x getopt string, letters followed by ':').
SSH_OPTS_WITH_ARG = set("bceilmopBDEFIJLOPQRSwW")
SSH_FLAGS = set("1246afgknqstvxyACGKMNTVXY")

SSH_HELP = """\
usage: ezssh ssh [-e] [--policy ID] [--ttl DURATION] [--reason TEXT] [--new] [--agent] [user@]host [ssh args...]

Get (or reuse) a short-lived certificate for user@host and run ssh with it.

options:
  -e, --explain      print policy, login, key id, serial, validity and the ssh command line to stderr
  --policy ID        ask under this access policy (default: the service picks the matching one)
  --ttl DURATION     certificate lifetime, e.g. 30m, 1h, 90s (above the policy maximum it is refused)
  --reason TEXT      reason recorded with the request (shown to approvers)
  --new              do not reuse a cached certificate
  --agent            also add the key and certificate to ssh-agent until it expires (so -A forwards it)
  -h, --help         show this help

Everything after the host goes to ssh unchanged, e.g. `ezssh ssh alice@web1 -p 2222 uptime`.
Host and login are what ssh itself would use (`ssh -G`): an alias in ~/.ssh/config becomes its
HostName, and its `User` the login; else user@host, `-l login`, `-o User=login`, or your local user
name. $EZSSH_SSH names the ssh program (default: ssh).
"""


class SshInvocation:
    """What `ezssh ssh` was asked to do (a plain class: dataclasses is slow to import)."""

    def __init__(
        self,
        destination: str,
        host: str,
        principal: str,
        ssh_args: list[str] | None = None,
        pre_args: list[str] | None = None,
        explain: bool = False,
        policy: str | None = None,
        ttl: int | None = None,
        reason: str | None = None,
        new: bool = False,
        agent: bool = False,
    ) -> None:
        self.destination = destination  # as typed: [user@]host
        self.host = host
        self.principal = principal
        self.ssh_args = list(ssh_args or [])  # after the destination, verbatim
        self.pre_args = list(pre_args or [])  # ssh options given before the destination
        self.explain = explain
        self.policy = policy
        self.ttl = ttl
        self.reason = reason
        self.new = new
        self.agent = agent

    def __repr__(self) -> str:
        return f"SshInvocation({self.__dict__!r})"


def _usage(msg: str) -> EzsshError:
    return EzsshError(
        f"{msg}\nusage: ezssh ssh [-e] [--policy ID] [--ttl DURATION] [--reason TEXT] [--new] "
        "[--agent] [user@]host [ssh args...]",
        USAGE,
    )


def _ssh_option(tokens: list[str], i: int) -> tuple[list[str], int]:
    """Consume one getopt-style ssh option token (and its argument) at tokens[i]."""
    tok = tokens[i]
    for j, ch in enumerate(tok[1:], start=1):
        if ch in SSH_OPTS_WITH_ARG:
            if j + 1 < len(tok):
                return [tok], i + 1
            if i + 1 >= len(tokens):
                raise _usage(f"ssh option -{ch} needs an argument")
            return [tok, tokens[i + 1]], i + 2
        if ch not in SSH_FLAGS:
            raise _usage(f"unknown option {tok!r} before the host")
    return [tok], i + 1


def login_from_ssh_options(tokens: list[str]) -> str | None:
    """The first login given by `-l login`, `-llogin` or `-o User=login` in getopt-style ssh options.

    Scanning stops at the first non-option (the remote command) or `--`, as ssh's own parser does.
    """
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if tok == "--" or not tok.startswith("-") or tok == "-":
            return None
        for j, ch in enumerate(tok[1:], start=1):
            if ch in SSH_OPTS_WITH_ARG:
                if j + 1 < len(tok):
                    val, i = tok[j + 1 :], i + 1
                elif i + 1 < len(tokens):
                    val, i = tokens[i + 1], i + 2
                else:
                    return None
                if ch == "l" and val:
                    return val
                if ch == "o":
                    key, _, rest = val.replace("=", " ", 1).partition(" ")
                    if key.strip().lower() == "user" and rest.strip():
                        return rest.strip().strip('"')
                break
        else:
            i += 1
    return None


def parse(argv: list[str], *, local_user: str | None = None) -> SshInvocation | None:
    """Parse `ezssh ssh` arguments; None means help was asked for."""
    explain = new = agent = False
    policy = reason = None
    ttl: int | None = None
    pre: list[str] = []
    i = 0

    def value(name: str) -> str:
        nonlocal i
        tok = argv[i]
        if "=" in tok and tok.startswith("--"):
            i += 1
            return tok.split("=", 1)[1]
        if i + 1 >= len(argv):
            raise _usage(f"{name} needs a value")
        i += 2
        return argv[i - 1]

    while i < len(argv):
        tok = argv[i]
        if tok in ("-h", "--help"):
            return None
        if tok in ("-e", "--explain"):
            explain, i = True, i + 1
        elif tok == "--new":
            new, i = True, i + 1
        elif tok == "--agent":
            agent, i = True, i + 1
        elif tok == "--policy" or tok.startswith("--policy="):
            policy = value("--policy")
        elif tok == "--reason" or tok.startswith("--reason="):
            reason = value("--reason")
        elif tok == "--ttl" or tok.startswith("--ttl="):
            raw = value("--ttl")
            try:
                from .durations import parse_duration

                ttl = parse_duration(raw)
            except ValueError as exc:
                raise _usage(f"--ttl: {exc}") from None
        elif tok == "--":
            i += 1
            break
        elif tok.startswith("--"):
            raise _usage(f"unknown option {tok!r}")
        elif tok.startswith("-") and tok != "-":
            taken, i = _ssh_option(argv, i)
            pre.extend(taken)
        else:
            break
    if i >= len(argv):
        raise _usage("missing the host to connect to")
    destination, rest = argv[i], list(argv[i + 1 :])
    if destination.startswith("-") or not destination:
        raise _usage(f"{destination!r} is not a host")

    user, at, host = destination.rpartition("@")
    if at and not user:
        raise _usage(f"{destination!r}: empty user name before '@'")
    if not host:
        raise _usage(f"{destination!r}: empty host name")
    # ssh's own precedence: the first of -l before the host, user@host, -l after the host wins.
    principal = login_from_ssh_options(pre) or (user if at else None) or login_from_ssh_options(rest)
    if not principal:
        if not local_user:
            import getpass

            local_user = getpass.getuser()
        principal = local_user
    if any(c.isspace() or c in "/\0" for c in principal):
        raise _usage(f"{principal!r} is not a valid login name")
    return SshInvocation(
        destination=destination,
        host=host,
        principal=principal,
        ssh_args=rest,
        pre_args=pre,
        explain=explain,
        policy=policy,
        ttl=ttl,
        reason=reason,
        new=new,
        agent=agent,
    )


def ssh_program() -> list[str]:
    raw = os.environ.get("EZSSH_SSH", "").strip()
    if not raw:
        return ["ssh"]
    import shlex

    return shlex.split(raw)


def ssh_argv(inv: SshInvocation, key: str, cert: str, *, agent: bool = False) -> list[str]:
    """The ssh command line. Without agent mode ssh is kept off any agent (`IdentityAgent=none`);
    in agent mode the agent holds this key and certificate, so `-A` forwards them."""
    return [
        *ssh_program(),
        "-i",
        key,
        "-o",
        f"CertificateFile={cert}",
        "-o",
        "IdentitiesOnly=yes",
        *(() if agent else ("-o", "IdentityAgent=none")),
        *inv.pre_args,
        inv.destination,
        *inv.ssh_args,
    ]


def run_ssh(argv: list[str]) -> int:
    """Run ssh as a child and return its exit status (128+N when killed by signal N).

    While ssh runs, the parent does nothing on SIGINT (a no-op handler, NOT SIG_IGN: an ignored
    SIGINT would be inherited across exec, and ssh keeps it ignored) so ssh alone handles Ctrl-C.
    """
    import signal

    from .spawn import run
    from .sshconfig import IN_SSH_ENV

    env = {**os.environ, IN_SSH_ENV: "1"}  # ezssh's ssh_config block: the certificate is given already
    old_int = signal.signal(signal.SIGINT, lambda *_: None)
    old_quit = signal.signal(signal.SIGQUIT, lambda *_: None)
    try:
        try:
            rc, _ = run(argv, env)
        except FileNotFoundError:
            raise EzsshError(f"ssh program not found: {argv[0]!r} (set $EZSSH_SSH or install OpenSSH)") from None
    finally:
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGQUIT, old_quit)
    return 128 - rc if rc < 0 else rc
