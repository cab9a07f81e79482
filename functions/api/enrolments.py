"""Enrolments: push a policy's host setup script to Azure VMs (Run Command) and list the outcomes.

    POST /api/policies/{id}/enrolments   {"vm_id": "/subscriptions/.../virtualMachines/web1"}
                                         {"resource_group": "rg1" | "/subscriptions/<id>/resourceGroups/rg1",
                                          "tag": "name=value"}
      -> 200 {"enrolments": [...]}  (each: state succeeded | failed | retrying | pending, attempts,
         output_tail, last_error, ...). The push runs before the answer for up to 20 VMs; more stay
         pending and the reconcile timer takes them.
    GET  /api/policies/{id}/enrolments   -> 200 {"enrolments": [...]}

Policy admins and tenant admins only. A resource id that does not parse is 400; a VM or resource
group outside EZSSH_ENROL_SCOPES is 403 (outside_enrolment_scopes); another tenant's policy is 404.
Nothing is pushed and no record is written in those cases.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import Field

from ..core.errors import BackendUnavailable
from ..core.policy import Identity
from .deps import Strict, body, caller, context

router = APIRouter(prefix="/api/policies", tags=["enrolments"])


class EnrolBody(Strict):
    vm_id: str | None = Field(None, max_length=400)
    resource_group: str | None = Field(None, max_length=200)
    tag: str | None = Field(None, max_length=600)


def _enrolments(request: Request):  # type: ignore[no-untyped-def]
    svc = context(request).enrolments
    if svc is None:
        raise BackendUnavailable("Enrolment is not available in this deployment.")
    return svc


@router.post("/{policy_id}/enrolments")
def enrol(request: Request, policy_id: str, who: Identity = Depends(caller),
          eb: EnrolBody = body(EnrolBody, "enrolment.refused")) -> JSONResponse:
    svc = _enrolments(request)
    api_url = str(request.base_url).rstrip("/")
    recs = svc.enrol(who, policy_id, vm_id=eb.vm_id, resource_group=eb.resource_group, tag=eb.tag, api_url=api_url)
    return JSONResponse({"enrolments": [r.to_dict() for r in recs]})


@router.get("/{policy_id}/enrolments")
def list_(request: Request, policy_id: str, who: Identity = Depends(caller)) -> JSONResponse:
    recs = _enrolments(request).list(who, policy_id)
    return JSONResponse({"enrolments": [r.to_dict() for r in recs]})
