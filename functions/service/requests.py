"""Access requests after they are made: look, list, approve, deny, cancel, expire."""

from __future__ import annotations

import builtins
import logging
from dataclasses import dataclass, replace

from ..core import requests as sm
from ..core.audit import link, with_head
from ..core.errors import Conflict, Forbidden, InvalidRequest, NotFound
from ..core.paging import decode_token, encode_token
from ..core.policy import Identity, Policy
from ..core.records import CertificateRecord
from ..notify import Message
from ..observability import event
from ..storage.base import BY_USER, OPEN_BY_POLICY, OPEN_BY_USER, OPEN_IN_TENANT, POSITION_RE, index_position
from .base import Base

log = logging.getLogger("ezssh.service")

PAST = {"approve": "approved", "deny": "denied", "cancel": "cancelled"}
STATES = (sm.PENDING, sm.APPROVED, sm.DENIED, sm.EXPIRED, sm.CANCELLED, sm.ISSUED)
ROLES = ("requester", "approver")
MAX_LIMIT = 1000
# Past this many policies in a caller's scope, their open requests are read from the tenant's open
# index (one range read, filtered by scope) instead of one range read per policy.
MAX_POLICY_SOURCES = 4
SWEEP_BATCH = 500  # expiry keys the sweep handles per tenant per run; the rest wait for the next run
TRANSITIONS = {"approve": sm.approve, "deny": sm.deny, "cancel": sm.cancel}
DECISION_TRIES = 5  # reads + conditional writes one decision may take when others land meanwhile


def person(name: str, upn: str) -> str:
    """'Bob Brandt (bob@contoso.test)' on a card: the name people know, the UPN that identifies."""
    return f"{name} ({upn})" if name and name != upn else upn


def request_message(
    rec: sm.RequestRecord, policy: Policy, title: str, extra: tuple[tuple[str, str], ...] = ()
) -> Message:
    facts = (
        ("Requester", person(rec.requester_name, rec.requester_upn)),
        ("Host", rec.host),
        ("Login", rec.principal),
        ("For", f"{rec.ttl_seconds // 60} min"),
        ("Reason", rec.reason or "-"),
        ("Policy", rec.policy_id),
        ("Request", rec.id),
    ) + extra
    return Message(
        rec.tenant_id,
        policy.webhook_url or "",
        policy.webhook_format,
        title,
        facts,
        request_id=rec.id,
        policy_id=rec.policy_id,
    )


@dataclass(frozen=True)
class RequestPage:
    requests: list[sm.RequestRecord]
    next: str | None  # the continuation token of the next page; None at the end


