"""Audit queries: who may read which entries, and whether a request's chain is whole."""

from __future__ import annotations

from ..core.approval import SERIAL_RANDOM_BITS, request_id_of_serial, serial_of_request_id
from ..core.audit import AuditEntry, in_link_order, verify_chain
from ..core.errors import Forbidden, NotFound
from ..core.policy import Identity
from .base import Base
from .requests import Requests


def request_of(key_id: str | None, serial: str | None) -> str | None:
    """The request a user certificate's key id (ezssh/<policy>/<request>/<upn>) or serial names."""
    if key_id:
        parts = key_id.split("/")
        if len(parts) >= 4 and parts[0] == "ezssh" and serial_of_request_id(parts[2]) is not None:
            return parts[2]
    if serial and serial.isdigit() and 0 < int(serial) < 2**63:
        return request_id_of_serial(int(serial))
    return None


class AuditLog:
    def __init__(self, base: Base, requests: Requests) -> None:
        self.base = base
        self.requests = requests

    def query(self, who: Identity, *, since: float | None = None, until: float | None = None,
              request_id: str | None = None, policy_id: str | None = None, key_id: str | None = None,
              serial: str | None = None, limit: int = 200) -> list[AuditEntry]:
        """Audit entries of the caller's tenant: all of them for tenant admins, those of the policies
        they administer for policy admins. sshd's log lines join by key_id and serial: for a user
        certificate those name its request, whose entries are found at any age; otherwise (and with
        no since/until/request_id) the last 24 hours are searched."""
        b = self.base
        mine: set[str] | None = None
        if not who.is_tenant_admin:
            mine = {p.id for p in b.policies.all(who.tid) if not p.deleted and p.is_admin(who)}
            if not mine:
                raise Forbidden("Only tenant admins and policy admins read the audit log.")
            if policy_id is not None and policy_id not in mine:
                raise NotFound(f"Policy {policy_id!r} was not found.")
        entries: list[AuditEntry] = []
        if since is None and until is None and request_id is None:
            # From sshd's log line: the key id holds the request id, and the serial is the request id
            # (core.approval), so the entries are read from the request's own time on, at any age.
            rid = request_of(key_id, serial)
            if rid is not None:
                made = (serial_of_request_id(rid) or 0) >> SERIAL_RANDOM_BITS
                entries = b.store.list_audit(who.tid, request_id=rid, since=made / 1000 - 300, limit=100_000)
            if not entries:
                since = b.clock() - 24 * 3600
        if not entries:
            entries = b.store.list_audit(who.tid, since=since, until=until, request_id=request_id, limit=100_000)
        out: list[AuditEntry] = []
        for e in entries:
            if mine is not None and e.policy_id not in mine:
                continue
            if (policy_id and e.policy_id != policy_id) or (key_id and e.key_id != key_id) or \
                    (serial and e.serial != serial):
                continue
            out.append(e)
        return in_link_order(out)[-limit:]

    def request_chain_intact(self, who: Identity, request_id: str) -> bool:
        """The request's audit chain is whole: every entry intact, linked, and ending at the head
        its row holds."""
        rec = self.requests.visible(who, request_id)[0]
        chain = [e for e in self.base.store.list_audit(who.tid, request_id=request_id, limit=100_000)
                 if e.chain == f"req:{request_id}"]
        return verify_chain(in_link_order(chain), head=rec.audit_head)
