"""`ezssh configure`, `ezssh login`, `ezssh logout`, `ezssh whoami`: the service and who you are there."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from .. import certs
from ..context import Ctx
from ..durations import duration_arg
from ..errors import EXIT_CODES_HELP, OK, USAGE, EzsshError
from ..home import CA_BUNDLE, home_dir, load_config, save_config, write_private
from ..output import err, fmt_left, fmt_time, out_json


def cmd_configure(args) -> int:
    from ..api import Transport, check_server_url, fetch_client_config

    home = home_dir()
    if not args.server:
        if args.agent is None:
            raise EzsshError("Give --server URL (or --agent on|off to change that setting only).", USAGE)
        cfg = load_config(home)
        cfg["agent"] = args.agent == "on"
        save_config(cfg, home)
        err(
            f"Agent mode is {args.agent}: "
            + (
                "certificates also go to ssh-agent (ssh-add -t <time left>)."
                if args.agent == "on"
                else "ssh is kept off the agent."
            )
        )
        return OK
    server = check_server_url(args.server)
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
    remote = fetch_client_config(Transport(str(src) if bundle else None), server)
    authority = remote["authority"].rstrip("/")
    tenant = remote.get("tenant_id")
    if args.tenant:
        tenants = [
            t if isinstance(t, str) else (t.get("tenant_id") or t.get("id")) for t in remote.get("tenants") or []
        ]
        if args.tenant not in tenants:
            raise EzsshError(
                f"Tenant {args.tenant!r} is not served by {server} (it serves: {', '.join(map(str, tenants))}).", USAGE
            )
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
    for kept in ("ssh_config", "agent"):
        if kept in old:
            cfg[kept] = old[kept]
    if old.get("ssh_config") and old.get("server") and not certs.same_server(old["server"], server):
        err("ezssh's ssh_config block is written again for this server at `ezssh login`.")
    if args.agent is not None:
        cfg["agent"] = args.agent == "on"
    path = save_config(cfg, home)
    from ..issue import switch_account

    switch_account(cfg, home, cfg.get("account"))  # another server's or account's certificates go
    if args.json:
        out_json(cfg)
    err(f"Configured {server} (identity provider {authority}, {cfg['authority_type']}); saved {path}.")
    err("Next: ezssh login")
    return OK


def login_method(env=None, platform: str | None = None) -> str:
    """ "browser" or "device" for `ezssh login` without --browser/--device.

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
    if args.workload:
        return _workload_login(args)
    method = args.method or login_method()
    ctx = Ctx()
    if ctx.cfg.pop("workload", None):  # a person signs in here now: no workload any more
        save_config(ctx.cfg, ctx.home)
    result = ctx.auth.browser_login(timeout=args.timeout or 300) if method == "browser" else ctx.auth.device_login()
    claims = result.get("id_token_claims") or {}
    err(f"Signed in as {claims.get('preferred_username') or claims.get('upn') or claims.get('oid')}.")
    _refresh_host_cas(ctx)
    _follow_server(ctx)
    if args.json:
        out_json(ctx.auth.whoami())
    return OK


def _workload_login(args) -> int:
    """Sign a machine in (no browser, no prompt): check that a token can be had now, and keep the way
    to get the next one in the configuration."""
    from .. import workload
    from ..issue import switch_account
    from ..tokens import account_of
    from ..tokens import claims as jwt_claims

    ctx = Ctx()
    settings = workload.settings_from_args(args.workload, args.client_id, args.certificate, args.tenant, ctx.cfg)
    ctx.cfg["workload"] = settings
    token = workload.token(ctx.cfg, ctx.home, force_refresh=True)  # fails (exit 3/6) before anything is saved
    save_config(ctx.cfg, ctx.home)
    switch_account(ctx.cfg, ctx.home, account_of(token))  # another account's certificates go (agent, disk)
    c = jwt_claims(token)
    err(f"Signed in as the workload {c.get('azp') or c.get('appid')} (object id {c.get('oid')}, {args.workload}).")
    _refresh_host_cas(ctx)
    _follow_server(ctx)
    if args.json:
        out_json(_workload_info(ctx, token))
    return OK


def _workload_info(ctx: Ctx, token: str) -> dict:
    from ..tokens import claims as jwt_claims

    c = jwt_claims(token)
    exp = c.get("exp")
    return {
        "upn": f"app:{c.get('azp') or c.get('appid')}",
        "name": c.get("app_displayname"),
        "oid": c.get("oid"),
        "tid": c.get("tid"),
        "groups": c.get("groups", []),
        "roles": c.get("roles", []),
        "scopes": [],
        "issuer": c.get("iss"),
        "audience": c.get("aud"),
        "expires_at": exp,
        "expires_in": int(exp - time.time()) if isinstance(exp, (int, float)) else None,
        "server": ctx.cfg.get("server"),
        "token_cache": f"app token in {ctx.home}/workload-token.json (0600)",
        "workload": ctx.cfg["workload"]["kind"],
    }


def _refresh_host_cas(ctx: Ctx) -> None:
    """The host CAs of the user's policies, so their hosts are checked by certificate from the start."""
    from .. import knownhosts

    try:
        knownhosts.refresh(ctx.api, home_dir())
    except EzsshError as exc:
        err(f"ezssh: could not fetch the host CAs ({exc}); `ezssh ssh` tries again.")


def _follow_server(ctx: Ctx) -> None:
    """ezssh's ssh_config block, written again when it was made for another server."""
    from .config import fix_command, follow_server

    try:
        done = follow_server(ctx.cfg, ctx.home)
    except EzsshError as exc:
        err(
            f"ezssh: the ssh_config block is for another server and could not be rewritten ({exc}); run: "
            f"{fix_command(ctx.cfg.get('ssh_config') or {})}"
        )
        return
    if done:
        err(f"ezssh: {done}.")


