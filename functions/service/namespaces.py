"""Host namespaces: where a tenant's hosts live (core.namespaces). Tenant admins set them; until one
does, the deployment setting (EZSSH_HOST_NAMESPACES) applies. Policy admins can't widen them: a host
certificate names only hosts inside them, and clients trust a policy's host CA only inside them.

One point read per host-certificate issuance and per known-hosts answer."""

from __future__ import annotations

from typing import Any

from ..core.errors import Forbidden, InvalidRequest, PreconditionRequired
from ..core.jsonvalue import JsonValue
from ..core.namespaces import Namespace, parse_namespace, parse_namespaces
from ..core.policy import Identity
from ..core.records import HostNamespaces
from ..observability import event
from ..publicsuffix import is_public_suffix
from .base import Base, log

NAMESPACES_REFUSED = "host_namespaces.refused"


class Namespaces:
    def __init__(self, base: Base) -> None:
        self.base = base

    @staticmethod
    def is_public(name: str) -> bool:
        return is_public_suffix(name)

    def _configured(self, tid: str) -> tuple[str, ...]:
        return next((ns for t, ns in self.base.config.host_namespaces if t == tid.lower()), ())

    def current(self, tid: str) -> tuple[Namespace, ...]:
        """The tenant's namespaces: as its tenant admins last set them, else from the settings. An
        entry that no longer passes (the Public Suffix List now names it) is left out, and logged:
        the namespaces only ever narrow by themselves."""
        row = self.base.store.get_host_namespaces(tid)
        out = []
        for entry in row.namespaces if row is not None else self._configured(tid):
            try:
                out.append(parse_namespace(entry, is_public_suffix))
            except InvalidRequest as exc:
                event(log, "host_namespaces.ignored", tenant=tid, namespace=entry, detail=exc.message)
        return tuple(out)

    def view(self, who: Identity) -> dict[str, Any]:
        """What any signed-in user of the tenant may read (clients trust host CAs inside these)."""
        row = self.base.store.get_host_namespaces(who.tid)
        if row is None:
            return {"namespaces": list(self._configured(who.tid)), "source": "setting", "etag": None}
        return {
            "namespaces": list(row.namespaces),
            "source": "tenant",
            "etag": row.etag,
            "updated_at": row.updated_at,
            "updated_by": row.updated_by_upn,
        }

    def replace(self, who: Identity, doc: JsonValue, if_match: str | None) -> dict[str, Any]:
        """Tenant admins only. The first change needs no If-Match (the setting applied until then);
        every later one the ETag it read."""
        b = self.base
        with b.refusing(who, NAMESPACES_REFUSED, details={"namespaces": str(doc)[:500]}):
            if not who.is_tenant_admin:
                raise Forbidden("Only tenant admins declare the tenant's host namespaces.")
            if not isinstance(doc, dict) or set(doc) != {"namespaces"}:
                raise InvalidRequest('Send {"namespaces": ["*.contoso.internal", "10.20.0.0/16", ...]}.')
            entries = tuple(str(n) for n in parse_namespaces(doc["namespaces"], is_public_suffix))
            existing = b.store.get_host_namespaces(who.tid)
            if existing is not None and not if_match:
                raise PreconditionRequired("Send If-Match with the namespaces' ETag to change them.")
            before = existing.namespaces if existing is not None else self._configured(who.tid)
            entry = b.audit_entry(
                who, "host_namespaces.changed", details={"before": list(before), "after": list(entries)}
            ).sealed()
            ns = HostNamespaces(
                tenant_id=who.tid,
                namespaces=entries,
                updated_at=b.now(),
                updated_by_oid=who.oid,
                updated_by_upn=who.upn,
            )
            b.store.put_host_namespaces(ns, if_match if existing is not None else None, entry)
        event(log, "host_namespaces.changed", tenant=who.tid, actor=who.upn, namespaces=",".join(entries))
        return self.view(who)
