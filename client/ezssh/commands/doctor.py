"""`ezssh doctor`: what works and what does not, one line per check, with what to do about it.

Checks: configuration, the service (reachable, and the clock against its Date header), the sign-in
(token), ssh (version), ssh-agent, ezssh's ssh_config block and its known-hosts file, and the
cached certificates. Exit 0 when nothing failed, 1 otherwise (warnings do not fail).
"""

from __future__ import annotations

import os
import re
import time

from ..errors import ERROR, OK
from ..home import home_dir, load_config
from ..output import err, fmt_left, out_json

SKEW_WARN = 30  # seconds; certificates are backdated 60 s, so more than that breaks fresh ones
SKEW_FAIL = 60


class Report:
    def __init__(self) -> None:
        self.rows: list[dict] = []

    def add(self, check: str, status: str, detail: str, fix: str | None = None) -> None:
        self.rows.append({"check": check, "status": status, "detail": detail, "fix": fix})


def _config(r: Report, home) -> dict | None:
    cfg = load_config(home, required=False)
    if not cfg or not cfg.get("server"):
        r.add(
            "config",
            "fail",
            f"not configured ({home / 'config.json'} missing)",
            "ezssh configure --server https://<your ezssh service>",
        )
        return None
    r.add(
        "config",
        "ok",
        f"server {cfg['server']}, identity provider {cfg.get('authority')} "
        f"({cfg.get('authority_type', 'entra')})" + (", agent mode on" if cfg.get("agent") else ""),
    )
    return cfg


def _service(r: Report, cfg: dict) -> None:
    from email.utils import parsedate_to_datetime

    from ..api import Transport, send

    t0 = time.time()
    try:
        resp = send(Transport(cfg.get("ca_bundle")), "GET", f"{cfg['server']}/api/health")
    except Exception as exc:  # the check reports any failure
        r.add("service", "fail", getattr(exc, "message", str(exc)), getattr(exc, "hint", None))
        return
    rtt = time.time() - t0
    if resp.status_code != 200:
        r.add(
            "service",
            "fail",
            f"GET /api/health answered HTTP {resp.status_code}",
            "Check the server URL (`ezssh configure --server URL`, without /api).",
        )
    else:
        r.add("service", "ok", f"reachable ({rtt * 1000:.0f} ms)")
    date = resp.headers.get("date")
    if not date:
        r.add("clock", "warn", "the service sent no Date header; skew unknown")
        return
    try:
        skew = (t0 + rtt / 2) - parsedate_to_datetime(date).timestamp()
    except (TypeError, ValueError):
        r.add("clock", "warn", f"unreadable Date header {date!r}")
        return
    status = "ok" if abs(skew) < SKEW_WARN else "warn" if abs(skew) < SKEW_FAIL else "fail"
    r.add(
        "clock",
        status,
        f"{skew:+.0f} s against the service",
        None
        if status == "ok"
        else "Synchronise this machine's clock (NTP): certificates are valid from "
        "60 s before issue, and hosts check their validity against their own clocks.",
    )


def _token(r: Report, cfg: dict, home) -> None:
    from ..tokens import cached_access_token

    token = cached_access_token(cfg, home)
    if token:
        from ..tokens import claims

        c = claims(token)
        r.add(
            "sign-in",
            "ok",
            f"{c.get('preferred_username') or c.get('upn') or c.get('oid')}, token valid for {fmt_left(c.get('exp'))}",
        )
        return
    from ..context import Ctx

    try:
        result = Ctx().auth.silent()
    except Exception as exc:
        r.add("sign-in", "fail", getattr(exc, "message", str(exc)), "ezssh login")
        return
    if result:
        r.add("sign-in", "ok", "token refreshed from the cache")
    else:
        r.add("sign-in", "fail", "not signed in", "ezssh login")


def _ssh(r: Report) -> None:
    import subprocess

    try:
        out = subprocess.run(["ssh", "-V"], capture_output=True, text=True, timeout=10).stderr.strip()
    except (OSError, subprocess.SubprocessError):
        r.add("ssh", "fail", "OpenSSH's ssh is not installed", "Install OpenSSH's client (e.g. openssh-client).")
        return
    m = re.search(r"OpenSSH[_A-Za-z]*_(\d+)\.(\d+)", out)
    if not m:
        r.add("ssh", "warn", f"not OpenSSH? `ssh -V` says {out!r}")
        return
    version = (int(m[1]), int(m[2]))
    if version < (8, 4):
        r.add("ssh", "warn", out, "OpenSSH 8.4 or newer is needed for `ezssh config` (Match final).")
    else:
        r.add("ssh", "ok", out)


