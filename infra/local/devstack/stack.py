"""The whole local stack: Azurite, SoftHSM, the OIDC provider, the API under uvicorn, and an sshd.

    python -m devstack up       start everything (state in .local/), seed the demo policy
    python -m devstack down     stop what `up` started (by the PIDs it recorded)
    python -m devstack status   show what runs where
    python -m devstack demo     up, then sign in as alice and log in through sshd with `ezssh ssh`

Tests use the same functions with free ports and a temporary state directory.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .azurite import Azurite, connection_string, start_azurite
from .oidc import OidcStandIn, start_oidc
from .proc import REPO, Proc, StandInError, require_free, spawn, wait_for_port
from .softhsm import SoftHsmToken, ensure_token
from .sshd import Sshd, host_key_file, remove_unix_users, start_sshd

DEFAULT_STATE = REPO / ".local"
if str(REPO) not in sys.path:  # the service package, for seeding through the service layer
    sys.path.insert(0, str(REPO))
PYTHON = sys.executable
DEMO_USERS = ["alice", "bob", "carol", "dave"]


@dataclass
class Ports:
    azurite: int = 10002
    azurite_queue: int = 10001
    oidc: int = 8443
    api: int = 7071
    sshd: int = 2222

    @classmethod
    def parse(cls, spec: str | None) -> "Ports":
        """`api=17071,sshd=12222` (any of azurite, azurite_queue, oidc, api, sshd; the rest keep their defaults)."""
        ports = cls()
        for item in filter(None, (spec or "").replace(" ", "").split(",")):
            name, _, value = item.partition("=")
            if name not in cls.__dataclass_fields__ or not value.isdigit() or not 0 < int(value) < 65536:
                raise StandInError(f"ports: {item!r} is not NAME=PORT with NAME one of "
                                   f"{', '.join(cls.__dataclass_fields__)} (e.g. api=17071,sshd=12222)")
            setattr(ports, name, int(value))
        return ports


def api_env(state_dir: Path, oidc: OidcStandIn, azurite_port: int, token: SoftHsmToken,
            queue_port: int | None = None, *, api_port: int | None = None) -> dict[str, str]:
    """The settings the API reads (functions/settings.py), pointing at the local stand-ins."""
    tenants = list(oidc.config["tenants"])
    public = {"EZSSH_PUBLIC_URL": f"http://127.0.0.1:{api_port}"} if api_port else {}
    return {
        "EZSSH_TENANTS": ",".join(tenants),
        "EZSSH_ISSUER_TEMPLATE": f"{oidc.base_url}/{{tid}}",
        "EZSSH_API_CLIENT_ID": oidc.api_client_id,
        "EZSSH_API_APP_ID_URI": oidc.config["api"]["app_id_uri"],
        "EZSSH_API_SCOPE": oidc.config["api"]["scope"],
        "EZSSH_CLI_CLIENT_ID": oidc.cli_client_id,
        "EZSSH_OIDC_CA_BUNDLE": str(oidc.ca_path),
        "EZSSH_STORAGE_CONNECTION_STRING": connection_string(azurite_port, queue_port),
        "EZSSH_TABLE_NAME": "ezssh",
        "EZSSH_SIGNER_BACKEND": "pkcs11",
        "EZSSH_PKCS11_MODULE": token.module_path,
        "EZSSH_PKCS11_TOKEN_LABEL": token.label,
        "EZSSH_PKCS11_PIN": token.pin,
        "EZSSH_VERIFIED_DOMAINS": verified_domains(oidc),
        "EZSSH_HOST_NAMESPACES": host_namespaces(oidc),
        "EZSSH_WEBHOOK_ALLOW_LOOPBACK_HTTP": "1",  # the local stack's webhook receivers listen on 127.0.0.1
        # The test suite asks as a handful of dev users many times a minute; production keeps the
        # defaults (5 pending per policy, 30 a minute). The limit tests build a service with those.
        "EZSSH_MAX_PENDING_REQUESTS": "50",
        "EZSSH_REQUEST_RATE": "1000",
        **public,
        **token.env(),
    }


def verified_domains(oidc: OidcStandIn) -> str:
    """EZSSH_VERIFIED_DOMAINS for the dev tenants: each tenant's own domain (not subsidiary.test)."""
    return ";".join(f"{tid}={t['domain']}" for tid, t in oidc.config["tenants"].items())


