"""Benchmark: certificate issuance over HTTP (auto-approve; Azurite + SoftHSM), against `ssh-keygen -s`.

    .venv/bin/python bench/issue.py [--requests 400] [--concurrency 1,32] [--profile]

Starts its own local stack on free ports in a temporary directory, signs alice in once (device code,
played by the bench), then POSTs /api/requests with a fresh ed25519 public key per request. The
baseline, measured in the same run, is `ssh-keygen -s` signing one certificate per process with a
software ECDSA P-256 CA key. With --profile it also runs the service in-process under cProfile and
shows where an issuance spends its time, by component.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "infra" / "local")]


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(p / 100 * (len(s) - 1))))]


def fresh_keys(n: int) -> list[str]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    return [
        ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
        for _ in range(n)
    ]


def baseline_ssh_keygen(n: int, work: Path) -> dict:
    ca = work / "ca"
    subprocess.run(["ssh-keygen", "-q", "-t", "ecdsa", "-b", "256", "-N", "", "-f", str(ca)], check=True)
    keys = fresh_keys(n)
    lat = []
    t0 = time.perf_counter()
    for i, k in enumerate(keys):
        pub = work / f"u{i}.pub"
        pub.write_text(k + "\n")
        s = time.perf_counter()
        subprocess.run(["ssh-keygen", "-q", "-s", str(ca), "-I", f"bench{i}", "-n", "alice", "-V", "+1h",
                        "-z", str(i + 1), str(pub)], check=True, capture_output=True)
        lat.append(time.perf_counter() - s)
    total = time.perf_counter() - t0
    return {"name": "ssh-keygen -s (1 process per cert)", "conc": 1, "n": n, "lat": lat, "rate": n / total}


def run_http(url: str, token: str, n: int, conc: int) -> dict:
    import httpx

    keys = fresh_keys(n)
    headers = {"Authorization": f"Bearer {token}"}
    lat: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    local = threading.local()

    def client() -> httpx.Client:
        if not hasattr(local, "c"):
            local.c = httpx.Client(base_url=url, timeout=60, headers=headers)
        return local.c

    def one(key: str) -> None:
        s = time.perf_counter()
        r = client().post("/api/requests", json={"host": "127.0.0.1", "principal": "alice", "public_key": key})
        d = time.perf_counter() - s
        with lock:
            if r.status_code == 201:
                lat.append(d)
            else:
                errors.append(f"{r.status_code} {r.text[:120]}")

    # warm-up: connections, JWKS, signer cache
    for k in fresh_keys(min(10, conc * 2)):
        one(k)
    lat.clear()
    t0 = time.perf_counter()
    with ThreadPoolExecutor(conc) as pool:
        list(pool.map(one, keys))
    total = time.perf_counter() - t0
    if errors:
        print(f"  {len(errors)} errors, first: {errors[0]}", file=sys.stderr)
    return {"name": "ezssh POST /api/requests", "conc": conc, "n": len(lat), "lat": lat, "rate": len(lat) / total}


def profile_inprocess(stack, token: str, n: int) -> None:
    from functions.core.policy import AccessRequest
    from functions.settings import load_settings
    from functions.wiring import build_context

    ctx = build_context(load_settings(stack.env))
    keys = fresh_keys(n)
    req = AccessRequest(host="127.0.0.1", principal="alice")
    who = ctx.validator.validate("Bearer " + token)
    ctx.service.issuance.request_access(who, req, keys[0])  # warm
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    for k in keys:
        who = ctx.validator.validate("Bearer " + token)
        ctx.service.issuance.request_access(who, req, k)
    prof.disable()
    wall = (time.perf_counter() - t0) / n
    st = pstats.Stats(prof)
    buckets = {
        "token validation (PyJWT, RS256 verify)": ("identity.py", "validate"),
        "storage read (list policies)": ("tables.py", "list_policies"),
        "storage write (issuance batch)": ("tables.py", "record_issuance"),
        "HSM signing (PKCS#11 sign)": ("pkcs11.py", "_sign"),
        "certificate build (excl. signing)": ("certificate.py", "build_certificate"),
        "final check (re-parse + verify)": ("certificate.py", "verify_issued"),
        "public key vetting": ("keys.py", "parse_public_key"),
    }
    cum = {}
    for (file, _line, func), (_cc, _nc, _tt, ct, _callers) in st.stats.items():  # type: ignore[attr-defined]
        for label, (f, fn) in buckets.items():
            if file.endswith(f) and func == fn:
                cum[label] = cum.get(label, 0.0) + ct
    sign = cum.get("HSM signing (PKCS#11 sign)", 0.0)
    if "certificate build (excl. signing)" in cum:
        cum["certificate build (excl. signing)"] -= sign
    print(f"\nWhere one in-process issuance spends its time ({n} issuances, {wall * 1000:.2f} ms each, "
          f"cProfile on):")
    print(f"  {'component':45s} {'ms/issue':>9s} {'share':>6s}")
    for label, t in sorted(cum.items(), key=lambda kv: -kv[1]):
        print(f"  {label:45s} {t / n * 1000:9.2f} {t / n / wall * 100:5.0f}%")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--baseline", type=int, default=100)
    ap.add_argument("--concurrency", default="1,32")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--workers", type=int, default=1, help="uvicorn worker processes for the API")
    args = ap.parse_args()

    from devstack.proc import free_port
    from devstack.stack import Ports, up
    from devstack.oidc import sign_in

    with tempfile.TemporaryDirectory(prefix="ezssh-bench-") as tmp:
        work = Path(tmp)
        stack = up(work / "state", Ports(free_port(), free_port(), free_port(), free_port()), with_sshd=False,
                   api_workers=args.workers)
        try:
            token = sign_in(stack.oidc, "alice")["access_token"]

            rows = [baseline_ssh_keygen(args.baseline, work)]
            for conc in (int(c) for c in args.concurrency.split(",")):
                rows.append(run_http(stack.api_url, token, args.requests, conc))
            base = rows[0]
            print(f"\nIssuance benchmark ({os.cpu_count()} cores; API: uvicorn, {args.workers} worker(s); Azurite; SoftHSM EC P-256 CA)")
            print(f"{'what':38s} {'conc':>4s} {'n':>5s} {'p50 ms':>8s} {'p99 ms':>8s} {'certs/s':>8s} "
                  f"{'p50 vs base':>11s} {'rate vs base':>12s}")
            for r in rows:
                p50, p99 = pct(r["lat"], 50) * 1000, pct(r["lat"], 99) * 1000
                print(f"{r['name']:38s} {r['conc']:4d} {r['n']:5d} {p50:8.2f} {p99:8.2f} {r['rate']:8.1f} "
                      f"{p50 / (pct(base['lat'], 50) * 1000):10.2f}x {r['rate'] / base['rate']:11.2f}x")
            print("\nTarget: >= 500 certs/s and p50 <= 3 ms on 2 cores.")
            best = max(rows[1:], key=lambda r: r["rate"])
            print(f"Best ezssh rate {best['rate']:.0f} certs/s = {best['rate'] / 500 * 100:.0f}% of the target; "
                  f"p50 at concurrency 1 = {pct(rows[1]['lat'], 50) * 1000:.1f} ms.")
            if args.profile:
                profile_inprocess(stack, token, min(args.requests, 200))
        finally:
            stack.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
