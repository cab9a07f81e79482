"""`ezssh` command line. Data goes to stdout, messages to stderr, `--json` for scripts.

Only the standard library is imported at module level: msal, requests and cryptography are loaded
by the commands that need them, so `ezssh --help` and a cached `ezssh ssh` start fast.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from pathlib import Path

from . import __version__, certs, sshargs
from .errors import EXIT_CODES_HELP, INTERRUPTED, OK, USAGE, EzsshError
from .home import CA_BUNDLE, home_dir, load_config, save_config, write_private

ENV_HELP = """\
environment:
  EZSSH_HOME                 ezssh's directory (default ~/.ezssh)
  EZSSH_SSH                  ssh program to run (default: ssh)
  EZSSH_ALLOW_DEVICE_LOGIN=1 let any command start the device sign-in without a terminal
  EZSSH_LOGIN=device|browser how `ezssh login` signs in by default (else: browser where one exists)
  EZSSH_PLAINTEXT_TOKEN_CACHE=1  keep the token cache in a 0600 file even where encryption exists"""


def err(msg: str) -> None:
    sys.stderr.write(msg + "\n")
    sys.stderr.flush()


def out_json(data) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True) + "\n")
    sys.stdout.flush()


def _ts(t) -> str:
    if not isinstance(t, (int, float)):
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


def _left(t) -> str:
    if not isinstance(t, (int, float)):
        return "-"
    s = int(t - time.time())
    if s <= 0:
        return "expired"
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


# ---- plumbing shared by commands that talk to the network ---------------------------------------


class Ctx:
    """Config, home, HTTP session, sign-in and API client, built on first use."""

    def __init__(self) -> None:
        self.home = home_dir()
        self.cfg = load_config(self.home)
        self._session = self._auth = self._api = None

    @property
    def session(self):
        if self._session is None:
            from .api import make_session
            self._session = make_session(self.cfg.get("ca_bundle"), self.cfg["server"])
        return self._session

    @property
    def auth(self):
        if self._auth is None:
            from .auth import Auth
            self._auth = Auth(self.cfg, self.home, self.session)
        return self._auth

    @property
    def api(self):
        if self._api is None:
            from .api import Api
            self._api = Api(self.cfg["server"], self.session, self.auth.token)
        return self._api


# ---- configure / login / logout / whoami --------------------------------------------------------


def cmd_configure(args) -> int:
    from .api import check_server_url, fetch_client_config, make_session

    server = check_server_url(args.server)
    home = home_dir()
    bundle = None
    if args.ca_bundle:
        src = Path(args.ca_bundle).expanduser()
        try:
            pem = src.read_text()
        except OSError as exc:
            raise EzsshError(f"Cannot read --ca-bundle {src}: {exc.strerror}.", USAGE) from None
        if "-----BEGIN CERTIFICATE-----" not in pem:
            raise EzsshError(f"--ca-bundle {src} holds no PEM certificate.", USAGE)
        bundle = pem
    # Fetch with the bundle at its own path first; keep a private copy only once it worked.
    session = make_session(str(src) if bundle else None, server)
    remote = fetch_client_config(session, server)
    authority = remote["authority"].rstrip("/")
    tenant = remote.get("tenant_id")
    if args.tenant:
        tenants = [t if isinstance(t, str) else (t.get("tenant_id") or t.get("id")) for t in remote.get("tenants") or []]
        if args.tenant not in tenants:
            raise EzsshError(f"Tenant {args.tenant!r} is not served by {server} (it serves: {', '.join(map(str, tenants))}).", USAGE)
        if tenant and authority.endswith("/" + tenant):
            authority = authority[: -len(tenant)] + args.tenant
        tenant = args.tenant
    cfg = {
        "server": server,
        "authority": authority,
        "authority_type": remote.get("authority_type", "entra"),
        "tenant_id": tenant,
        "tenants": remote.get("tenants") or ([tenant] if tenant else []),
        "client_id": remote["client_id"],
        "scopes": list(remote["scopes"]),
        "configured_at": int(time.time()),
    }
    if bundle:
        dest = home / CA_BUNDLE
        write_private(dest, bundle, 0o644)
        cfg["ca_bundle"] = str(dest)
    old = load_config(home, required=False) or {}
    if old.get("account") and (old.get("authority"), old.get("client_id")) == (cfg["authority"], cfg["client_id"]):
        cfg["account"] = old["account"]
    path = save_config(cfg, home)
    if args.json:
        out_json(cfg)
    err(f"Configured {server} (identity provider {authority}, {cfg['authority_type']}); saved {path}.")
    err("Next: ezssh login")
    return OK


def login_method(env=None, platform: str | None = None) -> str:
    """"browser" or "device" for `ezssh login` without --browser/--device.

    EZSSH_LOGIN=device|browser decides. Otherwise the browser only where one can show up on this
    machine: macOS and Windows unless in an SSH session, other systems when $DISPLAY or
    $WAYLAND_DISPLAY is set (MSAL's loopback listener must run where the browser runs)."""
    env = os.environ if env is None else env
    platform = sys.platform if platform is None else platform
    forced = (env.get("EZSSH_LOGIN") or "").strip().lower()
    if forced in ("device", "browser"):
        return forced
    if forced:
        raise EzsshError(f"EZSSH_LOGIN={forced!r} is not one of: device, browser.", USAGE)
    if platform in ("darwin", "win32"):
        return "device" if (env.get("SSH_CONNECTION") or env.get("SSH_TTY")) else "browser"
    return "browser" if (env.get("DISPLAY") or env.get("WAYLAND_DISPLAY")) else "device"


def cmd_login(args) -> int:
    method = args.method or login_method()
    if args.timeout is not None and args.timeout <= 0:
        raise EzsshError("--timeout must be a positive number of seconds.", USAGE)
    ctx = Ctx()
    if method == "browser":
        result = ctx.auth.browser_login(timeout=args.timeout or 300)
    else:
        result = ctx.auth.device_login()
    claims = result.get("id_token_claims") or {}
    err(f"Signed in as {claims.get('preferred_username') or claims.get('upn') or claims.get('oid')}.")
    if args.json:
        out_json(ctx.auth.whoami())
    return OK


def cmd_logout(args) -> int:
    home = home_dir()
    cfg = load_config(home, required=False)
    names: list[str] = []
    if cfg and cfg.get("server"):
        from .auth import token_cache

        cache, _ = token_cache(home)
        names = [a.get("username") or a.get("home_account_id") for a in cache.find(cache.CredentialType.ACCOUNT)]
        cache._persistence.save("{}")  # noqa: SLF001 - forget every account without network
        cfg.pop("account", None)
        save_config(cfg, home)
    # Certificates belong to the signed-in user: they go too.
    certs.remove(certs.certs_root(home))
    err(f"Signed out{' ' + ', '.join(names) if names else ''}; removed cached keys and certificates.")
    return OK


def cmd_whoami(args) -> int:
    ctx = Ctx()
    info = ctx.auth.whoami()
    if args.json:
        out_json(info)
        return OK
    rows = [
        ("user", info["upn"]), ("name", info["name"]), ("oid", info["oid"]), ("tenant", info["tid"]),
        ("groups", ", ".join(info["groups"]) or "-"), ("roles", ", ".join(info["roles"]) or "-"),
        ("token expires", f"{_ts(info['expires_at'])} (in {_left(info['expires_at'])})"),
        ("server", info["server"]), ("token cache", info["token_cache"]),
    ]
    for k, v in rows:
        print(f"{k + ':':15}{v if v is not None else '-'}")
    return OK


# ---- ssh -----------------------------------------------------------------------------------------


def cmd_ssh(argv: list[str]) -> int:
    inv = sshargs.parse(argv)
    if inv is None:
        sys.stdout.write(sshargs.SSH_HELP)
        return OK
    home = home_dir()
    cfg = load_config(home)
    server = cfg["server"]
    certs.sweep(home)
    cached = None if inv.new else certs.find_valid(home, server, inv.principal, inv.host, policy=inv.policy)
    source = "cached certificate"
    if cached is None:
        from .issue import obtain  # slow path: requests, msal, cryptography

        ctx = Ctx()
        cached, issued = obtain(cfg, home, inv, ctx.api)
        source = f"new certificate (request {issued.get('id')})"
    argv_ssh = sshargs.ssh_argv(inv, str(cached.key), str(cached.cert))
    if inv.explain:
        m = cached.meta
        err(f"policy:     {m.get('policy') or '-'}\n"
            f"principal:  {inv.principal}\n"
            f"key id:     {m.get('key_id') or '-'}\n"
            f"serial:     {m.get('serial') or '-'}\n"
            f"valid:      {_ts(m.get('valid_after'))} .. {_ts(m.get('valid_before'))} (expires in {_left(m.get('valid_before'))})\n"
            f"source:     {source}\n"
            f"command:    {shlex.join(argv_ssh)}")
    rc = sshargs.run_ssh(argv_ssh)
    certs.remove_if_expired(cached.dir)
    return rc


# ---- requests / policy ---------------------------------------------------------------------------


def cmd_requests_list(args) -> int:
    ctx = Ctx()
    params = {"role": "requester" if args.mine else "approver"}
    if args.pending or not args.mine:
        params["state"] = "pending"
    _, data = ctx.api.json("GET", "/api/requests", params=params)
    reqs = data.get("requests", [])
    if args.json:
        out_json(data)
        return OK
    if not reqs:
        err("No pending requests await your approval." if not args.mine else "You have no matching requests.")
        return OK
    cols = ("ID", "STATUS", "REQUESTER", "LOGIN@HOST", "POLICY", "APPROVALS", "EXPIRES", "REASON")
    rows = [(r.get("id", ""), r.get("status", ""), r.get("requester") or "-",
             f"{r.get('principal')}@{r.get('host')}", r.get("policy") or "-",
             f"{len(r.get('approvals') or [])}/{r.get('approvals_required', '?')}",
             _left(r.get("expires_at")) if r.get("status") == "pending" else "-",
             (r.get("reason") or "").replace("\n", " ")[:60]) for r in reqs]
    widths = [max(len(str(x)) for x in col) for col in zip(cols, *rows)]
    for row in (cols, *rows):
        print("  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip())
    return OK


def _decide(action: str, args) -> int:
    ctx = Ctx()
    body = {"comment": args.comment} if getattr(args, "comment", None) else {}
    _, rec = ctx.api.json("POST", f"/api/requests/{args.id}/{action}", body=body)
    if getattr(args, "json", False):
        out_json(rec)
    state = rec.get("status", "?")
    done = {"approve": "Approved", "deny": "Denied", "cancel": "Cancelled"}[action]
    extra = ""
    if action == "approve" and state == "pending":
        extra = f" ({len(rec.get('approvals') or [])}/{rec.get('approvals_required', '?')} approvals so far)"
    err(f"{done} request {args.id}: now {state}{extra}.")
    return OK


def cmd_policy_ca(args) -> int:
    ctx = Ctx()
    resp = ctx.api.call("GET", f"/api/policies/{args.id}/ca", ok=(200,))
    text = resp.text if resp.text.endswith("\n") or not resp.text else resp.text + "\n"
    sys.stdout.write(text)
    return OK


# ---- parser --------------------------------------------------------------------------------------


def build_parser():
    import argparse

    fmt = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(
        prog="ezssh", formatter_class=fmt,
        description="Passwordless SSH for Azure: sign in with Entra ID, get a short-lived OpenSSH "
                    "certificate for a fresh local key, and run ssh with it.",
        epilog=EXIT_CODES_HELP + "\n\n" + ENV_HELP)
    p.add_argument("--version", action="version", version=f"ezssh {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    c = sub.add_parser("configure", help="point ezssh at a service (fetches its client configuration)",
                       formatter_class=fmt, epilog=EXIT_CODES_HELP)
    c.add_argument("--server", required=True, metavar="URL", help="service URL, e.g. https://ezssh.example.com")
    c.add_argument("--ca-bundle", metavar="PEM", help="trust only these CA certificates for the service and the identity provider")
    c.add_argument("--tenant", metavar="TID", help="sign in to this tenant (one of those the service serves)")
    c.add_argument("--json", action="store_true", help="print the saved configuration as JSON")
    c.set_defaults(func=cmd_configure)

    c = sub.add_parser("login", help="sign in (in the browser, or with a device code)", formatter_class=fmt,
                       description="Sign in with Entra ID. In the browser (authorization code + PKCE, "
                                   "answer on a loopback port) where a browser exists, else with a "
                                   "device code you enter on any device.",
                       epilog="Default: --browser on macOS/Windows (not over SSH) and where $DISPLAY or "
                              "$WAYLAND_DISPLAY is set, else --device;\n"
                              "EZSSH_LOGIN=device|browser changes the default.\n\n"
                              "The sign-in message goes to stderr as one line (device code, browser):\n"
                              "  To sign in, open <verification URL> and enter the code <CODE> (expires in N min).\n"
                              "  Opening your browser to sign in; if it does not open, use: ezssh login --device\n\n"
                              + EXIT_CODES_HELP)
    how = c.add_mutually_exclusive_group()
    how.add_argument("--browser", dest="method", action="store_const", const="browser",
                     help="sign in in the system browser ($BROWSER is honoured)")
    how.add_argument("--device", dest="method", action="store_const", const="device",
                     help="sign in with a device code (works over SSH and without a browser)")
    c.add_argument("--timeout", type=int, metavar="S",
                   help="with the browser: give up after S seconds (default 300)")
    c.add_argument("--json", action="store_true", help="print who you are as JSON afterwards")
    c.set_defaults(func=cmd_login)

    c = sub.add_parser("logout", help="forget the sign-in and remove cached keys and certificates")
    c.set_defaults(func=cmd_logout)

    c = sub.add_parser("whoami", help="show the signed-in user (from the cached access token)")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_whoami)

    sub.add_parser("ssh", help="run ssh with a short-lived certificate (ezssh ssh --help)", add_help=False)

    r = sub.add_parser("requests", help="list, approve, deny or cancel access requests")
    rs = r.add_subparsers(dest="requests_command", metavar="ACTION", required=True)
    c = rs.add_parser("list", help="requests waiting for your approval (default), or your own (--mine)")
    c.add_argument("--pending", action="store_true", help="only pending requests (always so without --mine)")
    c.add_argument("--mine", action="store_true", help="requests you made")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_requests_list)
    for action, helptext in (("approve", "approve a request"), ("deny", "deny a request"), ("cancel", "cancel your own request")):
        c = rs.add_parser(action, help=helptext)
        c.add_argument("id", metavar="ID")
        if action != "cancel":
            c.add_argument("--comment", metavar="TEXT")
        c.add_argument("--json", action="store_true", help="print the updated request as JSON")
        c.set_defaults(func=lambda a, _act=action: _decide(_act, a))

    pol = sub.add_parser("policy", help="create, list, show, update, delete access policies; their CA keys")
    ps = pol.add_subparsers(dest="policy_command", metavar="ACTION", required=True)
    c = ps.add_parser("ca", help="print the policy's CA public keys (one OpenSSH key per line)")
    c.add_argument("id", metavar="ID")
    c.set_defaults(func=cmd_policy_ca)
    from .hostcmd import add_certs_commands, add_policy_host_setup
    add_policy_host_setup(ps)
    add_certs_commands(sub)
    from .enrolcmd import add_hosts_commands  # stdlib only
    add_hosts_commands(sub)
    from .policycmd import add_policy_commands  # stdlib only; yaml/requests load when a command runs
    add_policy_commands(ps, fmt, EXIT_CODES_HELP)
    from .auditcmd import add_audit_command  # stdlib only
    add_audit_command(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv[:1] == ["ssh"]:
            return cmd_ssh(argv[1:])
        parser = build_parser()
        if not argv:
            parser.print_help(sys.stderr)
            return USAGE
        args = parser.parse_args(argv)
        return args.func(args)
    except EzsshError as exc:
        err(f"ezssh: {exc.render()}")
        return exc.code
    except KeyboardInterrupt:
        err("ezssh: interrupted.")
        return INTERRUPTED
    except BrokenPipeError:
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 1
    except Exception as exc:  # noqa: BLE001 - one clear line, the traceback only on request
        if os.environ.get("EZSSH_DEBUG") == "1":
            raise
        err(f"ezssh: unexpected error: {type(exc).__name__}: {exc} (set EZSSH_DEBUG=1 for details)")
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
