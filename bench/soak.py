"""Load and race run: nothing lost, nothing doubled, one winner per race.

    .venv/bin/python bench/soak.py [--issuances 2000] [--clients 16] [--races 200]

Starts its own local stack on free ports (Azurite, SoftHSM, the OIDC provider, the API under
uvicorn with one worker), then:
  load   N auto-approved issuances over HTTP at C concurrent clients, each with its own
         Idempotency-Key; afterwards every request row is read back from Azurite: issued, with its
         certificate record, an audit chain that verifies against the row's head, and no serial twice;
  races  R pending requests, each approved by bob and denied by dave at the same instant (a barrier):
         exactly one of the two wins, the other gets 409, and the audit holds exactly one decision.
Prints a table and exits non-zero if any invariant fails.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "infra" / "local")]


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(p / 100 * (len(s) - 1))))] if s else float("nan")


def fresh_key() -> str:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    return ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--issuances", type=int, default=2000)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--races", type=int, default=200)
    args = ap.parse_args()

    import httpx

    from devstack.oidc import sign_in
    from devstack.proc import free_port
    from devstack.stack import Ports, ensure_policy, identity_of, up
    from functions.core.audit import verify_chain
    from functions.settings import load_settings
    from functions.storage.tables import TableStore
    from functions.wiring import build_context

    failures: list[str] = []
    with tempfile.TemporaryDirectory(prefix="ezssh-soak-") as tmp:
        stack = up(Path(tmp) / "state", Ports(azurite=free_port(), azurite_queue=free_port(), oidc=free_port(),
                                              api=free_port(), sshd=free_port()), with_sshd=False,
                   settings={"EZSSH_REQUEST_RATE": "10000"})  # measure issuance, not the per-user limiter
        try:
            oidc = stack.oidc
            tokens = {u: sign_in(oidc, u)["access_token"] for u in ("alice", "bob", "dave")}
            hdr = {u: {"Authorization": f"Bearer {t}"} for u, t in tokens.items()}
            ctx = build_context(load_settings(stack.env))
            users = oidc.group_id("contoso", "ezssh-users")
            approvers = oidc.group_id("contoso", "ezssh-approvers")
            carol = identity_of(oidc, "carol")
            ensure_policy(ctx.service, carol, {"id": "soak", "rules": [{"groups": [users], "action": "auto"}],
                                               "hosts": ["soak-*"], "principals": ["alice"]})
            ensure_policy(ctx.service, carol, {"id": "race", "rules": [{"groups": [users], "action": "approval"}],
                                               "hosts": ["race-*"], "principals": ["alice"],
                                               "approvers": {"groups": [approvers]}})
            tid = oidc.tenant_id("contoso")
            truth = TableStore.from_connection_string(stack.env["EZSSH_STORAGE_CONNECTION_STRING"],
                                                      stack.env.get("EZSSH_TABLE_NAME", "ezssh"))
            local = threading.local()

            def client() -> httpx.Client:
                if not hasattr(local, "c"):
                    local.c = httpx.Client(base_url=stack.api_url, timeout=120)
                return local.c

            # ---- load ------------------------------------------------------------------------
            keys = [fresh_key() for _ in range(args.issuances)]
            lat: list[float] = []
            codes: dict[int, int] = {}

            def issue(i: int) -> None:
                t = time.perf_counter()
                r = client().post("/api/requests", headers={**hdr["alice"], "Idempotency-Key": uuid.uuid4().hex},
                                  json={"host": f"soak-{i}", "principal": "alice", "public_key": keys[i],
                                        "policy": "soak"})
                lat.append(time.perf_counter() - t)
                codes[r.status_code] = codes.get(r.status_code, 0) + 1

            t0 = time.perf_counter()
            with ThreadPoolExecutor(args.clients) as pool:
                list(pool.map(issue, range(args.issuances)))
            wall = time.perf_counter() - t0
            rows = [r for r in truth.list_requests(tid) if r.policy_id == "soak"]
            serials = [r.serial for r in rows]
            broken = 0
            by_request: dict[str, list] = {}
            for e in truth.list_audit(tid, limit=10_000_000):
                if e.chain and e.chain.startswith("req:"):
                    by_request.setdefault(e.request_id, []).append(e)
            from functions.core.audit import in_link_order

            for rec in rows:
                if rec.state != "issued" or rec.serial is None:
                    broken += 1
                    continue
                try:
                    truth.get_certificate(tid, "soak", rec.serial)
                except Exception:  # noqa: BLE001
                    broken += 1
                    continue
                if not verify_chain(in_link_order(by_request.get(rec.id, [])), head=rec.audit_head):
                    broken += 1
            if codes.get(201, 0) != args.issuances:
                failures.append(f"answers: {codes}")
            if len(rows) != args.issuances:
                failures.append(f"{len(rows)} request rows for {args.issuances} issuances")
            if len(set(serials)) != len(serials):
                failures.append("a serial was issued twice")
            if broken:
                failures.append(f"{broken} issuances without their record or audit")

            # ---- races -----------------------------------------------------------------------
            outcome = {"approved": 0, "denied": 0, "both": 0, "neither": 0, "decisions!=1": 0}
            for i in range(args.races):
                r = client().post("/api/requests", headers=hdr["alice"],
                                  json={"host": f"race-{i}", "principal": "alice", "policy": "race"})
                rid = r.json()["id"]
                barrier = threading.Barrier(2)
                got: dict[str, int] = {}

                def act(user: str, action: str) -> None:
                    with httpx.Client(base_url=stack.api_url, timeout=60) as c:
                        barrier.wait()
                        got[action] = c.post(f"/api/requests/{rid}/{action}", headers=hdr[user], json={}).status_code

                ts = [threading.Thread(target=act, args=("bob", "approve")),
                      threading.Thread(target=act, args=("dave", "deny"))]
                for t in ts:
                    t.start()
                for t in ts:
                    t.join()
                wins = [a for a, s in got.items() if s == 200]
                if len(wins) == 1:
                    outcome["approved" if wins[0] == "approve" else "denied"] += 1
                else:
                    outcome["both" if len(wins) == 2 else "neither"] += 1
                decisions = [e for e in truth.list_audit(tid, request_id=rid, limit=100)
                             if e.action in ("request.approved", "request.denied")]
                if len(decisions) != 1:
                    outcome["decisions!=1"] += 1
            if outcome["both"] or outcome["neither"] or outcome["decisions!=1"]:
                failures.append(f"races: {outcome}")
        finally:
            stack.stop()

    la = os.getloadavg()
    print(f"ezssh soak: {os.cpu_count()} cores, one API worker, load average {la[0]:.2f} {la[1]:.2f} {la[2]:.2f}")
    print()
    print("| run | count | clients | result | p50 | p99 | rate |")
    print("|---|---|---|---|---|---|---|")
    print(f"| auto-approved issuance | {args.issuances} | {args.clients} | {codes} ; {len(rows)} rows, "
          f"{len(set(serials))} distinct serials, {broken} without record/audit | {pct(lat, 50) * 1000:.0f} ms | "
          f"{pct(lat, 99) * 1000:.0f} ms | {args.issuances / wall:.0f}/s |")
    print(f"| approve vs deny race | {args.races} | 2 | {outcome} | | | |")
    print()
    print("result:", "all invariants hold" if not failures else "FAILED: " + "; ".join(failures))
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
