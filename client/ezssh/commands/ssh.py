"""`ezssh ssh`: reuse or obtain a certificate, then run ssh with it.

Its arguments are ssh's, so it has its own small parser (sshargs) instead of argparse. Host and login
are resolved the way ssh resolves them (`ssh -G`: aliases, HostName, User). The cached path imports
no msal, requests or cryptography.
"""

from __future__ import annotations

import sys

from .. import agent, certs, knownhosts, sshargs, sshconfig
from ..access import certificate_for
from ..errors import OK
from ..home import home_dir, load_config
from ..output import err, fmt_left, fmt_time


def run(argv: list[str]) -> int:
    inv = sshargs.parse(argv)
    if inv is None:
        sys.stdout.write(sshargs.SSH_HELP)
        return OK
    home = home_dir()
    cfg = load_config(home)
    resolved = sshconfig.resolve(sshargs.ssh_program(), inv.pre_args, inv.destination, inv.ssh_args)
    if resolved:
        inv.host, inv.principal = resolved["hostname"], resolved["user"]
    cached, source = certificate_for(
        cfg, home, inv.principal, inv.host, policy=inv.policy, ttl=inv.ttl, reason=inv.reason, new=inv.new
    )
    use_agent = agent.wanted(cfg, inv.agent)
    if use_agent:
        agent.add(cached)
    argv_ssh = sshargs.ssh_argv(inv, str(cached.key), str(cached.cert), agent=use_agent)
    # Hosts of your policies are checked by their host certificates (no trust on first use); these
    # options go before yours, so they hold.
    knownhosts.refresh_if_stale(
        home, knownhosts.full_api if source != "cached certificate" else knownhosts.api_if_signed_in
    )
    host_opts = knownhosts.ssh_options(home, inv.host)
    n = len(sshargs.ssh_program())
    argv_ssh = argv_ssh[:n] + host_opts + argv_ssh[n:]
    if inv.explain:
        import shlex

        m = cached.meta
        err(
            f"policy:     {m.get('policy') or '-'}\n"
            f"host:       {inv.host}" + (f" (from {inv.destination})" if inv.host not in inv.destination else "") + "\n"
            f"principal:  {inv.principal}\n"
            f"key id:     {m.get('key_id') or '-'}\n"
            f"serial:     {m.get('serial') or '-'}\n"
            f"valid:      {fmt_time(m.get('valid_after'))} .. {fmt_time(m.get('valid_before'))} "
            f"(expires in {fmt_left(m.get('valid_before'))})\n"
            f"source:     {source}" + (" (also in ssh-agent)" if use_agent else "") + "\n"
            f"command:    {shlex.join(argv_ssh)}"
        )
    if host_opts:
        import os

        rc, stderr = knownhosts.run_ssh_watching(argv_ssh, {**os.environ, sshconfig.IN_SSH_ENV: "1"})
        msg = knownhosts.refusal_message(stderr, inv.host, knownhosts.covering_policies(home, inv.host))
        if rc == 255 and msg:
            err(msg)
    else:
        rc = sshargs.run_ssh(argv_ssh)
    certs.remove_if_expired(cached.dir)
    return rc


def register(sub, fmt) -> None:
    # Parsed by sshargs (the arguments are ssh's); listed here for `ezssh --help`.
    sub.add_parser("ssh", help="run ssh with a short-lived certificate (ezssh ssh --help)", add_help=False)