def _agent(r: Report, cfg: dict) -> None:
    sock = os.environ.get("SSH_AUTH_SOCK")
    wanted = bool(cfg.get("agent")) or os.environ.get("EZSSH_AGENT") == "1"
    if not sock:
        r.add(
            "agent",
            "warn" if wanted else "ok",
            "no ssh-agent (SSH_AUTH_SOCK unset)"
            + ("; agent mode is on" if wanted else "; agent mode is off, so none is needed"),
            "eval $(ssh-agent)" if wanted else None,
        )
        return
    import subprocess

    rc = subprocess.run(["ssh-add", "-l"], capture_output=True, timeout=10).returncode
    if rc == 2:
        r.add("agent", "warn" if wanted else "ok", f"SSH_AUTH_SOCK={sock} but no agent answers there")
    else:
        r.add("agent", "ok", f"ssh-agent at {sock}; agent mode {'on' if wanted else 'off (--agent to use it)'}")


def _ssh_config(r: Report, cfg: dict, home) -> None:
    from pathlib import Path

    from .. import sshconfig

    state = cfg.get("ssh_config")
    owned = home / sshconfig.OWNED_FILE
    known = home / sshconfig.KNOWN_HOSTS
    if not state:
        r.add(
            "ssh_config",
            "ok",
            "not set up: plain ssh does not get certificates (only `ezssh ssh` does)",
            "ezssh config   (so ssh, scp, sftp, rsync, git and VS Code get them too)",
        )
    else:
        path = Path(state["path"])
        try:
            included = sshconfig.include_lines(owned) in path.read_text()
        except OSError:
            included = False
        from .config import fix_command

        problem = (
            sshconfig.block_problem(owned.read_text(errors="replace"), home, cfg["server"])
            if owned.exists()
            else f"{owned} is missing"
        )
        if not included:
            r.add("ssh_config", "fail", f"{path} no longer includes {owned}", fix_command(state))
        elif problem:
            r.add(
                "ssh_config",
                "fail",
                f"ezssh's block ({owned}) does not fit this configuration: {problem}; "
                "plain ssh would offer keys that are not there",
                fix_command(state),
            )
        else:
            r.add("ssh_config", "ok", f"{path} includes {owned}, written for {cfg['server']}")
    try:
        cas = sum(1 for line in known.read_text().splitlines() if line.startswith("@cert-authority"))
        r.add("known-hosts", "ok", f"{known}: {cas} host CA line{'s' if cas != 1 else ''}")
    except FileNotFoundError:
        r.add("known-hosts", "ok", f"{known} not written yet (hosts are checked with your own known_hosts)")
    except OSError as exc:
        r.add("known-hosts", "warn", f"{known}: {exc.strerror}")


def _certs(r: Report, home, cfg: dict | None) -> None:
    from .. import certs

    now = time.time()
    metas = [m for m in (certs.read_meta(d) for d in certs.slots(home)) if m]
    live = [m for m in metas if m["valid_before"] > now]
    foreign = [
        m
        for m in metas
        if not cfg
        or m.get("account") != cfg.get("account")
        or not certs.same_server(m.get("server"), cfg.get("server"))
    ]
    if foreign:
        r.add(
            "certificates",
            "warn",
            f"{len(foreign)} cached certificate{'s' if len(foreign) != 1 else ''} of "
            "another account or server (never used for this one)",
            "ezssh certs prune --all",
        )
        return
    r.add(
        "certificates",
        "ok",
        f"{len(live)} valid, {len(metas) - len(live)} expired (removed at the next run, or `ezssh certs prune`)",
    )


def cmd_doctor(args) -> int:
    home = home_dir()
    r = Report()
    cfg = _config(r, home)
    if cfg:
        _service(r, cfg)
        _token(r, cfg, home)
    _ssh(r)
    if cfg:
        _agent(r, cfg)
        _ssh_config(r, cfg, home)
    _certs(r, home, cfg)
    if args.json:
        out_json(r.rows)
    else:
        for row in r.rows:
            print(f"{row['status']:<5} {row['check']:<13} {row['detail']}")
            if row["fix"]:
                print(f"{'':<5} {'':<13} -> {row['fix']}")
    failed = [row["check"] for row in r.rows if row["status"] == "fail"]
    if failed:
        err(f"ezssh doctor: {len(failed)} check{'s' if len(failed) != 1 else ''} failed: {', '.join(failed)}.")
        return ERROR
    return OK


def register(sub, fmt) -> None:
    c = sub.add_parser(
        "doctor",
        help="check configuration, sign-in, clock, service, ssh, agent and known hosts",
        formatter_class=fmt,
        description=__doc__,
    )
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_doctor)
