"""Audit queries: who may read which entries, a page at a time, and whether a request's chain is whole."""

from __future__ import annotations

from ..core.audit import in_link_order, verify_chain
from ..core.errors import Forbidden, NotFound
from ..core.paging import decode_token, encode_token
from ..core.policy import Identity
from ..storage.base import AUDIT_POSITION_RE, AuditPage, AuditQuery, read_audit
from .base import Base
from .requests import Requests

DEFAULT_WINDOW = 24 * 3600  # searched when a query names no request, certificate or time
CHAIN_MAX = 10_000  # the most entries one request's chain check reads


AUDIT_REFUSED = "audit.refused"


class AuditLog:
    def __init__(self, base: Base, requests: Requests) -> None:
        self.base = base
        self.requests = requests

    def query(
        self,
        who: Identity,
        *,
        since: float | None = None,
        until: float | None = None,
        request_id: str | None = None,
        policy_id: str | None = None,
        key_id: str | None = None,
        serial: str | None = None,
        user: str | None = None,
        limit: int = 100,
        continuation: str | None = None,
    ) -> AuditPage:
        """A page of the caller's tenant's audit, oldest first: all entries for tenant admins, those of
        the policies they administer for policy admins. A request id, key id or serial (as sshd logs
        them) finds its entries at any age; otherwise, with no since/until, the last 24 hours. The
        page's `next` is an opaque token for the page after it (None at the end). Each page reads
        its own index rows (storage/base.py), never the tenant's history."""
        b = self.base
        with b.refusing(who, AUDIT_REFUSED, request_id=request_id, policy_id=policy_id, key_id=key_id, serial=serial):
            after = decode_token(continuation, AUDIT_POSITION_RE)
            policies: tuple[str, ...] | None = None
            if not who.is_tenant_admin:
                mine = sorted(p.id for p in b.policies.all(who.tid) if not p.deleted and p.is_admin(who))
                if not mine:
                    raise Forbidden("Only tenant admins and policy admins read the audit log.")
                if policy_id is not None and policy_id not in mine:
                    raise NotFound(f"Policy {policy_id!r} was not found.")
                policies = tuple(mine)
            if policy_id is not None:
                policies = (policy_id,)
        if since is None and until is None and not (request_id or key_id or serial):
            since = b.clock() - DEFAULT_WINDOW
        query = AuditQuery(
            since=since, until=until, request_id=request_id, user=user, serial=serial, key_id=key_id, policies=policies
        )
        page = b.store.audit_page(who.tid, query, limit=limit, after=after)
        return AuditPage(in_link_order(page.entries), encode_token(page.next) if page.next is not None else None)

    def request_chain_intact(self, who: Identity, request_id: str) -> bool:
        """The request's audit chain is whole: every entry intact, linked, and ending at the head
        its row holds."""
        rec = self.requests.visible(who, request_id)[0]
        chain = [
            e
            for e in read_audit(self.base.store, who.tid, AuditQuery(request_id=request_id), CHAIN_MAX)
            if e.chain == f"req:{request_id}"
        ]
        return verify_chain(in_link_order(chain), head=rec.audit_head)
