"""python -m devstack up|down|status|demo [--state-dir DIR]  (run with infra/local on sys.path)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import stack


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="devstack", description=__doc__)
    ap.add_argument("command", choices=["up", "down", "status", "demo"])
    ap.add_argument("--state-dir", type=Path, default=stack.DEFAULT_STATE)
    args = ap.parse_args(argv)
    if args.command == "down":
        stopped = stack.down(args.state_dir)
        print("stopped: " + (", ".join(stopped) or "nothing was running"), file=sys.stderr)
        return 0
    if args.command == "status":
        print(json.dumps(stack.status(args.state_dir), indent=2))
        return 0
    if stack.status(args.state_dir).get("running", True) is not False:
        stack.down(args.state_dir)
    try:
        s = stack.up(args.state_dir)
    except stack.StandInError as exc:
        print(f"devstack: {exc}", file=sys.stderr)
        return 1
    print(
        f"local stack up (state in {args.state_dir}):\n"
        f"  API           {s.api_url}\n"
        f"  identity      {s.oidc.base_url}/<tenant>  (dev CA {s.oidc.ca_path})\n"
        f"  Azurite       http://127.0.0.1:{s.ports.azurite}\n"
        f"  SoftHSM token {s.token.label} ({s.token.conf_path})\n"
        f"  sshd          127.0.0.1:{s.ports.sshd} trusting policy 'demo'\n"
        f"stop it with: make down",
        file=sys.stderr,
    )
    if args.command == "demo":
        from .demo import run_demo

        return run_demo(s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
