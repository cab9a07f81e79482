"""Access requests after they are made: look, list, approve, deny, cancel, expire."""

from __future__ import annotations

import logging
from dataclasses import replace

from ..core import approval as sm
from ..core.audit import link
from ..core.errors import Conflict, Forbidden, NotFound
from ..core.policy import Identity, Policy
from ..notify import Message
from ..observability import event
from .base import Base

log = logging.getLogger("ezssh.service")

PAST = {"approve": "approved", "deny": "denied", "cancel": "cancelled"}
TRANSITIONS = {"approve": sm.approve, "deny": sm.deny, "cancel": sm.cancel}


def request_message(rec: sm.RequestRecord, policy: Policy, title: str,
                    extra: tuple[tuple[str, str], ...] = ()) -> Message:
    facts = (
        ("Requester", rec.requester_upn),
        ("Host", rec.host),
        ("Login", rec.principal),
        ("For", f"{rec.ttl_seconds // 60} min"),
        ("Reason", rec.reason or "-"),
        ("Policy", rec.policy_id),
        ("Request", rec.id),
    ) + extra
    return Message(rec.tenant_id, policy.webhook_url or "", policy.webhook_format, title, facts,
                   request_id=rec.id, policy_id=rec.policy_id)


class Requests:
    def __init__(self, base: Base) -> None:
        self.base = base

    def visible(self, who: Identity, request_id: str) -> tuple[sm.RequestRecord, Policy | None]:
        """The request and its policy, if `who` asked for it, approves or administers it."""
        rec = self.base.store.get_request(who.tid, request_id)
        policy = self.base.policies.get_or_none(who.tid, rec.policy_id)
        if rec.requester_is(who):
            return rec, policy
        if policy is not None and (policy.is_approver(who) or policy.is_admin(who)):
            return rec, policy
        raise NotFound(f"Request {request_id!r} was not found.")

    def get(self, who: Identity, request_id: str) -> sm.RequestRecord:
        return self.visible(who, request_id)[0]

    def list(self, who: Identity, *, state: str | None = None, role: str | None = None) -> list[sm.RequestRecord]:
        now = self.base.now()
        stored_state = state if state in (None, sm.DENIED, sm.CANCELLED, sm.ISSUED) else None
        recs = self.base.store.list_requests(who.tid, stored_state)
        policies = {p.id: p for p in self.base.policies.all(who.tid)}
        out = []
        for r in recs:
            p = policies.get(r.policy_id)
            mine = r.requester_is(who)
            approver = p is not None and p.is_approver(who) and not mine
            if role == "approver" and not approver:
                continue
            if role == "requester" and not mine:
                continue
            if not (mine or approver or (p is not None and p.is_admin(who))):
                continue
            if state and r.effective_state(now) != state:
                continue
            out.append(r)
        return sorted(out, key=lambda r: r.created_at, reverse=True)

    def approve(self, who: Identity, request_id: str, comment: str | None = None) -> sm.RequestRecord:
        return self._transition(who, request_id, "approve", comment)

    def deny(self, who: Identity, request_id: str, comment: str | None = None) -> sm.RequestRecord:
        return self._transition(who, request_id, "deny", comment)

    def cancel(self, who: Identity, request_id: str, comment: str | None = None) -> sm.RequestRecord:
        return self._transition(who, request_id, "cancel", comment)

    def _transition(self, who: Identity, request_id: str, action: str, comment: str | None) -> sm.RequestRecord:
        with self.base.refusing(who, f"request.{action}.refused", request_id=request_id):
            rec, policy = self.visible(who, request_id)
            if action in ("approve", "deny") and (policy is None or not policy.is_approver(who)):
                raise Forbidden("You are not an approver for this request's policy.")
            new = TRANSITIONS[action](rec, who, self.base.now(), comment=comment)
        past = PAST[action]
        entry = link(self.base.audit_entry(who, f"request.{past}", request_id=rec.id, policy_id=rec.policy_id,
                                           host=rec.host, principal=rec.principal, chain=f"req:{rec.id}",
                                           details={"comment": comment, "state": new.state,
                                                    "approvals": len(new.approvals)}), rec.audit_head)
        saved = self.base.store.update_request(replace(new, audit_head=entry.hash), rec.etag or "", entry)
        event(log, f"request.{past}", request=rec.id, policy=rec.policy_id, actor=who.upn, tenant=who.tid,
              state=saved.state)
        if saved.state in (sm.APPROVED, sm.DENIED) and policy is not None:
            verdict = "approved" if saved.state == sm.APPROVED else "denied"
            self.base.notify(policy, request_message(
                saved, policy, f"ezssh: access request {verdict}",
                (("Decided by", who.upn), ("Comment", comment or "-"))))
        return saved

    def expire(self, tenant_id: str) -> list[str]:
        """Move pending/approved requests past their deadline to `expired` (the timer's sweep).
        Reads check expiry too, so this only makes storage and the audit say so."""
        now = self.base.now()
        done = []
        for rec in self.base.store.list_requests(tenant_id):
            if rec.state not in (sm.PENDING, sm.APPROVED) or rec.effective_state(now) != sm.EXPIRED:
                continue
            new = sm.expire(rec, now)
            entry = link(replace(self.base.audit_entry(None, "request.expired", request_id=rec.id,
                                                       policy_id=rec.policy_id, host=rec.host,
                                                       principal=rec.principal, chain=f"req:{rec.id}",
                                                       details={"was": rec.state}), tenant_id=tenant_id),
                         rec.audit_head)
            try:
                self.base.store.update_request(replace(new, audit_head=entry.hash), rec.etag or "", entry)
            except (Conflict, NotFound):
                continue  # decided or swept meanwhile
            done.append(rec.id)
            policy = self.base.policies.get_or_none(tenant_id, rec.policy_id)
            if policy is not None:
                self.base.notify(policy, request_message(new, policy, "ezssh: access request expired"))
        return done
