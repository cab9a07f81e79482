"""`ezssh certs ...` (also `ezssh cert ...`): the keys and certificates this machine holds, getting one
for ssh_config (`ensure`), and revocation.

`ensure` runs before every connection ssh makes to a host of `ezssh config`'s block, so it has its own
small parser (no argparse) and, with a cached certificate, imports nothing beyond the standard library.
"""

from __future__ import annotations

import os
import re
import sys
import time

from .. import certs
from ..errors import OK, USAGE, EzsshError
from ..output import err, fmt_left, fmt_time, out_json, print_table

SERIAL_RE = re.compile(r"^[0-9]{1,19}$")
ENSURE_USAGE = "usage: ezssh cert ensure [--agent] [--policy ID] [--ttl DURATION] [-p PORT] [-q] login@host"


def ensure(argv: list[str]) -> int:
    """Exit 0 when a certificate for login@host is in its slot (cached or new), else say why and fail:
    ssh then skips ezssh's block and goes on without it."""
    from .. import agent
    from ..access import certificate_for
    from ..durations import parse_duration
    from ..home import home_dir, load_config

    use_agent = quiet = False
    policy: str | None = None
    ttl: int | None = None
    target = None
    it = iter(argv)
    for tok in it:
        if tok in ("-h", "--help"):
            sys.stdout.write(
                ENSURE_USAGE + "\n\nExit 0 when a valid certificate for login@host is cached or was "
                "obtained (ssh_config's `Match exec` runs this).\n"
            )
            return OK
        if tok == "--agent":
            use_agent = True
        elif tok in ("-q", "--quiet"):
            quiet = True
        elif tok in ("-p", "--port"):
            next(it, None)  # certificates are per host and login, whatever the port
        elif tok in ("--policy", "--ttl"):
            val = next(it, None)
            if val is None:
                raise EzsshError(f"{tok} needs a value.\n{ENSURE_USAGE}", USAGE)
            if tok == "--policy":
                policy = val
                continue
            try:
                ttl = parse_duration(val)
            except ValueError as exc:
                raise EzsshError(f"--ttl: {exc}", USAGE) from None
        elif tok.startswith("-") or target is not None:
            raise EzsshError(f"Unexpected {tok!r}.\n{ENSURE_USAGE}", USAGE)
        else:
            target = tok
    login, at, host = (target or "").rpartition("@")
    if not at or not login or not host:
        raise EzsshError(f"Give login@host.\n{ENSURE_USAGE}", USAGE)
    home = home_dir()
    cfg = load_config(home)
    if sys.stderr.isatty():
        # ssh gives this command no stdin, but the person at the terminal sees stderr.
        os.environ.setdefault("EZSSH_ALLOW_DEVICE_LOGIN", "1")
    cached, source = certificate_for(cfg, home, login, host.lower(), policy=policy, ttl=ttl)
    if agent.wanted(cfg, use_agent):
        agent.add(cached)
    from .. import knownhosts

    # ssh_config's block checks hosts with them
    knownhosts.refresh_if_stale(
        home, knownhosts.full_api if source != "cached certificate" else knownhosts.api_if_signed_in
    )
    if not quiet and source != "cached certificate":
        err(f"ezssh: {source} for {login}@{host}, valid until {fmt_time(cached.meta.get('valid_before'))}.")
    return OK


def _rows(home, now: float) -> list[dict]:
    out = []
    for d in certs.slots(home):
        meta = certs.read_meta(d)
        if meta is None:
            continue
        out.append(
            {
                "login": meta.get("principal"),
                "host": meta.get("host"),
                "server": meta.get("server"),
                "policy": meta.get("policy"),
                "serial": meta.get("serial"),
                "key_id": meta.get("key_id"),
                "valid_before": meta.get("valid_before"),
                "expired": meta["valid_before"] <= now,
                "in_agent": bool(meta.get("agent_sock")),
                "dir": str(d),
            }
        )
    return sorted(out, key=lambda r: (str(r["host"]), str(r["login"])))


def cmd_list(args) -> int:
    from ..home import home_dir

    rows = _rows(home_dir(), time.time())
    if args.json:
        out_json(rows)
        return OK
    if not rows:
        err("No certificates are cached on this machine.")
        return OK
    print_table(
        ("LOGIN@HOST", "POLICY", "SERIAL", "EXPIRES", "LEFT", "AGENT"),
        [
            (
                f"{r['login']}@{r['host']}",
                r["policy"] or "-",
                r["serial"] or "-",
                fmt_time(r["valid_before"]),
                fmt_left(r["valid_before"]),
                "yes" if r["in_agent"] else "-",
            )
            for r in rows
        ],
    )
    return OK


