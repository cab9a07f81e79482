"""People and apps: revoke every live certificate one of them holds, in one step.

`POST /api/identities/{oid}/revoke` {reason?}: for tenant admins across the tenant's policies, for
policy admins across the policies they administer. The answer lists what was revoked.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from ..core.policy import Identity
from ..service.identities import IDENTITY_REVOKE_REFUSED
from .deps import body, caller, service
from .hosts import RevokeBody

router = APIRouter(prefix="/api/identities", tags=["identities"])


@router.post("/{oid}/revoke")
def revoke_all(
    request: Request,
    oid: str,
    who: Identity = Depends(caller),
    rb: RevokeBody = body(RevokeBody, IDENTITY_REVOKE_REFUSED),
) -> dict:
    revoked = service(request).identities.revoke_all(who, oid, rb.reason)
    return {
        "oid": oid.lower(),
        "revoked": [
            {
                "policy": c.policy_id,
                "serial": str(c.serial),
                "key_id": c.key_id,
                "host": c.host,
                "valid_before": c.valid_before,
            }
            for c in revoked
        ],
    }
