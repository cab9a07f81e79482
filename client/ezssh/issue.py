"""The slow path of `ezssh ssh`: make a key, ask the service, wait for approval, store the certificate."""

from __future__ import annotations

import os
import sys
import time
import uuid
from pathlib import Path

from . import certs
from .api import Api
from .errors import INTERRUPTED, REQUEST_ENDED, UNAVAILABLE, EzsshError
from .output import group_label, person_label
from .sshargs import SshInvocation
from .tokens import account_of

POLL_INTERVAL = 2.0
SPINNER = "|/-\\"


def _fmt_elapsed(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 60}:{s % 60:02d}"


def _ended(rec: dict) -> EzsshError:
    state = rec.get("status")
    rid = rec.get("id")
    who = person_label(rec.get("decided_by_name"), rec.get("decided_by")) if rec.get("decided_by") else None
    comment = rec.get("comment")
    if state == "denied":
        msg = f"Request {rid} was denied" + (f" by {who}" if who else "") + (f": {comment}" if comment else ".")
    elif state == "cancelled":
        msg = f"Request {rid} was cancelled" + (f" by {who}" if who else "") + "."
    elif state == "expired":
        msg = f"Request {rid} expired before it was approved."
    else:
        msg = f"Request {rid} ended as {state!r}."
    return EzsshError(msg, REQUEST_ENDED)


def _approved(rec: dict) -> str:
    """'Approved by Bob Brandt (bob@contoso.test): "ok, go ahead"' - one line per approval."""
    lines = []
    for a in rec.get("approvals") or []:
        comment = a.get("comment")
        said = f': "{comment}"' if comment else ""
        lines.append(f"Approved by {person_label(a.get('name'), a.get('upn'))}{said}\n")
    return "".join(lines) or f"Request {rec.get('id')} was approved.\n"