def host_namespaces(oidc: OidcStandIn) -> str:
    """EZSSH_HOST_NAMESPACES for the dev tenants: loopback, and names under <tenant>.example."""
    return ";".join(f"{tid}=127.0.0.0/8,::1,localhost,*.{t['domain'].split('.')[0]}.example"
                    for tid, t in oidc.config["tenants"].items())


def start_api(state_dir: Path, port: int, env: dict[str, str], *, workers: int = 1) -> Proc:
    require_free(port, "api")
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("EZSSH_")}
    full_env.update(env)
    full_env["PYTHONPATH"] = str(REPO)
    argv = [PYTHON, "-m", "uvicorn", "functions.wiring:asgi_app", "--factory", "--host", "127.0.0.1",
            "--port", str(port), "--no-access-log", "--log-level", "warning", "--workers", str(workers)]
    proc = spawn("api", argv, state_dir / "logs" / "api.log", env=full_env, cwd=REPO)
    wait_for_port(proc, port)
    return proc


def demo_policy_document(oidc: OidcStandIn, tenant: str = "contoso") -> dict:
    return {
        "id": "demo",
        "name": "Demo: loopback hosts",
        "rules": [
            {"groups": [oidc.group_id(tenant, "ezssh-users")], "action": "auto"},
        ],
        "hosts": ["127.0.0.0/8", "localhost", "web*"],
        # members of ezssh-users log in as themselves: {username} is their UPN's local part, only for
        # the tenant's verified domain (EZSSH_VERIFIED_DOMAINS), never for guests or system accounts
        "logins": [{"group": oidc.group_id(tenant, "ezssh-users"), "logins": ["{username}"],
                    "display": "ezssh-users"}],
        "approvers": {"groups": [oidc.group_id(tenant, "ezssh-approvers")]},
        "admins": {"groups": [oidc.group_id(tenant, "ezssh-admins")]},
        "default_ttl": 3600,
        "max_ttl": 8 * 3600,
        # agent forwarding, so `ezssh ssh --agent ... -A` can be tried on the demo sshd
        "extensions": ["permit-pty", "permit-port-forwarding", "permit-agent-forwarding"],
    }


def identity_of(oidc: OidcStandIn, username: str):  # type: ignore[no-untyped-def]
    """The Identity the API derives from this dev user's token (same claims as users.json)."""
    from functions.core.policy import Identity, upn_domain
    from functions.identity import is_guest

    u = oidc.user(username)
    claims = {"preferred_username": u["preferred_username"], **u.get("claims", {})}
    guest = is_guest(claims, oidc.issuer(u["tid"]), u["tid"])
    domain = oidc.config["tenants"][u["tid"]]["domain"]
    return Identity(oid=u["oid"], tid=u["tid"], upn=u["preferred_username"], name=u.get("name", ""),
                    groups=frozenset(u.get("groups", ())), roles=frozenset(u.get("roles", ())),
                    guest=guest, domain_verified=not guest and upn_domain(u["preferred_username"]) == domain)


def seed_policy(env: dict[str, str], oidc: OidcStandIn, doc: dict, admin: str = "carol"):  # type: ignore[no-untyped-def]
    """Create a policy through the service layer (as a tenant admin), unless it exists."""
    from functions.settings import load_settings
    from functions.wiring import build_context

    who = identity_of(oidc, admin)
    ctx = build_context(load_settings(env))
    return ensure_policy(ctx.service, who, doc)