def cmd_logout(args) -> int:
    home = home_dir()
    cfg = load_config(home, required=False)
    names: list[str] = []
    if cfg and cfg.get("server"):
        from ..auth import token_cache

        cache, _ = token_cache(home)
        names = [a.get("username") or a.get("home_account_id") for a in cache.find(cache.CredentialType.ACCOUNT)]
        cache._persistence.save("{}")  # forget every account without network
        cfg.pop("account", None)
        if cfg.pop("workload", None):
            from ..workload import forget

            forget(home)
            names.append("the workload")
        save_config(cfg, home)
    # Certificates belong to the signed-in user: they go too, from the agent as well.
    n = certs.remove_all(home)
    err(
        f"Signed out{' ' + ', '.join(names) if names else ''}; removed {n} cached key{'s' if n != 1 else ''} "
        f"and certificate{'s' if n != 1 else ''} (from ssh-agent too, where added)."
    )
    return OK


def cmd_whoami(args) -> int:
    ctx = Ctx()
    info = _workload_info(ctx, ctx.token()) if ctx.cfg.get("workload") else ctx.auth.whoami()
    if args.json:
        out_json(info)
        return OK
    rows = [
        ("user", info["upn"]),
        ("name", info["name"]),
        ("oid", info["oid"]),
        ("tenant", info["tid"]),
        ("groups", ", ".join(info["groups"]) or "-"),
        ("roles", ", ".join(info["roles"]) or "-"),
        ("token expires", f"{fmt_time(info['expires_at'])} (in {fmt_left(info['expires_at'])})"),
        ("server", info["server"]),
        ("token cache", info["token_cache"]),
    ]
    for k, v in rows:
        print(f"{k + ':':15}{v if v is not None else '-'}")
    return OK


def register(sub, fmt) -> None:
    c = sub.add_parser(
        "configure",
        help="point ezssh at a service (fetches its client configuration)",
        formatter_class=fmt,
        epilog=EXIT_CODES_HELP,
    )
    c.add_argument(
        "--server", metavar="URL", help="service URL, e.g. https://ezssh.example.com (its base, without /api)"
    )
    c.add_argument(
        "--ca-bundle", metavar="PEM", help="trust only these CA certificates for the service and the identity provider"
    )
    c.add_argument("--tenant", metavar="TID", help="sign in to this tenant (one of those the service serves)")
    c.add_argument(
        "--agent",
        choices=("on", "off"),
        help="agent mode: also add each certificate to ssh-agent for its lifetime (so ssh -A forwards "
        "it); alone, without --server, changes just this setting",
    )
    c.add_argument("--json", action="store_true", help="print the saved configuration as JSON")
    c.set_defaults(func=cmd_configure)

    c = sub.add_parser(
        "login",
        help="sign in (in the browser, or with a device code)",
        formatter_class=fmt,
        description="Sign in with Entra ID. In the browser (authorization code + PKCE, "
        "answer on a loopback port) where a browser exists, else with a "
        "device code you enter on any device.",
        epilog="Default: --browser on macOS/Windows (not over SSH) and where $DISPLAY or "
        "$WAYLAND_DISPLAY is set, else --device;\n"
        "EZSSH_LOGIN=device|browser changes the default.\n\n"
        "The sign-in message goes to stderr as one line (device code, browser):\n"
        "  To sign in, open <verification URL> and enter the code <CODE> (expires in N min).\n"
        "  Opening your browser to sign in; if it does not open, use: ezssh login --device\n\n" + EXIT_CODES_HELP,
    )
    how = c.add_mutually_exclusive_group()
    how.add_argument(
        "--browser",
        dest="method",
        action="store_const",
        const="browser",
        help="sign in in the system browser ($BROWSER is honoured)",
    )
    how.add_argument(
        "--device",
        dest="method",
        action="store_const",
        const="device",
        help="sign in with a device code (works over SSH and without a browser)",
    )
    how.add_argument(
        "--managed-identity",
        dest="workload",
        action="store_const",
        const="managed-identity",
        help="a machine: the managed identity of this Azure VM, Function, Container App or Arc "
        "server (--client-id for a user-assigned one)",
    )
    how.add_argument(
        "--workload-identity",
        dest="workload",
        action="store_const",
        const="workload-identity",
        help="a job: workload identity federation (GitHub Actions, Azure DevOps, AKS) from "
        "AZURE_FEDERATED_TOKEN_FILE, AZURE_CLIENT_ID and AZURE_TENANT_ID",
    )
    how.add_argument(
        "--service-principal",
        dest="workload",
        action="store_const",
        const="service-principal",
        help="a service principal with a certificate (--client-id, --certificate)",
    )
    c.add_argument("--client-id", metavar="APP_ID", help="the app (client) id of the workload")
    c.add_argument("--certificate", metavar="PEM", help="with --service-principal: its private key and certificate")
    c.add_argument("--tenant", metavar="TID", help="with a workload: its tenant (default: the configured one)")
    c.add_argument(
        "--timeout",
        type=duration_arg,
        metavar="DURATION",
        help="with the browser: give up after this long (e.g. 90s, 5m; default 5m)",
    )
    c.add_argument("--json", action="store_true", help="print who you are as JSON afterwards")
    c.set_defaults(func=cmd_login, workload=None)

    c = sub.add_parser("logout", help="forget the sign-in and remove cached keys and certificates")
    c.set_defaults(func=cmd_logout)

    c = sub.add_parser("whoami", help="show the signed-in user (from the cached access token)")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_whoami)