def describe_approvers(approvers: object, policy: str | None, group_names: object = None) -> str:
    """' from bob@contoso.test or a member of group <id>' from the service's {users, groups}."""
    names: list[str] = []
    if isinstance(approvers, dict):
        names += [str(u) if u != "*" else "anyone in your tenant" for u in approvers.get("users") or []]
        names += [f"a member of group {group_label(g, group_names)}" for g in approvers.get("groups") or []]
    elif isinstance(approvers, list):
        names = [str(a) for a in approvers]
    if names:
        return " from " + (", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else names[0])
    return f" from an approver of policy {policy}" if policy else ""


def wait_for_approval(api: Api, pending: dict, *, out=None, interval: float | None = None, clock=time.time) -> dict:
    """Poll GET /api/requests/{id} until approved (returns the record) or ended (raises, exit 5).

    Ctrl-C cancels the request on the service (POST .../cancel) and ends with exit code 130.
    """
    out = out or sys.stderr
    interval = POLL_INTERVAL if interval is None else interval
    rid = pending["id"]
    need = pending.get("approvers_needed", pending.get("approvals_required", 1))
    who = describe_approvers(pending.get("approvers"), pending.get("policy"), pending.get("group_names"))
    expires_at = pending.get("expires_at")
    until = f", expires {time.strftime('%H:%M:%S', time.localtime(expires_at))}" if expires_at else ""
    out.write(
        f"Request {rid} needs {need} approval{'s' if need != 1 else ''}{who}{until}. "
        f"Waiting (Ctrl-C cancels the request)...\n"
    )
    link = pending.get("link")
    out.write(
        f"An approver opens {link} or runs: ezssh requests approve {rid}\n"
        if link
        else f"An approver runs: ezssh requests approve {rid}\n"
    )
    out.flush()
    tty = hasattr(out, "isatty") and out.isatty()
    start = time.monotonic()
    failures = 0
    spin = 0
    try:
        next_poll = time.monotonic() + interval
        while True:
            now_m = time.monotonic()
            if now_m < next_poll:
                if tty:
                    out.write(f"\r{SPINNER[spin % 4]} waiting for approval {_fmt_elapsed(now_m - start)} ")
                    out.flush()
                    spin += 1
                time.sleep(min(0.25, next_poll - now_m))
                continue
            next_poll = now_m + interval
            try:
                _, rec = api.json("GET", f"/api/requests/{rid}")
                failures = 0
            except EzsshError as exc:
                if exc.code != UNAVAILABLE or failures >= 5:
                    raise
                failures += 1
                continue
            state = rec.get("status")
            if state == "approved":
                out.write(_approved(rec))
                out.flush()
                return rec
            if state in ("denied", "cancelled", "expired"):
                raise _ended(rec)
            if state == "issued":
                raise EzsshError(f"Request {rid} has already been used for a certificate.")
            if expires_at and clock() > expires_at + 15:
                raise _ended({**rec, "status": "expired"})
    except KeyboardInterrupt:
        if tty:
            out.write("\n")
        try:
            api.call("POST", f"/api/requests/{rid}/cancel", body={})
            out.write(f"Cancelled request {rid}.\n")
        except EzsshError as exc:
            out.write(f"Could not cancel request {rid}: {exc.render()}\n")
        out.flush()
        raise EzsshError("Interrupted.", INTERRUPTED) from None
    finally:
        if tty:
            out.write("\r\033[K")
            out.flush()


def attempt_key(now: float | None = None) -> str:
    """An Idempotency-Key for one attempt: a UUIDv7 (RFC 9562: the time in ms, then 74 random bits).
    The service makes the request's id from it, so the request is one write and a retry finds it."""
    ms = int((time.time() if now is None else now) * 1000)
    rand = int.from_bytes(os.urandom(10), "big")  # 80 bits: 12 for rand_a, 62 for rand_b (6 dropped)
    value = (ms & (1 << 48) - 1) << 80 | 0x7 << 76 | (rand >> 68) << 64 | 0b10 << 62 | rand & (1 << 62) - 1
    return str(uuid.UUID(int=value))


def post_retrying(
    api: Api, path: str, body: dict, *, key: str | None = None, tries: int = 3, pause: float = 0.5
) -> tuple[int, dict]:
    """POST, and again (same body, same idempotency key) while the service is unavailable. A key the
    service finds ahead of its clock (this machine's clock is fast) wrote nothing: the attempt goes
    on with a random key, which the service keeps in a row of its own."""
    for attempt in range(tries):
        try:
            return api.json("POST", path, body=body, headers={"Idempotency-Key": key} if key else None)
        except EzsshError as exc:
            if exc.error == "idempotency_key_ahead" and key:
                key = uuid.uuid4().hex
                continue
            if exc.code != UNAVAILABLE or attempt == tries - 1:
                raise
            time.sleep(pause * 2**attempt)
    raise AssertionError("unreachable")


def obtain(
    cfg: dict, home: Path, inv: SshInvocation, api: Api, *, out=None, interval: float | None = None
) -> tuple[certs.Cached, dict]:
    """Get a new certificate for a new key; store it in the slot. Returns (cached, issuance body)."""
    from . import keys

    out = out or sys.stderr
    from .home import ensure_private_dir

    workdir = ensure_private_dir(certs.certs_root(home))  # the private key never touches a shared /tmp
    private, public = keys.new_keypair(f"ezssh {inv.principal}@{inv.host}", workdir=str(workdir))
    body: dict = {"host": inv.host, "principal": inv.principal, "public_key": public}
    if inv.policy:
        body["policy"] = inv.policy
    if inv.ttl:
        body["ttl_seconds"] = inv.ttl
    if inv.reason:
        body["reason"] = inv.reason
    # One idempotency key for this attempt: if an answer is lost (a 503 after the write landed, a
    # dropped connection), the retry gets that same answer instead of a second request.
    status, data = post_retrying(api, "/api/requests", body, key=attempt_key())
    state = data.get("status")
    if status == 202 or state == "pending":
        wait_for_approval(api, data, out=out, interval=interval)
        state = "approved"
    if state == "approved" and not data.get("certificate"):
        _, data = post_retrying(api, f"/api/requests/{data['id']}/certificate", {"public_key": public})
        state = data.get("status")
    if state != "issued" or not data.get("certificate"):
        raise EzsshError(f"The service answered {state!r} without a certificate (request {data.get('id')}).")
    seen = keys.inspect_certificate(data["certificate"], public, inv.principal)
    account = account_of(api.bearer)
    from .home import load_config

    now_signed_in = (load_config(home, required=False) or {}).get("account")
    if now_signed_in and account and now_signed_in != account:
        # Someone signed in as another account while this ran: this certificate is the old account's,
        # and must neither be kept nor make that account the signed-in one again.
        raise EzsshError(
            "The signed-in account changed while this certificate was being obtained; nothing was "
            "kept. Run the command again."
        )
    switch_account(cfg, home, account)
    meta = {
        **seen,
        "policy": data.get("policy"),
        "request_id": data.get("id"),
        "host": inv.host,
        "principal": inv.principal,
        "server": cfg["server"],
        "account": account,
        "ca_fingerprint": data.get("ca_fingerprint"),
        "created_at": int(time.time()),
    }
    cached = certs.store(home, inv.principal, inv.host, private, public, data["certificate"], meta)
    return cached, data


def switch_account(cfg: dict, home: Path, account: str | None) -> str | None:
    """Make `account` the signed-in one in config.json; when it was another, that account's keys and
    certificates leave the agent and the disk first (and stderr says so). Returns `account`."""
    from .home import save_config

    gone = certs.forget_others(home, cfg["server"], account)
    if gone:
        sys.stderr.write(
            f"ezssh: removed {gone} cached key{'s' if gone != 1 else ''} and certificate"
            f"{'s' if gone != 1 else ''} of another account or server (from ssh-agent too, where "
            "added).\n"
        )
    if account and cfg.get("account") != account:
        cfg["account"] = account
        save_config(cfg, home)
    return account
