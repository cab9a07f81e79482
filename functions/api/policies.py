"""Access policies: CRUD (conditional on ETags), CA keys and rotation."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse

from ..core.errors import InvalidRequest
from ..core.evaluation import allowed_logins
from ..core.jsonvalue import JsonValue
from ..core.policy import Identity, Policy
from ..service.policies import POLICY_CREATE_REFUSED, POLICY_UPDATE_REFUSED
from .deps import body, caller, service

router = APIRouter(prefix="/api/policies", tags=["policies"])


# What a member, an approver or anyone else who may see a policy needs to ask for access under it.
MEMBER_FIELDS = (
    "id",
    "name",
    "tenant_id",
    "hosts",
    "approvals_required",
    "default_ttl",
    "max_ttl",
    "request_ttl",
    "extensions",
    "force_command",
    "source_address",
)


def view(p: Policy, who: Identity) -> dict:
    """What a caller sees of a policy. Its admins see the whole document; everyone else what they
    need to ask for access: hosts, their own logins, TTLs, and the CA public keys (no key references,
    no webhook URL, no other people's object ids, no host token)."""
    rule = p.rule_for(who)
    member = rule is not None and rule.action != "deny"
    you = {
        "admin": p.is_admin(who),
        "member": member,
        "approver": p.is_approver(who),
        "access": rule.action if rule is not None else "deny",  # what asking for access would get
        "logins": list(allowed_logins(p, who)) if member else [],
    }
    if you["admin"]:
        d = p.to_dict()
        d.pop("host_token", None)
    else:
        full = p.to_dict()
        d = {k: full[k] for k in MEMBER_FIELDS}
        d["ca"] = [{"public_key": c.public_key, "fingerprint": c.fingerprint, "state": c.state} for c in p.trusted_ca]
    d["etag"] = p.etag
    d["you"] = you
    return d


def _respond(p: Policy, who: Identity, status: int = 200) -> JSONResponse:
    headers = {"ETag": p.etag} if p.etag else None
    return JSONResponse(view(p, who), status_code=status, headers=headers)


@router.get("")
def list_(request: Request, who: Identity = Depends(caller)) -> dict:
    return {"policies": [view(p, who) for p in service(request).policies.list(who)]}


@router.post("")
def create(
    request: Request, who: Identity = Depends(caller), doc: JsonValue = body(None, POLICY_CREATE_REFUSED)
) -> JSONResponse:
    return _respond(service(request).policies.create(who, doc), who, 201)


@router.get("/{policy_id}")
def get(request: Request, policy_id: str, who: Identity = Depends(caller)) -> JSONResponse:
    return _respond(service(request).policies.get(who, policy_id), who)


@router.patch("/{policy_id}")
def update(
    request: Request,
    policy_id: str,
    who: Identity = Depends(caller),
    if_match: str | None = Header(None),
    doc: JsonValue = body(None, POLICY_UPDATE_REFUSED),
) -> JSONResponse:
    return _respond(service(request).policies.update(who, policy_id, doc, if_match), who)


@router.delete("/{policy_id}")
def delete(
    request: Request, policy_id: str, who: Identity = Depends(caller), if_match: str | None = Header(None)
) -> Response:
    service(request).policies.delete(who, policy_id, if_match)
    return Response(status_code=204)


@router.post("/{policy_id}/rotate-ca")
def rotate(
    request: Request,
    policy_id: str,
    who: Identity = Depends(caller),
    if_match: str | None = Header(None),
    kind: str = Query("user"),
) -> JSONResponse:
    return _respond(service(request).policies.rotate_ca(who, policy_id, if_match, kind=kind), who)


@router.get("/{policy_id}/ca")
def ca(
    request: Request,
    policy_id: str,
    who: Identity = Depends(caller),
    kind: str = Query("user"),
    format: str = Query("text"),
) -> Response:
    """The CA public keys, current first: `?kind=user` (the default, what old clients read) or
    `?kind=host`, as text lines, or `?format=json` with both kinds and their states."""
    svc = service(request)
    with svc.base.refusing(who, "policy.ca.refused", policy_id=policy_id):
        if kind not in ("user", "host") or format not in ("text", "json"):
            raise InvalidRequest("'kind' must be user or host, and 'format' text or json.")
    if format == "json":
        out = {k: [c.to_dict() for c in svc.policies.ca_public_keys(who, policy_id, k)] for k in ("user", "host")}
        for docs in out.values():
            for c in docs:
                c.pop("key_ref", None)
        return JSONResponse({"policy": policy_id, **out})
    keys = svc.policies.ca_public_keys(who, policy_id, kind)
    return PlainTextResponse("".join(k.public_key + "\n" for k in keys))
