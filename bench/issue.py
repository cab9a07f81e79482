"""Benchmark: what one certificate issuance costs, where it goes, and how it scales.

    .venv/bin/python bench/issue.py [--requests 400] [--inproc 300] [--kv-latency 0.02] [--quick]

Starts its own local stack on free ports in a temporary directory (Azurite, SoftHSM, the OIDC
provider, the API under uvicorn), signs alice (requester) and bob (approver) in once, then measures,
all in the same run so that ratios compare like with like on this machine at this moment:

  baselines   `ssh-keygen -s`, one process per certificate (p50, rate); Azurite's own ceiling
              (single inserts from a minimal azure-data-tables client and from raw HTTP, 1 and 8
              threads); uvicorn + FastAPI with a trivial route (bench/apps.py).
  in-process  ezssh's own CPU per auto-approved issuance, split by component (process CPU
              time around each component, exclusive: see bench/meter.py), storage client CPU and
              Azurite's service time (wall minus client CPU of each storage call), and the HTTP
              round trips per issuance to storage and to Key Vault (counted at the transport).
  HTTP        POST /api/requests at 1, 16 and 32 clients (server CPU per request from the API
              process's own counters); the approval path (request -> approve -> certificate).
  Key Vault   the same app with its CA in the Key Vault stand-in answering after --kv-latency
              seconds (real azure-keyvault-keys SDK over HTTPS): 1 client vs 32 clients.
  KRL         core/krl.py encoding 100k revoked serials.

The load average is printed next to the figures: the machine is shared, and figures taken while
other work runs are slower (ratios against baselines measured in the same run hold up better).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import http.client
import json
import os
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from email.utils import formatdate
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "infra" / "local"), str(REPO / "client")]

from bench.meter import HttpCounter, Meter  # noqa: E402
from ezssh.issue import attempt_key  # noqa: E402


# One user makes every request here: lift the per-user request limit (30 a minute in production,
# 1,000 in the dev stack), which the benchmark would otherwise measure instead of issuance.
BENCH_SETTINGS = {"EZSSH_REQUEST_RATE": "10000"}


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(p / 100 * (len(s) - 1))))]


def load() -> str:
    a, b, c = os.getloadavg()
    return f"{a:.2f} {b:.2f} {c:.2f}"


def fresh_keys(n: int) -> list[str]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    return [
        ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
        for _ in range(n)
    ]


# ---- figures ---------------------------------------------------------------------------------------

class Row(dict):
    """name, conc, n, lat (seconds), rate (per second), extra (text), server_cpu (s/request)."""


def row(name: str, conc: int, lat: list[float], rate: float, **kw: Any) -> Row:
    return Row(name=name, conc=conc, n=len(lat), lat=lat, rate=rate, **kw)


# ---- baselines ----------------------------------------------------------------------------------------

def baseline_ssh_keygen(n: int, work: Path) -> Row:
    ca = work / "ca"
    subprocess.run(["ssh-keygen", "-q", "-t", "ecdsa", "-b", "256", "-N", "", "-f", str(ca)], check=True)
    keys = fresh_keys(n)
    for i, k in enumerate(keys):
        (work / f"u{i}.pub").write_text(k + "\n")
    lat = []
    t0 = time.perf_counter()
    for i in range(n):
        s = time.perf_counter()
        subprocess.run(["ssh-keygen", "-q", "-s", str(ca), "-I", f"bench{i}", "-n", "alice", "-V", "+1h",
                        "-z", str(i + 1), str(work / f"u{i}.pub")], check=True, capture_output=True)
        lat.append(time.perf_counter() - s)
    return row("ssh-keygen -s, 1 process per cert", 1, lat, n / (time.perf_counter() - t0))


def _concurrently(conc: int, n: int, one: Callable[[int], None]) -> float:
    t0 = time.perf_counter()
    with ThreadPoolExecutor(conc) as pool:
        list(pool.map(one, range(n)))
    return time.perf_counter() - t0


def azurite_sdk_inserts(conn: str, n: int, conc: int) -> Row:
    """Single inserts from a minimal azure-data-tables client (default options): Azurite's ceiling
    as the SDK sees it, and the client CPU each insert costs."""
    from azure.data.tables import TableServiceClient

    svc = TableServiceClient.from_connection_string(conn)
    table = f"benchsdk{secrets.token_hex(4)}"
    client = svc.create_table(table)
    lat: list[float] = []
    cpu: list[float] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        e = {"PartitionKey": "p", "RowKey": f"{i:08d}-{secrets.token_hex(4)}", "Kind": "audit",
             "Entry": "x" * 400}
        c0, s = time.thread_time(), time.perf_counter()
        client.create_entity(e)
        d, dc = time.perf_counter() - s, time.thread_time() - c0
        with lock:
            lat.append(d)
            cpu.append(dc)

    for i in range(20):
        one(-i - 1)
    lat.clear()
    cpu.clear()
    total = _concurrently(conc, n, one)
    svc.delete_table(table)
    return row("Azurite: single insert, azure-data-tables", conc, lat, n / total,
               client_cpu=sum(cpu) / len(cpu), service=pct([a - b for a, b in zip(lat, cpu)], 50))


def azurite_raw_inserts(port: int, n: int, conc: int) -> Row:
    """Single inserts over raw HTTP/1.1 (http.client, SharedKeyLite): Azurite with almost no client."""
    from devstack.azurite import ACCOUNT, ACCOUNT_KEY
    from azure.data.tables import TableServiceClient
    from devstack.azurite import connection_string

    table = f"benchraw{secrets.token_hex(4)}"
    TableServiceClient.from_connection_string(connection_string(port)).create_table(table)
    key = base64.b64decode(ACCOUNT_KEY)
    local = threading.local()
    lat: list[float] = []
    lock = threading.Lock()
    errors: list[str] = []

    def one(i: int) -> None:
        conn = getattr(local, "c", None)
        if conn is None:
            conn = local.c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        date = formatdate(usegmt=True)
        sig = base64.b64encode(hmac.new(key, f"{date}\n/{ACCOUNT}/{ACCOUNT}/{table}".encode(),
                                        hashlib.sha256).digest()).decode()
        body = json.dumps({"PartitionKey": "p", "RowKey": f"{i:08d}-{secrets.token_hex(4)}", "Kind": "audit",
                           "Entry": "x" * 400}).encode()
        s = time.perf_counter()
        conn.request("POST", f"/{ACCOUNT}/{table}", body, {
            "x-ms-date": date, "x-ms-version": "2019-02-02", "Content-Type": "application/json",
            "Accept": "application/json;odata=nometadata", "Prefer": "return-no-content",
            "DataServiceVersion": "3.0", "Authorization": f"SharedKeyLite {ACCOUNT}:{sig}"})
        r = conn.getresponse()
        r.read()
        d = time.perf_counter() - s
        with lock:
            if r.status == 204:
                lat.append(d)
            else:
                errors.append(f"{r.status} {r.reason}")

    for i in range(20):
        one(-i - 1)
    lat.clear()
    total = _concurrently(conc, n, one)
    if errors:
        print(f"  raw inserts: {len(errors)} errors, first: {errors[0]}", file=sys.stderr)
    return row("Azurite: single insert, raw HTTP", conc, lat, len(lat) / total)


# ---- HTTP load --------------------------------------------------------------------------------------

def _proc_cpu(pid: int) -> float:
    import psutil

    p = psutil.Process(pid)
    t = p.cpu_times()
    total = t.user + t.system
    for c in p.children(recursive=True):
        ct = c.cpu_times()
        total += ct.user + ct.system
    return total


def http_load(port: int, token: str, n: int, conc: int, *, pid: int | None, name: str,
              body: Callable[[int], dict] | None = None, path: str = "/api/requests", want: int = 201,
              keyed: bool = False) -> Row:
    """n POSTs over keep-alive HTTP/1.1 (http.client, one connection per client thread)."""
    keys = fresh_keys(n + 2 * conc)
    body = body or (lambda i: {"host": "127.0.0.1", "principal": "alice", "public_key": keys[i]})
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    local = threading.local()
    lat: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        conn = getattr(local, "c", None)
        if conn is None:
            conn = local.c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        data = json.dumps(body(i)).encode()
        h = {**headers, "Idempotency-Key": attempt_key()} if keyed else headers  # what the CLI sends
        s = time.perf_counter()
        conn.request("POST", path, data, h)
        r = conn.getresponse()
        text = r.read()
        d = time.perf_counter() - s
        with lock:
            if r.status == want:
                lat.append(d)
            else:
                errors.append(f"{r.status} {text[:160]!r}")

    with ThreadPoolExecutor(conc) as pool:  # warm-up: connections, JWKS, signer and policy caches
        list(pool.map(one, range(n, n + 2 * conc)))
    lat.clear()
    cpu0 = _proc_cpu(pid) if pid else 0.0
    with ThreadPoolExecutor(conc) as pool:
        t0 = time.perf_counter()
        list(pool.map(one, range(n)))
        total = time.perf_counter() - t0
    cpu = (_proc_cpu(pid) - cpu0) / max(1, n) if pid else None
    if errors:
        print(f"  {name}: {len(errors)} errors, first: {errors[0]}", file=sys.stderr)
    return row(name, conc, lat, len(lat) / total, server_cpu=cpu, errors=len(errors))


def approval_path(port: int, alice: str, bob: str, n: int, policy_id: str) -> tuple[Row, dict[str, float]]:
    """request (202 pending) -> approve (another user) -> certificate (201), sequentially."""
    keys = fresh_keys(n)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)

    def post(path: str, token: str, doc: dict, want: int) -> dict:
        conn.request("POST", path, json.dumps(doc).encode(),
                     {"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
        r = conn.getresponse()
        data = json.loads(r.read() or b"null")
        if r.status != want:
            raise RuntimeError(f"POST {path}: {r.status} {data}")
        return data

    steps: dict[str, list[float]] = {"request": [], "approve": [], "certificate": []}
    total: list[float] = []
    for i in range(n):
        s0 = time.perf_counter()
        rid = post("/api/requests", alice, {"host": "approval1", "principal": "alice", "policy": policy_id}, 202)["id"]
        s1 = time.perf_counter()
        post(f"/api/requests/{rid}/approve", bob, {}, 200)
        s2 = time.perf_counter()
        post(f"/api/requests/{rid}/certificate", alice, {"public_key": keys[i]}, 201)
        s3 = time.perf_counter()
        steps["request"].append(s1 - s0)
        steps["approve"].append(s2 - s1)
        steps["certificate"].append(s3 - s2)
        total.append(s3 - s0)
    conn.close()
    return row("approval: request -> approve -> cert", 1, total, n / sum(total)), \
        {k: pct(v, 50) for k, v in steps.items()}


# ---- in-process ---------------------------------------------------------------------------------------

COMPONENTS = [  # (label, owner, attribute)
    ("token validation", "functions.identity:TokenValidator", "validate"),
    ("policy decision", "functions.service.issuance", "choose_policy"),
    ("key vetting", "functions.service.issuance", "parse_public_key"),
    ("certificate build", "functions.service.issuance", "build_certificate"),
    ("final check", "functions.service.issuance", "verify_issued"),
    ("CA sign (PKCS#11 / SoftHSM)", "functions.signing.pkcs11:Pkcs11KeyStore", "_sign"),
    ("CA sign (Key Vault client)", "functions.signing.keyvault:KeyVaultKeyStore", "_sign"),
    ("audit entries (hash chain)", "functions.service.issuance", "link"),
]
STORE_METHODS = ("list_policies", "get_policy", "get_request", "create_request", "update_request",
                 "record_issuance", "add_audit", "list_audit", "get_certificate", "get_idempotency")


def _resolve(spec: str) -> Any:
    import importlib

    mod, _, attr = spec.partition(":")
    obj = importlib.import_module(mod)
    return getattr(obj, attr) if attr else obj


def inprocess(ctx: Any, token: str, n: int, *, storage_port: int, kv_port: int | None = None,
              counter: HttpCounter, keyed: bool = False) -> dict:
    """n auto-approved issuances through the service (token -> certificate recorded), measured."""
    from functions.core.evaluation import AccessRequest

    meter = Meter()
    for label, owner, attr in COMPONENTS:
        meter.wrap(_resolve(owner), attr, label)
    store_cls = type(ctx.service.store)
    for m in STORE_METHODS:
        if m in store_cls.__dict__:
            meter.wrap(store_cls, m, f"storage: {m}")
    keys = fresh_keys(n + 20)
    req = AccessRequest(host="127.0.0.1", principal="alice")
    header = "Bearer " + token
    try:
        idem = attempt_key if keyed else (lambda: None)  # the CLI's key: a UUIDv7
        for k in keys[n:]:  # warm
            ctx.service.issuance.request_access(ctx.validator.validate(header), req, k, idem())
        meter.reset()
        counter.reset()
        per: list[float] = []
        wall: list[float] = []
        p0 = time.process_time()
        t0 = time.perf_counter()
        for k in keys[:n]:
            c0, w0 = time.process_time(), time.perf_counter()
            out = ctx.service.issuance.request_access(ctx.validator.validate(header), req, k, idem())
            per.append(time.process_time() - c0)
            wall.append(time.perf_counter() - w0)
            assert out.status == "issued", out.status
        elapsed = time.perf_counter() - t0
        proc = time.process_time() - p0
    finally:
        meter.restore()
    storage_cpu = sum(v for k, v in meter.cpu.items() if k.startswith("storage: "))
    storage_wall = sum(v for k, v in meter.wall.items() if k.startswith("storage: "))
    return {
        "n": n, "cpu": sum(per) / n, "cpu_p50": pct(per, 50), "process_cpu": proc / n, "wall": elapsed / n,
        "wall_p50": pct(wall, 50),
        "components": {k: v / n for k, v in meter.cpu.items()},
        "component_wall": {k: v / n for k, v in meter.wall.items()},
        "calls": {k: v / n for k, v in meter.calls.items()},
        "storage_cpu": storage_cpu / n, "storage_service": (storage_wall - storage_cpu) / n,
        "storage_reads": counter.on(storage_port, ("GET",)) / n,
        "storage_writes": counter.on(storage_port, ("POST", "PUT", "PATCH", "MERGE", "DELETE")) / n,
        "kv_calls": counter.on(kv_port) / n if kv_port else None,
    }


def profile(ctx: Any, token: str, n: int, top: int = 30) -> None:
    """cProfile over n in-process issuances: the functions with the most own time."""
    import cProfile
    import pstats

    from functions.core.evaluation import AccessRequest

    keys = fresh_keys(n)
    req = AccessRequest(host="127.0.0.1", principal="alice")
    prof = cProfile.Profile()
    prof.enable()
    for k in keys:
        ctx.service.issuance.request_access(ctx.validator.validate("Bearer " + token), req, k)
    prof.disable()
    print(f"\ncProfile, {n} in-process issuances (own time, then cumulative):")
    pstats.Stats(prof).sort_stats("tottime").print_stats(top)
    pstats.Stats(prof).sort_stats("cumulative").print_stats(top)
    print("Regular expressions compiled during the run (should be none: compile once, at import):")
    pstats.Stats(prof).print_callers(r"re/_compiler.py.*\(compile\)|re/__init__.py.*\(_compile\)")


def print_inprocess(title: str, r: dict, keygen_p50: float) -> None:
    print(f"\n{title}  ({r['n']} issuances, load {load()})")
    print(f"  {'component':34s} {'CPU ms':>8s} {'share':>6s}  {'wall ms':>8s}")
    comps = dict(r["components"])
    storage = {k: v for k, v in comps.items() if k.startswith("storage: ")}
    for k in storage:
        comps.pop(k)
    comps["storage client (all calls)"] = r["storage_cpu"]
    walls = dict(r["component_wall"])
    walls["storage client (all calls)"] = r["storage_cpu"] + r["storage_service"]
    comps["service glue, other"] = r["cpu"] - sum(comps.values())
    for label, v in sorted(comps.items(), key=lambda kv: -kv[1]):
        w = walls.get(label)
        print(f"  {label:34s} {v * 1000:8.3f} {v / r['cpu'] * 100:5.0f}%  "
              f"{(w * 1000 if w is not None else float('nan')):8.3f}")
    for k, v in sorted(storage.items(), key=lambda kv: -kv[1]):
        calls = r["calls"].get(k, 0)
        print(f"    {k:32s} {v * 1000:8.3f}        {r['component_wall'][k] * 1000:8.3f}   ({calls:.2f} calls)")
    print(f"  {'total ezssh CPU':34s} {r['cpu'] * 1000:8.3f}  100%  {r['wall'] * 1000:8.3f}"
          f"   = {r['cpu'] / keygen_p50:.2f}x one ssh-keygen -s process (p50 {keygen_p50 * 1000:.2f} ms)")
    print(f"  storage service time (wall - client CPU of the storage calls) {r['storage_service'] * 1000:.3f} ms")
    kv = f", Key Vault calls {r['kv_calls']:.2f}" if r["kv_calls"] is not None else ""
    print(f"  round trips per issuance: storage writes {r['storage_writes']:.2f}, storage reads "
          f"{r['storage_reads']:.2f}{kv}")


# ---- KRL ---------------------------------------------------------------------------------------------

def krl_100k() -> dict:
    from functions.core.krl import CaRevocations, encode_krl
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    ca = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    serials = {secrets.randbits(63) or 1 for _ in range(100_000)}
    rev = CaRevocations(ca, frozenset(serials))
    t0 = time.perf_counter()
    c0 = time.process_time()
    krl = encode_krl([rev], krl_version=1, generated_date=int(time.time()))
    return {"serials": len(serials), "ms": (time.perf_counter() - t0) * 1000,
            "cpu_ms": (time.process_time() - c0) * 1000, "bytes": len(krl)}


class KeyVaultProcess:
    """bench/kvserve.py: the Key Vault stand-in in its own process (its CPU is not ezssh's)."""

    def __init__(self, latency: float) -> None:
        self.p = subprocess.Popen([sys.executable, str(REPO / "bench" / "kvserve.py"), "--latency", str(latency)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        info = json.loads(self.p.stdout.readline())  # type: ignore[union-attr]
        self.url, self.ca_path, self.token = info["url"], info["ca"], info["token"]
        self.port = int(self.url.rsplit(":", 1)[1])

    def count(self) -> int:
        self.p.stdin.write("count\n")  # type: ignore[union-attr]
        self.p.stdin.flush()  # type: ignore[union-attr]
        return int(self.p.stdout.readline())  # type: ignore[union-attr]

    def stop(self) -> None:
        try:
            self.p.stdin.write("quit\n")  # type: ignore[union-attr]
            self.p.stdin.close()  # type: ignore[union-attr]
        except OSError:
            pass
        self.p.wait(timeout=10)


# ---- main ---------------------------------------------------------------------------------------------

def start_uvicorn(name: str, factory: str, port: int, env: dict[str, str], work: Path):  # type: ignore[no-untyped-def]
    from devstack.proc import spawn, wait_for_port

    full = {k: v for k, v in os.environ.items() if not k.startswith("EZSSH_")}
    full.update(env)
    full["PYTHONPATH"] = str(REPO)
    argv = [sys.executable, "-m", "uvicorn", factory, "--factory", "--host", "127.0.0.1", "--port", str(port),
            "--no-access-log", "--log-level", "warning"]
    proc = spawn(name, argv, work / "logs" / f"{name}.log", env=full, cwd=REPO)
    wait_for_port(proc, port, timeout=60)
    return proc


def approval_policy(oidc: Any) -> dict:
    alice = oidc.user("alice")["oid"]
    return {
        "id": "bench-approval", "name": "Bench: approval path",
        "rules": [{"users": [alice], "action": "approval"}],
        "hosts": ["approval*"], "principals": ["{username}"],
        "approvers": {"groups": [oidc.group_id("contoso", "ezssh-approvers")]},
        "admins": {"groups": [oidc.group_id("contoso", "ezssh-admins")]},
        "default_ttl": 3600, "max_ttl": 8 * 3600, "extensions": ["permit-pty"],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=400, help="HTTP issuances per run")
    ap.add_argument("--inproc", type=int, default=300, help="in-process issuances for the CPU split")
    ap.add_argument("--baseline", type=int, default=100, help="ssh-keygen -s processes")
    ap.add_argument("--approvals", type=int, default=40)
    ap.add_argument("--kv-latency", type=float, default=0.020, help="seconds the Key Vault stand-in waits per call")
    ap.add_argument("--workers", type=int, default=1, help="uvicorn worker processes for the API")
    ap.add_argument("--quick", action="store_true", help="small counts, for a smoke run")
    ap.add_argument("--profile", action="store_true", help="also print a cProfile of in-process issuances, then stop")
    args = ap.parse_args()
    if args.quick:
        args.requests, args.inproc, args.baseline, args.approvals = 60, 40, 20, 5

    from devstack.oidc import sign_in
    from devstack.proc import free_port
    from devstack.stack import Ports, demo_policy_document, ensure_policy, identity_of, up
    from functions.settings import load_settings
    from functions.wiring import build_context
    from bench.apps import keyvault_context

    load_start = load()
    counter = HttpCounter()
    with tempfile.TemporaryDirectory(prefix="ezssh-bench-") as tmp:
        work = Path(tmp)
        stack = up(work / "state", Ports(free_port(), free_port(), free_port(), free_port()), with_sshd=False,
                   api_workers=args.workers, settings=BENCH_SETTINGS)
        procs = []
        kv = None
        try:
            alice = sign_in(stack.oidc, "alice")["access_token"]
            bob = sign_in(stack.oidc, "bob")["access_token"]
            carol = identity_of(stack.oidc, "carol")
            ctx = build_context(load_settings(stack.env))
            ensure_policy(ctx.service, carol, approval_policy(stack.oidc))

            print(f"ezssh issuance benchmark: {os.cpu_count()} cores, load average at start {load_start}", flush=True)
            keygen = baseline_ssh_keygen(args.baseline, work)
            kp50 = pct(keygen["lat"], 50)
            print(f"  ssh-keygen -s: p50 {kp50 * 1000:.2f} ms, {keygen['rate']:.0f}/s (load {load()})", flush=True)

            conn = stack.env["EZSSH_STORAGE_CONNECTION_STRING"]
            n_az = max(100, args.requests // 2)
            azure_rows = [azurite_sdk_inserts(conn, n_az, 1), azurite_sdk_inserts(conn, n_az, 8),
                          azurite_raw_inserts(stack.ports.azurite, n_az, 1),
                          azurite_raw_inserts(stack.ports.azurite, n_az, 8)]
            print(f"  Azurite ceiling measured (load {load()})", flush=True)

            ip = inprocess(ctx, alice, args.inproc, storage_port=stack.ports.azurite, counter=counter)
            print_inprocess("ezssh CPU per auto-approved issuance, in-process (SoftHSM CA)", ip, kp50)
            ipk = inprocess(ctx, alice, max(20, args.inproc // 3), storage_port=stack.ports.azurite, counter=counter,
                            keyed=True)
            print_inprocess("... the same with an Idempotency-Key (what the CLI sends)", ipk, kp50)
            if args.profile:
                profile(ctx, alice, args.inproc)
                return 0

            trivial_port = free_port()
            trivial = start_uvicorn("trivial", "bench.apps:trivial", trivial_port, {}, work)
            procs.append(trivial)
            http_rows = []
            for conc in (1, 16):
                http_rows.append(http_load(trivial_port, alice, args.requests, conc, pid=trivial.pid,
                                           name="uvicorn+FastAPI, trivial route"))
            trivial.stop()
            for conc in (1, 16, 32):
                http_rows.append(http_load(stack.ports.api, alice, args.requests, conc, pid=stack.api.pid,
                                           name="ezssh POST /api/requests"))
            keyed_row = http_load(stack.ports.api, alice, args.requests, 16, pid=stack.api.pid,
                                  name="ezssh POST, with Idempotency-Key", keyed=True)
            print(f"  HTTP runs done (load {load()})", flush=True)
            appr, steps = approval_path(stack.ports.api, alice, bob, args.approvals, "bench-approval")

            # Key Vault with latency: the stand-in in this process, the app in its own.
            kv = KeyVaultProcess(args.kv_latency)
            kv_env = dict(stack.env, EZSSH_SIGNER_BACKEND="keyvault", EZSSH_KEYVAULT_URL=kv.url,
                          EZSSH_TABLE_NAME="ezsshkv", BENCH_KV_URL=kv.url, BENCH_KV_CA=kv.ca_path,
                          BENCH_KV_TOKEN=kv.token)
            kctx = keyvault_context(kv_env, kv.url, kv.ca_path, kv.token)
            ensure_policy(kctx.service, carol, demo_policy_document(stack.oidc))
            kip = inprocess(kctx, alice, max(20, args.inproc // 5), storage_port=stack.ports.azurite,
                            kv_port=kv.port, counter=counter)
            print_inprocess(f"ezssh CPU per auto-approved issuance, in-process (Key Vault CA, "
                            f"{args.kv_latency * 1000:.0f} ms per call)", kip, kp50)
            kv_port = free_port()
            kvapp = start_uvicorn("api-kv", "bench.apps:keyvault", kv_port, kv_env, work)
            procs.append(kvapp)
            kv_rows = []
            for conc in (1, 32):
                signs0 = kv.count()
                r = http_load(kv_port, alice, args.requests if conc > 1 else max(50, args.requests // 4), conc,
                              pid=kvapp.pid, name=f"ezssh, Key Vault +{args.kv_latency * 1000:.0f} ms")
                # the warm-up also signed: count only the measured ones by subtracting its 2*conc
                r["kv_per_cert"] = (kv.count() - signs0 - 2 * conc) / max(1, r["n"] + r["errors"])
                kv_rows.append(r)
            kvapp.stop()
            krl = krl_100k()
            load_end = load()
        finally:
            counter.close()
            for p in procs:
                p.stop()
            if kv is not None:
                kv.stop()
            stack.stop()

    # ---- the table ----
    base_rate = keygen["rate"]
    print(f"\nResults ({os.cpu_count()} cores; load average at start {load_start}, at end {load_end}; "
          f"API: uvicorn, {args.workers} worker(s); Azurite; SoftHSM EC P-256 CA unless noted)")
    print(f"{'what':42s} {'conc':>4s} {'n':>5s} {'p50 ms':>8s} {'p99 ms':>8s} {'per s':>8s} "
          f"{'p50/base':>8s} {'rate/base':>9s} {'srv CPU ms':>10s}")

    def line(r: Row) -> None:
        p50, p99 = pct(r["lat"], 50) * 1000, pct(r["lat"], 99) * 1000
        cpu = r.get("server_cpu")
        print(f"{r['name']:42s} {r['conc']:4d} {r['n']:5d} {p50:8.2f} {p99:8.2f} {r['rate']:8.1f} "
              f"{p50 / (kp50 * 1000):7.2f}x {r['rate'] / base_rate:8.2f}x "
              f"{(f'{cpu * 1000:10.2f}' if cpu is not None else '')}")

    for r in [keygen, *azure_rows, *http_rows, keyed_row, appr, *kv_rows]:
        line(r)
    print(f"  approval steps p50: request {steps['request'] * 1000:.1f} ms, approve {steps['approve'] * 1000:.1f} ms, "
          f"certificate {steps['certificate'] * 1000:.1f} ms")
    sdk1 = azure_rows[0]
    print(f"  Azurite single insert: client CPU {sdk1['client_cpu'] * 1000:.2f} ms (azure-data-tables), "
          f"service time p50 {sdk1['service'] * 1000:.2f} ms (wall - client CPU)")
    triv1, triv16, e1, e16, e32 = http_rows
    print(f"  HTTP stack: trivial route p50 {pct(triv1['lat'], 50) * 1000:.2f} ms, server CPU "
          f"{triv1['server_cpu'] * 1000:.2f} ms/request; ezssh server CPU {e1['server_cpu'] * 1000:.2f} ms/request "
          f"at 1 client = in-process {ip['process_cpu'] * 1000:.2f} ms + HTTP/other "
          f"{(e1['server_cpu'] - ip['process_cpu']) * 1000:.2f} ms")
    print(f"  KRL: {krl['serials']} serials encoded in {krl['ms']:.1f} ms ({krl['cpu_ms']:.1f} ms CPU), "
          f"{krl['bytes']} bytes ({krl['bytes'] / krl['serials']:.2f} bytes/serial)")
    kv1, kv32 = kv_rows

    targets = [
        ("ezssh CPU per auto-approved issuance <= 3 ms", ip["cpu"] <= 0.003, f"{ip['cpu'] * 1000:.2f} ms"),
        ("... and <= 0.5x one ssh-keygen -s process", ip["cpu"] <= 0.5 * kp50,
         f"{ip['cpu'] / kp50:.2f}x (ssh-keygen p50 {kp50 * 1000:.2f} ms)"),
        ("HTTP, 16 clients: >= 1.5x the ssh-keygen -s rate", e16["rate"] >= 1.5 * base_rate,
         f"{e16['rate'] / base_rate:.2f}x ({e16['rate']:.0f}/s vs {base_rate:.0f}/s)"),
        ("HTTP, 1 client: p50 <= ssh-keygen -s p50", pct(e1["lat"], 50) <= kp50,
         f"{pct(e1['lat'], 50) * 1000:.2f} ms vs {kp50 * 1000:.2f} ms"),
        (f"Key Vault +{args.kv_latency * 1000:.0f} ms: 32 clients >= 5x 1 client", kv32["rate"] >= 5 * kv1["rate"],
         f"{kv32['rate'] / kv1['rate']:.2f}x ({kv32['rate']:.0f}/s vs {kv1['rate']:.0f}/s)"),
        ("one Key Vault call per issuance", abs(kip["kv_calls"] - 1) < 0.01 and abs(kv32["kv_per_cert"] - 1) < 0.05,
         f"{kip['kv_calls']:.2f} in-process, {kv32['kv_per_cert']:.2f} over HTTP"),
        ("one storage write round trip per issuance", abs(ip["storage_writes"] - 1) < 0.01,
         f"{ip['storage_writes']:.2f} writes, {ip['storage_reads']:.2f} reads"),
    ]
    print("\nTargets (issue 15)")
    for what, ok, fig in targets:
        print(f"  [{'met' if ok else 'NOT met':7s}] {what:52s} {fig}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
