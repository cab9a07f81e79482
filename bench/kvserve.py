"""The Key Vault stand-in in a process of its own, so its CPU is not counted as ezssh's.

    python bench/kvserve.py --latency 0.02

Prints one JSON line {"url", "ca", "token"} when it listens; then answers commands on stdin, one a
line: "count" prints the number of sign requests served so far, "requests" the number of all requests;
"quit" (or end of input) stops it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.standins.keyvault import KeyVaultStandIn  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--latency", type=float, default=0.0)
    args = ap.parse_args()
    kv = KeyVaultStandIn(latency=args.latency).start()
    try:
        print(json.dumps({"url": kv.url, "ca": kv.ca_path, "token": kv.token}), flush=True)
        for line in sys.stdin:
            cmd = line.strip()
            if cmd == "count":
                print(kv.count("POST", "/sign"), flush=True)
            elif cmd == "requests":
                print(kv.count(), flush=True)
            elif cmd == "quit":
                break
    finally:
        kv.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
