"""`ezssh` command line: builds the parser and dispatches. Data goes to stdout, messages to stderr,
`--json` for scripts.

Only the standard library is imported at module level, and only the module of the command asked for
is imported and given a parser: `ezssh --version` answers before any parser exists, `ezssh ssh` goes
straight to its own argument handling.
"""

from __future__ import annotations

import os
import sys

from . import __version__
from .commands import COMMANDS
from .errors import EXIT_CODES_HELP, INTERRUPTED, USAGE, EzsshError

ENV_HELP = """\
environment:
  EZSSH_HOME                 ezssh's directory (default ~/.ezssh)
  EZSSH_SSH                  ssh program to run (default: ssh)
  EZSSH_ALLOW_DEVICE_LOGIN=1 let any command start the device sign-in without a terminal
  EZSSH_LOGIN=device|browser how `ezssh login` signs in by default (else: browser where one exists)
  EZSSH_PLAINTEXT_TOKEN_CACHE=1  keep the token cache in a 0600 file even where encryption exists"""


def _module(name: str):
    return __import__(f"ezssh.commands.{name}", fromlist=["register"])


def build_parser(only: str | None = None):
    """The argument parser; with `only` (a top-level command), just that command's module registers."""
    import argparse

    fmt = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(
        prog="ezssh",
        formatter_class=fmt,
        description="Passwordless SSH for Azure: sign in with Entra ID, get a short-lived OpenSSH "
        "certificate for a fresh local key, and run ssh with it.",
        epilog=EXIT_CODES_HELP + "\n\n" + ENV_HELP,
    )
    p.add_argument("--version", action="version", version=f"ezssh {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    modules = [COMMANDS[only]] if only in COMMANDS else list(dict.fromkeys(COMMANDS.values()))
    for name in modules:
        _module(name).register(sub, fmt)
    return p


def dispatch(argv: list[str]) -> int:
    first = argv[0] if argv else None
    if first == "--version":
        sys.stdout.write(f"ezssh {__version__}\n")
        return 0
    if first == "ssh":
        return _module("ssh").run(argv[1:])
    if first in ("cert", "certs") and argv[1:2] == ["ensure"]:  # ssh_config runs this before each connection
        return _module("certs").ensure(argv[2:])
    parser = build_parser(first)
    if not argv:
        parser.print_help(sys.stderr)
        return USAGE
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help(sys.stderr)
        return USAGE
    return args.func(args)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        return dispatch(argv)
    except EzsshError as exc:
        sys.stderr.write(f"ezssh: {exc.render()}\n")
        return exc.code
    except KeyboardInterrupt:
        sys.stderr.write("ezssh: interrupted.\n")
        return INTERRUPTED
    except BrokenPipeError:
        try:
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - stdout for the rest of the process
        except OSError:
            pass
        return 1
    except Exception as exc:  # one clear line, the traceback only on request
        if os.environ.get("EZSSH_DEBUG") == "1":
            raise
        sys.stderr.write(f"ezssh: unexpected error: {type(exc).__name__}: {exc} (set EZSSH_DEBUG=1 for details)\n")
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