def cmd_prune(args) -> int:
    from ..home import home_dir

    home = home_dir()
    if args.all:
        n = certs.remove_all(home)
        err(
            f"Removed all {n} cached key{'s' if n != 1 else ''} and certificate{'s' if n != 1 else ''} "
            "(from ssh-agent too, where added)."
        )
        return OK
    removed = certs.sweep(home)
    err(
        f"Removed {len(removed)} expired key{'s' if len(removed) != 1 else ''} and certificate"
        f"{'s' if len(removed) != 1 else ''}" + (f": {', '.join(p.name for p in removed)}." if removed else ".")
    )
    return OK


def cmd_revoke(args) -> int:
    from ..context import Ctx

    if not SERIAL_RE.match(args.serial) or int(args.serial) == 0:
        raise EzsshError(f"Serial {args.serial!r} is not a certificate serial (a decimal number).", USAGE)
    body = {"reason": args.reason} if args.reason else {}
    resp = Ctx().api.call("POST", f"/api/certificates/{args.policy}/{args.serial}/revoke", body=body, ok=(200,))
    rec = resp.json()
    if args.json:
        out_json(rec)
    else:
        err(
            f"Revoked certificate {rec.get('serial')} ({rec.get('key_id')}) of policy {rec.get('policy')}. "
            "Hosts refuse it once they fetch the policy's KRL (every 15 minutes)."
        )
    return OK


def cmd_revoke_identity(args) -> int:
    """`ezssh revoke --user OID`: every live certificate of a person or app, in one audited step."""
    from ..context import Ctx

    body = {"reason": args.reason} if args.reason else {}
    resp = Ctx().api.call("POST", f"/api/identities/{args.user}/revoke", body=body, ok=(200,))
    rec = resp.json()
    if args.json:
        out_json(rec)
        return OK
    revoked = rec.get("revoked") or []
    for c in revoked:
        print(f"{c.get('policy')}\t{c.get('serial')}\t{c.get('key_id')}")
    err(
        f"Revoked {len(revoked)} live certificate{'s' if len(revoked) != 1 else ''} of {rec.get('oid')}. Hosts refuse "
        "them once they fetch their policy's KRL (every 15 minutes; enrolled Azure VMs get it pushed)."
    )
    return OK


def _ensure_from_argparse(args) -> int:
    return ensure(args.rest)


def register(sub, fmt) -> None:
    c_certs = sub.add_parser("certs", aliases=["cert"], help="cached certificates: list, prune, ensure; revoke one")
    cs = c_certs.add_subparsers(dest="certs_command", metavar="ACTION", required=True)
    c = cs.add_parser("list", help="the keys and certificates cached on this machine")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_list)
    c = cs.add_parser("prune", help="remove expired keys and certificates (--all: every one)")
    c.add_argument("--all", action="store_true", help="remove every cached key and certificate")
    c.set_defaults(func=cmd_prune)
    c = cs.add_parser(
        "ensure", help="make sure a valid certificate for login@host is cached (ssh_config runs this)", add_help=False
    )
    c.add_argument("rest", nargs="*")
    c.set_defaults(func=_ensure_from_argparse)
    c = cs.add_parser("revoke", help="revoke a certificate (yours, or any of a policy you administer)")
    c.add_argument("policy", metavar="POLICY")
    c.add_argument("serial", metavar="SERIAL")
    c.add_argument("--reason", help="why (recorded in the audit log)")
    c.add_argument("--json", action="store_true", help="print the revocation record as JSON")
    c.set_defaults(func=cmd_revoke)

    c = sub.add_parser(
        "revoke",
        help="revoke every live certificate a person or app holds (--user OID)",
        formatter_class=fmt,
        description="For someone who left, or an app that must stop: revoke every live "
        "certificate of that object id, across the policies you administer (all "
        "of the tenant's for tenant admins), in one audited step.",
    )
    c.add_argument(
        "--user",
        required=True,
        metavar="OID",
        help="the object id of the person or app (az ad user show --id UPN --query id -o tsv)",
    )
    c.add_argument("--reason", help="why (recorded in the audit log)")
    c.add_argument("--json", action="store_true", help="print what was revoked as JSON")
    c.set_defaults(func=cmd_revoke_identity)
