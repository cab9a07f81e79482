"""Benchmark: what `ezssh ssh` adds to plain ssh, against a real local sshd.

    .venv/bin/python bench/cli.py [--runs 15] [--ezssh "CMD"]      (make bench-cli)

Installs ezssh as `pipx install ./client` would (its own venv, no editable-install import hook; pass
--ezssh to time another), starts its own local stack on free ports in a temporary directory (identity
provider, API, sshd), signs alice in once (device code, played by the bench), then runs, alternately,
N times each:

  plain ssh         ssh -i KEY -o CertificateFile=CERT ... alice@127.0.0.1 true
                    (the very command line ezssh runs, with a certificate ezssh issued)
  ezssh, cached     ezssh ssh alice@127.0.0.1 -p PORT ... true         (certificate in the cache)
  ezssh, new cert   ezssh ssh --new alice@127.0.0.1 -p PORT ... true   (token cached; new key, request,
                                                                       certificate each time)
  ssh + config      plain ssh through `ezssh config`'s block (cert ensure on a cached certificate)

and prints the medians, each one's median difference to plain ssh in the same round, and whether
the budgets hold: cached <= +60 ms, new certificate <= +200 ms. Each round runs the commands in turn
(A B A C ...), so a machine that speeds up or slows down affects all alike.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "infra" / "local")]

BUDGETS = {"ezssh, cached": 0.060, "ezssh, new cert": 0.200, "ssh + config": 0.060}


def timed(argv: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"bench-cli: {shlex.join(argv)} failed ({r.returncode}): {r.stderr.decode()[-600:]}")
    return dt


def installed_like_pipx(venv: Path) -> list[str]:
    """ezssh as `pipx install ./client` leaves it: its own venv, the package copied into site-packages
    (not the development venv's editable install, whose import hook costs every start) and pip's
    console script. Its dependencies come from this venv through a .pth line."""
    import site
    import sysconfig

    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    purelib = Path(subprocess.run([str(venv / "bin" / "python"), "-c",
                                   "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  capture_output=True, text=True, check=True).stdout.strip())
    shutil.copytree(REPO / "client" / "ezssh", purelib / "ezssh", ignore=shutil.ignore_patterns("__pycache__"))
    deps = [p for p in site.getsitepackages() if Path(p).is_dir()] or [sysconfig.get_paths()["purelib"]]
    (purelib / "ezssh-deps.pth").write_text("\n".join(deps) + "\n")
    script = venv / "bin" / "ezssh"
    script.write_text(f"#!{venv / 'bin' / 'python'}\n# -*- coding: utf-8 -*-\nimport re\nimport sys\n"
                      "from ezssh.cli import main\nif __name__ == '__main__':\n"
                      "    sys.argv[0] = re.sub(r'(-script\\.pyw|\\.exe)?$', '', sys.argv[0])\n"
                      "    sys.exit(main())\n")
    script.chmod(0o755)
    subprocess.run([str(venv / "bin" / "python"), "-m", "compileall", "-q", str(purelib / "ezssh")], check=True)
    return [str(script)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=15, help="rounds (default 15)")
    ap.add_argument("--ezssh", help="how to run ezssh (default: installed as pipx would, in its own venv)")
    args = ap.parse_args()

    from devstack.demo import cli_env, run_cli
    from devstack.proc import free_port
    from devstack.stack import Ports, up

    work = Path(tempfile.mkdtemp(prefix="ezssh-bench-cli-"))
    ezssh = shlex.split(args.ezssh) if args.ezssh else installed_like_pipx(work / "venv")
    stack = None
    try:
        print("bench-cli: starting the local stack (identity provider, API, sshd) ...", file=sys.stderr)
        stack = up(work / "state", Ports(free_port(), free_port(), free_port(), free_port()))
        port = stack.ports.sshd
        home = work / "home"
        env = cli_env(home / ".ezssh", HOME=str(home))
        env.pop("PYTHONPATH", None)
        env.pop("SSH_AUTH_SOCK", None)
        env["EZSSH_ALLOW_DEVICE_LOGIN"] = "0"
        for step in (["configure", "--server", stack.api_url, "--ca-bundle", str(stack.oidc.ca_path)], ["login"]):
            r = run_cli(step, {**env, "EZSSH_ALLOW_DEVICE_LOGIN": "1"}, username="alice", ca_path=stack.oidc.ca_path,
                        command=ezssh)
            if r.returncode != 0:
                raise SystemExit(f"bench-cli: ezssh {step[0]} failed: {r.stderr}")
        known = work / "known_hosts"
        kt, kv = (stack.sshd.dir / "ssh_host_ed25519_key.pub").read_text().split()[:2]
        known.write_text(f"[127.0.0.1]:{port} {kt} {kv}\n")
        opts = ["-p", str(port), "-o", f"UserKnownHostsFile={known}", "-o", "StrictHostKeyChecking=yes",
                "-o", "BatchMode=yes", "-o", "LogLevel=ERROR"]
        cfg = work / "ssh_config"
        cfg.write_text(f"Host bench-box\n    HostName 127.0.0.1\n    User alice\n    Port {port}\n"
                       f"    UserKnownHostsFile {known}\n    StrictHostKeyChecking yes\n    BatchMode yes\n"
                       f"    LogLevel ERROR\n    IdentityAgent none\n")
        # the first certificate, and the block for plain ssh
        timed([*ezssh, "ssh", "alice@127.0.0.1", *opts, "true"], env)
        r = run_cli(["config", "--ssh-config", str(cfg)], env, command=ezssh)
        if r.returncode != 0:
            raise SystemExit(f"bench-cli: ezssh config failed: {r.stderr}")
        slot = next((home / ".ezssh" / "certs").glob("*/alice@127.0.0.1"))
        plain = ["ssh", "-i", str(slot / "id_ed25519"), "-o", f"CertificateFile={slot / 'id_ed25519-cert.pub'}",
                 "-o", "IdentitiesOnly=yes", "-o", "IdentityAgent=none", "-F", "/dev/null", "alice@127.0.0.1",
                 *opts, "true"]
        commands = {
            "plain ssh": plain,
            "ezssh, cached": [*ezssh, "ssh", "-F", "/dev/null", "alice@127.0.0.1", *opts, "true"],
            "ezssh, new cert": [*ezssh, "ssh", "--new", "-F", "/dev/null", "alice@127.0.0.1", *opts, "true"],
            "ssh + config": ["ssh", "-F", str(cfg), "bench-box", "true"],
        }
        for argv in commands.values():  # warm-up
            timed(argv, env)
        times: dict[str, list[float]] = {k: [] for k in commands}
        diffs: dict[str, list[float]] = {k: [] for k in commands if k != "plain ssh"}
        for _ in range(args.runs):
            for name, argv in commands.items():
                if name == "plain ssh":
                    continue
                base = timed(plain, env)
                t = timed(argv, env)
                times["plain ssh"].append(base)
                times[name].append(t)
                diffs[name].append(t - base)
        # the new certificates of the rounds: leave one slot
        print(f"\nezssh ssh vs plain ssh, {args.runs} rounds on {os.cpu_count()} CPUs "
              f"(ezssh run as: {shlex.join(ezssh)})\n")
        print(f"{'command':<18}{'median':>10}{'min':>10}{'max':>10}{'median diff':>14}  budget")
        ok = True
        for name, ts in times.items():
            med = statistics.median(ts)
            row = f"{name:<18}{med * 1000:>8.0f}ms{min(ts) * 1000:>8.0f}ms{max(ts) * 1000:>8.0f}ms"
            if name in diffs:
                d = statistics.median(diffs[name])
                met = d <= BUDGETS[name]
                ok &= met
                row += f"{d * 1000:>+12.0f}ms  <= +{BUDGETS[name] * 1000:.0f} ms: {'met' if met else 'NOT met'}"
            print(row)
        print("\nmedian diff = median over rounds of (command - the plain ssh run just before it)")
        return 0 if ok else 1
    finally:
        if stack is not None:
            stack.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
