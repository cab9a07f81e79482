"""python -m devstack up|down|status|demo|login [--state-dir DIR] [--ports SPEC] [--user NAME] [--home DIR]
(run with infra/local on sys.path).

Ports: --ports api=17071,sshd=12222 (or EZSSH_DEV_PORTS; names: azurite, azurite_queue, oidc, api, sshd; defaults
10002, 10001, 8443, 7071, 2222). `login` signs a dev user (default alice) in to the running stack with the
CLI, playing the browser for the device code; the CLI's directory is --home (default .local/my-home).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from . import stack


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="devstack", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["up", "down", "status", "demo", "login"])
    ap.add_argument("--state-dir", type=Path, default=stack.DEFAULT_STATE)
    ap.add_argument("--ports", default=os.environ.get("EZSSH_DEV_PORTS"), metavar="SPEC",
                    help="e.g. api=17071,sshd=12222 (default: $EZSSH_DEV_PORTS, else the fixed ports)")
    ap.add_argument("--user", default="alice", help="login: the dev user to sign in (users.json)")
    ap.add_argument("--home", type=Path, default=stack.DEFAULT_STATE / "my-home",
                    help="login: the CLI's directory (EZSSH_HOME)")
    ap.add_argument("--json", action="store_true", help="status: the recorded state as JSON")
    args = ap.parse_args(argv)
    if args.command == "down":
        stopped = stack.down(args.state_dir)
        print("stopped: " + (", ".join(stopped) or "nothing was running"), file=sys.stderr)
        return 0
    if args.command == "status":
        info = stack.status(args.state_dir)
        print(json.dumps(info, indent=2) if args.json else stack.describe(info))
        return 0
    if args.command == "login":
        home = args.home.resolve()
        try:
            rc = stack.login(args.state_dir, args.user, home)
        except stack.StandInError as exc:
            print(f"devstack: {exc}", file=sys.stderr)
            return 1
        if rc == 0:
            print(f"\nSigned in as {args.user}. Use this CLI directory with:\n  export EZSSH_HOME={home}",
                  file=sys.stderr)
        return rc
    try:
        ports = stack.Ports.parse(args.ports)
        info = stack.status(args.state_dir)
        if info.get("running", True) is not False:
            if args.command == "up" and all(p["alive"] for p in info["processes"]):
                print("The local stack is already running; nothing was restarted (`make down` stops it, "
                      "`make status` shows it):\n" + stack.describe(info), file=sys.stderr)
                return 0
            dead = [p["name"] for p in info["processes"] if not p["alive"]]
            print(f"devstack: restarting the local stack{' (' + ', '.join(dead) + ' had stopped)' if dead else ''}",
                  file=sys.stderr)
            stack.down(args.state_dir)
        root = os.geteuid() == 0
        if not root:
            print("devstack: not root, so no sshd (it must run as root to log in as other users); the rest "
                  "of the stack runs. As root, `make up` also starts it and creates missing login users.",
                  file=sys.stderr)
        s = stack.up(args.state_dir, ports, with_sshd=root)
    except stack.StandInError as exc:
        print(f"devstack: {exc}", file=sys.stderr)
        return 1
    print(
        f"local stack up (state in {args.state_dir}):\n"
        f"  API           {s.api_url}\n"
        f"  identity      {s.oidc.base_url}/<tenant>  (dev CA {s.oidc.ca_path})\n"
        f"  Azurite       tables http://127.0.0.1:{s.ports.azurite}, queues http://127.0.0.1:{s.ports.azurite_queue}\n"
        f"  SoftHSM token {s.token.label} ({s.token.conf_path})\n"
        + (f"  sshd          127.0.0.1:{s.ports.sshd} trusting policy 'demo'\n" if s.sshd else
           "  sshd          not started (needs root)\n") +
        f"sign in: make login   stop: make down",
        file=sys.stderr,
    )
    if args.command == "demo":
        from .demo import run_demo

        return run_demo(s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
