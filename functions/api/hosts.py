"""Hosts: the setup script, the revocation list (KRL) and revoking a certificate.

`GET /api/policies/{id}/krl` answers two kinds of caller:
  - a signed-in user who can see the policy (bearer token), and
  - a host, without an Entra token: `?tenant=<tid>` plus the header `X-Ezssh-Host-Token`, the
    policy's host token (rendered into the setup script). Any mismatch is one 401.
Both get an ETag; with `If-None-Match: <that ETag>` an unchanged KRL is a 304 with no body.
"""

from __future__ import annotations

import re

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from ..core.errors import InvalidRequest
from ..core.policy import Identity
from ..service.hosts import REVOKE_REFUSED, Derived
from .deps import Strict, body, caller, context, identify, service

router = APIRouter(prefix="/api", tags=["hosts"])
HOST_TOKEN_HEADER = "x-ezssh-host-token"
SERIAL_RE = re.compile(r"^[0-9]{1,19}$")


class RevokeBody(Strict):
    reason: str | None = None


def _serial(raw: str) -> int:
    if not SERIAL_RE.match(raw) or not 0 < int(raw) < 2**63:
        raise InvalidRequest(f"Serial {raw[:40]!r} is not a certificate serial (a decimal number from 1 to 2^63-1).")
    return int(raw)


def derived_response(request: Request, answer: Derived, media_type: str, headers: dict[str, str]) -> Response:
    """The answer, or 304 with no body when the caller's If-None-Match names its ETag already. No
    shared cache keeps it (no-store, as every answer): the callers keep their copy and its ETag."""
    headers = {"ETag": answer.etag, **headers}
    if answer.unchanged or answer.etag in etags(request):
        return Response(status_code=304, headers=headers)
    return Response(answer.data, media_type=media_type, headers=headers)


def etags(request: Request) -> set[str]:
    """The entity tags of an If-None-Match header ("a", W/"b"; weak ones compare as strong here, as
    RFC 9110 says If-None-Match does). `*` matches no ETag of ours: the answer always exists."""
    out = set()
    for part in (request.headers.get("if-none-match") or "").split(","):
        part = part.strip().removeprefix("W/")
        if len(part) >= 2 and part[0] == part[-1] == '"':
            out.add(part)
    return out


@router.get("/policies/{policy_id}/krl")
def krl(request: Request, policy_id: str, tenant: str | None = Query(None)) -> Response:
    svc = service(request)
    host_token = request.headers.get(HOST_TOKEN_HEADER)
    if host_token and not request.headers.get("authorization"):
        answer = svc.hosts.krl_for_host(tenant, policy_id, host_token)
    else:
        answer = svc.hosts.krl_for(identify(request), policy_id)
    return derived_response(
        request,
        answer,
        "application/octet-stream",
        {"Content-Disposition": f'attachment; filename="{policy_id}.krl"', "X-Krl-Version": str(answer.version)},
    )


@router.get("/policies/{policy_id}/host-setup")
def host_setup(request: Request, policy_id: str, who: Identity = Depends(caller)) -> PlainTextResponse:
    # where hosts reach this service: the deployment's setting, never the request's Host header
    script = service(request).hosts.host_setup_script(who, policy_id, context(request).settings.public_url)
    return PlainTextResponse(
        script,
        media_type="text/x-shellscript",
        headers={"Content-Disposition": f'attachment; filename="ezssh-host-setup-{policy_id}.sh"'},
    )


@router.post("/certificates/{policy_id}/{serial}/revoke")
def revoke(
    request: Request,
    policy_id: str,
    serial: str,
    who: Identity = Depends(caller),
    rb: RevokeBody = body(RevokeBody, REVOKE_REFUSED),
) -> JSONResponse:
    svc = service(request)
    with svc.base.refusing(who, REVOKE_REFUSED, policy_id=policy_id):
        number = _serial(serial)
    rec = svc.hosts.revoke_certificate(who, policy_id, number, rb.reason)
    return JSONResponse(
        {
            "policy": rec.policy_id,
            "serial": str(rec.serial),
            "key_id": rec.key_id,
            "revoked_at": rec.revoked_at,
            "revoked_by": rec.revoked_by,
            "valid_before": rec.valid_before,
        }
    )