def decision_refused(action: str) -> str:
    """The action a refused decision (approve, deny, cancel) is recorded under."""
    return f"request.{action}.refused"


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

    def certificate_of(self, who: Identity, rec: sm.RequestRecord) -> CertificateRecord | None:
        """The certificate an issued request (that `who` may see) became: one point read."""
        if rec.state != sm.ISSUED or rec.serial is None:
            return None
        try:
            return self.base.store.get_certificate(who.tid, rec.policy_id, rec.serial)
        except NotFound:
            return None

    def list(
        self,
        who: Identity,
        *,
        state: str | None = None,
        role: str | None = None,
        limit: int = 100,
        continuation: str | None = None,
    ) -> RequestPage:
        """Newest first, one page. `role=requester`: the caller's own requests (those issued at once
        are certificates, in the audit); `role=approver`: the open requests of the policies the
        caller approves, not their own; neither: both, plus the open requests of the policies the
        caller administers. Each source is one index range read of at most `limit` + 1 rows (one per
        policy in the caller's scope, or one of the tenant's open requests when the scope is wider
        than MAX_POLICY_SOURCES policies), never a scan of the tenant's history."""
        if role is not None and role not in ROLES:
            raise InvalidRequest(f"Unknown role {role!r}; use requester or approver.")
        if state is not None and state not in STATES:
            raise InvalidRequest(f"Unknown state {state!r}; use one of {', '.join(STATES)}.")
        if not 1 <= limit <= MAX_LIMIT:
            raise InvalidRequest(f"limit must be between 1 and {MAX_LIMIT}.")
        after = decode_token(continuation, POSITION_RE)
        open_only = state in (sm.PENDING, sm.APPROVED)
        sources: list[tuple[str, str]] = []
        if role != "approver":
            sources.append((OPEN_BY_USER if open_only else BY_USER, who.oid))
        scope: set[str] = set()
        if role != "requester" and (state is None or state in sm.OPEN_STATES or state == sm.EXPIRED):
            scope = {
                p.id
                for p in self.base.policies.cached(who.tid)
                if not p.deleted and (p.is_approver(who) or (role is None and p.is_admin(who)))
            }
            if len(scope) > MAX_POLICY_SOURCES:
                sources.append((OPEN_IN_TENANT, "*"))
            else:
                sources += [(OPEN_BY_POLICY, pid) for pid in sorted(scope)]
        elif role == "approver":
            raise InvalidRequest(
                "Approvers list open requests (pending or approved); decided requests are in "
                "the audit log (GET /api/audit)."
            )
        return self._page(who, sources, scope, after, limit, state, role)

    def _page(
        self,
        who: Identity,
        sources: builtins.list[tuple[str, str]],
        scope: set[str],
        after: str | None,
        limit: int,
        state: str | None,
        role: str | None,
    ) -> RequestPage:
        """Merge the sources newest first. A source that returned more than `limit` rows may hold
        more past its last row read, so the page ends there at the latest (`next` goes on from it)."""
        now = self.base.now()
        seen: dict[str, sm.RequestRecord] = {}
        horizon: str | None = None  # past this position some source may have rows not read yet
        for index, key in sources:
            rows = self.base.store.list_request_index(who.tid, index, key, after=after, limit=limit + 1)
            for r in rows:
                seen.setdefault(index_position(r), r)
            if len(rows) > limit:
                horizon = min(horizon or "~", index_position(rows[-1]))
        out: list[sm.RequestRecord] = []
        last = None
        positions = sorted(seen)
        for pos in positions:
            if horizon is not None and pos > horizon or len(out) == limit:
                break
            last, r = pos, seen[pos]
            # the caller's own (not an approver's to decide), or another's under a policy in scope
            if not (role != "approver" if r.requester_is(who) else r.policy_id in scope):
                continue
            if state is not None and r.effective_state(now) != state:
                continue
            out.append(r)
        more = horizon is not None or (last is not None and positions[-1] > last)
        return RequestPage(out, encode_token(last) if more and last is not None else None)

    def approve(self, who: Identity, request_id: str, comment: str | None = None) -> sm.RequestRecord:
        return self._transition(who, request_id, "approve", comment)

    def deny(self, who: Identity, request_id: str, comment: str | None = None) -> sm.RequestRecord:
        return self._transition(who, request_id, "deny", comment)

    def cancel(self, who: Identity, request_id: str, comment: str | None = None) -> sm.RequestRecord:
        return self._transition(who, request_id, "cancel", comment)

    def _transition(self, who: Identity, request_id: str, action: str, comment: str | None) -> sm.RequestRecord:
        """Decide, conditional on the ETag read. Decisions commute: when the row changed meanwhile
        (another approver's approval, a retry of this very call whose answer was lost) it is read
        again, checked again and the decision applied again, up to DECISION_TRIES times. A decision
        already on record for this person is answered with the record as it stands; one that lost
        to another decision is a 409 naming it."""
        with self.base.refusing(who, decision_refused(action), request_id=request_id):
            for attempt in range(1, DECISION_TRIES + 1):
                rec, policy = self.visible(who, request_id)
                if action in ("approve", "deny") and (policy is None or not policy.is_approver(who)):
                    raise Forbidden("You are not an approver for this request's policy.")
                if sm.already_decided(rec, who, action):
                    return rec
                new = TRANSITIONS[action](rec, who, self.base.now(), comment=comment)
                entry = link(
                    self.base.audit_entry(
                        who,
                        f"request.{PAST[action]}",
                        request_id=rec.id,
                        policy_id=rec.policy_id,
                        host=rec.host,
                        principal=rec.principal,
                        chain=f"req:{rec.id}",
                        details={"comment": comment, "state": new.state, "approvals": len(new.approvals)},
                    ),
                    rec,
                )
                try:
                    saved = self.base.store.update_request(with_head(new, entry), rec.etag or "", entry)
                    break
                except Conflict:
                    if attempt == DECISION_TRIES:
                        raise Conflict(
                            f"Request {rec.id} kept changing while this decision was made; try again."
                        ) from None
        past = PAST[action]
        event(
            log,
            f"request.{past}",
            request=rec.id,
            policy=rec.policy_id,
            actor=who.upn,
            tenant=who.tid,
            state=saved.state,
        )
        if saved.state in (sm.APPROVED, sm.DENIED) and policy is not None:
            verdict = "approved" if saved.state == sm.APPROVED else "denied"
            self.base.notify(
                policy,
                request_message(
                    saved,
                    policy,
                    f"ezssh: access request {verdict}",
                    (("Decided by", person(saved.decided_by_name, who.upn)), ("Comment", comment or "-")),
                ),
            )
        return saved

    def expire(self, tenant_id: str, limit: int = SWEEP_BATCH) -> builtins.list[str]:
        """Move pending/approved requests past their deadline to `expired` (the timer's sweep). Reads
        only the expiry keys due (at most `limit`), one point read each; reads check expiry too, so
        this only makes storage and the audit say so. A key left behind (its request gone, or its
        deadline moved at approval) is removed."""
        now = self.base.now()
        done = []
        for expires_at, rid in self.base.store.due_requests(tenant_id, now, limit):
            try:
                rec = self.base.store.get_request(tenant_id, rid)
            except NotFound:
                rec = None
            if rec is not None and rec.state in sm.OPEN_STATES and rec.expires_at == expires_at:
                # expired now, or decided meanwhile: either write took this key with it
                if self._expire(tenant_id, rec, now):
                    done.append(rec.id)
                continue
            self.base.store.remove_expiry_key(tenant_id, expires_at, rid)
        return done

    def _expire(self, tenant_id: str, rec: sm.RequestRecord, now: int) -> bool:
        new = sm.expire(rec, now)
        entry = link(
            replace(
                self.base.audit_entry(
                    None,
                    "request.expired",
                    request_id=rec.id,
                    policy_id=rec.policy_id,
                    host=rec.host,
                    principal=rec.principal,
                    chain=f"req:{rec.id}",
                    details={"was": rec.state},
                ),
                tenant_id=tenant_id,
            ),
            rec,
        )
        try:
            self.base.store.update_request(with_head(new, entry), rec.etag or "", entry)
        except (Conflict, NotFound):
            return False
        policy = self.base.policies.get_or_none(tenant_id, rec.policy_id)
        if policy is not None:
            self.base.notify(policy, request_message(new, policy, "ezssh: access request expired"))
        return True