def sign_challenge(key_file: Path, challenge: bytes, namespace: str) -> str:
    """`ssh-keygen -Y sign` of a challenge with a host's private key, as the host script signs it."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        msg = Path(tmp) / "challenge"
        msg.write_bytes(challenge)
        subprocess.run(["ssh-keygen", "-q", "-Y", "sign", "-f", str(key_file), "-n", namespace, str(msg)],
                       check=True, capture_output=True)
        return msg.with_name("challenge.sig").read_text()


def enrol_with_token(service, tid: str, policy_id: str, token: str, key_files: list[Path]):  # type: ignore[no-untyped-def]
    """What a host does with an enrolment token: ask for a challenge for its host keys, sign it with
    each (proof of possession), and present the token with the signatures."""
    from functions.core.hostcert import ENROL_NAMESPACE

    pubs = [" ".join(k.with_suffix(".pub").read_text().split()[:2]) for k in key_files]
    ch = service.hostcerts.challenge(tid, policy_id, pubs, token)
    signed = [(pub, sign_challenge(k, ch.message, ENROL_NAMESPACE)) for pub, k in zip(pubs, key_files)]
    return service.hostcerts.issue_with_token(tid, policy_id, token, ch.id, signed)


def host_certificate_for(service, who: Identity, policy_id: str, key_file: Path,  # type: ignore[no-untyped-def]
                         names: tuple[str, ...] = ("127.0.0.1", "localhost")) -> str:
    """A host certificate for a local sshd's host key, the way any host gets one: an admin mints a
    one-time token for its names, and the host presents it with proof that it holds the key."""
    token, _ = service.hostcerts.mint_token(who, policy_id, list(names))
    issued = enrol_with_token(service, who.tid, policy_id, token, [key_file])
    return issued.certificates[0][0].openssh


def certify_host(env: dict[str, str], oidc: OidcStandIn, policy_id: str, key_file: Path,  # type: ignore[no-untyped-def]
                 admin: str = "carol") -> str:
    from functions.settings import load_settings
    from functions.wiring import build_context

    ctx = build_context(load_settings(env))
    return host_certificate_for(ctx.service, identity_of(oidc, admin), policy_id, key_file)


def ensure_policy(service, who: Identity, doc: dict):  # type: ignore[no-untyped-def]
    """Create a policy unless one with that id exists (seeding the local stack and test fixtures)."""
    from functions.core.errors import NotFound

    try:
        return service.store.get_policy(who.tid, doc["id"])
    except NotFound:
        return service.policies.create(who, doc)


@dataclass
class Stack:
    state_dir: Path
    ports: Ports
    azurite: Azurite
    token: SoftHsmToken
    oidc: OidcStandIn
    env: dict[str, str]
    api: Proc
    sshd: Sshd | None = None
    policy: object = None
    extra: dict = field(default_factory=dict)

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.api}"

    def procs(self) -> list[Proc]:
        return [p for p in (self.sshd.proc if self.sshd else None, self.api, self.oidc.proc, *self.azurite.procs) if p]

    def stop(self) -> None:
        for p in self.procs():
            p.stop()


def up(state_dir: Path = DEFAULT_STATE, ports: Ports | None = None, *, with_sshd: bool = True,
       api_workers: int = 1, settings: dict[str, str] | None = None) -> Stack:
    """The local stack. `settings` override the API's settings (e.g. a benchmark lifts the per-user
    request rate, which is what it would otherwise measure)."""
    ports = ports or Ports()
    state_dir.mkdir(parents=True, exist_ok=True)
    started: list = []
    try:
        azurite = start_azurite(state_dir, ports.azurite, queue_port=ports.azurite_queue)
        started.append(azurite)
        token = ensure_token(state_dir)
        oidc = start_oidc(state_dir, ports.oidc)
        started.append(oidc)
        env = api_env(state_dir, oidc, ports.azurite, token, queue_port=ports.azurite_queue, api_port=ports.api)
        env.update(settings or {})
        policy = seed_policy(env, oidc, demo_policy_document(oidc))
        api = start_api(state_dir, ports.api, env, workers=api_workers)
        started.append(api)
        sshd = None
        if with_sshd:
            # The demo sshd presents a host certificate of the demo policy: clients check it with the
            # policy's host CA, no key is trusted on first use.
            cert = certify_host(env, oidc, "demo", host_key_file(state_dir))
            sshd = start_sshd(state_dir, ports.sshd, users=DEMO_USERS, host_certificate=cert,
                              host_ca=policy.current_host_ca.public_key if policy.current_host_ca else None)
            sshd.trust(*(c.public_key for c in policy.ca if c.state in ("current", "previous")))
            started.append(sshd)
    except BaseException:
        for s in reversed(started):
            s.stop()
        raise
    stack = Stack(state_dir, ports, azurite, token, oidc, env, api, sshd, policy)
    _record(stack)
    return stack


def _record(stack: Stack) -> None:
    info = {
        "ports": stack.ports.__dict__,
        "processes": [
            {"name": p.name, "pid": p.pid, "signal": int(p.stop_signal), "cmd": _cmdline(p.pid),
             "markers": _markers(_cmdline(p.pid), stack.state_dir)} for p in stack.procs()
        ],
        "api_url": stack.api_url,
        "ca_bundle": str(stack.oidc.ca_path),
        # unix users the sshd needed and `up` created: `down` removes them (and nothing else)
        "created_users": stack.sshd.created_users if stack.sshd else [],
    }
    (stack.state_dir / "stack.json").write_text(json.dumps(info, indent=2))


def _markers(cmd: str, state_dir: Path) -> list[str]:
    """What identifies our process later: its arguments under the state dir (sshd rewrites its
    process title but keeps its config path), else the whole command line."""
    return [a for a in cmd.split() if str(state_dir) in a] or [cmd]


def _ours(p: dict) -> bool:
    current = _cmdline(p["pid"])
    return bool(current) and all(m in current for m in p.get("markers") or [p["cmd"]])


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def down(state_dir: Path = DEFAULT_STATE) -> list[str]:
    """Stop the processes `up` recorded, by PID, only if each PID still runs the same command."""
    info_path = state_dir / "stack.json"
    if not info_path.exists():
        return []
    info = json.loads(info_path.read_text())
    stopped = []
    for p in info["processes"]:
        pid = p["pid"]
        if not p["cmd"] or not _ours(p):
            continue
        try:
            os.kill(pid, p["signal"])
        except ProcessLookupError:
            continue
        for _ in range(100):
            if not _ours(p):
                break
            time.sleep(0.1)
        else:
            os.kill(pid, signal.SIGKILL)
        stopped.append(f"{p['name']} ({pid})")
    removed = remove_unix_users(info.get("created_users") or [])
    if removed:
        stopped.append(f"unix users it created ({', '.join(removed)})")
    info_path.unlink()
    return stopped


def describe(info: dict) -> str:
    """`status` for people: what runs where, and what to do."""
    if not info.get("running", True):
        return "The local stack is not running (start it with: make up)."
    lines = [f"{'process':<14}{'pid':>8}  state"]
    for p in info["processes"]:
        lines.append(f"{p['name']:<14}{p['pid']:>8}  {'running' if p['alive'] else 'STOPPED'}")
    ports = info.get("ports") or {}
    lines.append("ports: " + ", ".join(f"{k} {v}" for k, v in ports.items()))
    lines.append(f"API {info.get('api_url')}   dev CA {info.get('ca_bundle')}")
    if info.get("created_users"):
        lines.append("unix users created by `up` (removed by `make down`): "
                     + ", ".join(u["name"] for u in info["created_users"]))
    dead = [p["name"] for p in info["processes"] if not p["alive"]]
    if dead:
        lines.append(f"{', '.join(dead)} stopped: restart the stack with `make down && make up` "
                     f"(logs in {info.get('state_dir', DEFAULT_STATE)}/logs)")
    return "\n".join(lines)


def status(state_dir: Path = DEFAULT_STATE) -> dict:
    info_path = state_dir / "stack.json"
    if not info_path.exists():
        return {"running": False}
    info = json.loads(info_path.read_text())
    for p in info["processes"]:
        p["alive"] = bool(p["cmd"]) and _ours(p)
    info["state_dir"] = str(state_dir)
    return info


def login(state_dir: Path, user: str, home: Path) -> int:
    """Configure the CLI in `home` for the running stack and sign `user` in without a browser: the
    device code the CLI prints is completed by devstack, as a browser would (devstack.oidc)."""
    from .demo import cli_env, run_cli

    info = status(state_dir)
    if not info.get("api_url"):
        raise StandInError("the local stack is not running: `make up` first")
    env = cli_env(home)
    ca = Path(info["ca_bundle"])
    for args in (["configure", "--server", info["api_url"], "--ca-bundle", str(ca)], ["login", "--device"]):
        r = run_cli(args, env, username=user, ca_path=ca, echo=True)
        if r.returncode != 0:
            return r.returncode
    return 0


__all__ = ["Ports", "Stack", "up", "down", "status", "login", "api_env", "start_api", "seed_policy",
           "demo_policy_document", "StandInError", "wait_for_port"]
