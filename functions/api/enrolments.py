"""Enrolments: push a policy's host setup script to Azure VMs (Run Command) and list the outcomes.

    POST /api/policies/{id}/enrolments   {"vm_id": "/subscriptions/.../virtualMachines/web1"}
                                         {"resource_group": "rg1" | "/subscriptions/<id>/resourceGroups/rg1",
                                          "tag": "name=value"}
      -> 202 {"job": {id, state, done, counts, ...}, "items": [{vm_id, state, ...}]}, Location: the job.
         Nothing is pushed before the answer: each VM is one queue message that the queue-triggered
         function pushes. A tag that matches no VM gives a job with no items (done at once).
    GET  /api/policies/{id}/enrolment-jobs/{job_id}
      -> 200 the same shape: each item queued | running | retrying | succeeded | failed, with its
         attempts, last error and output tail; job.done once every item is succeeded or failed.
    GET  /api/policies/{id}/enrolments?limit=100&continuation=...
      -> 200 {"enrolments": [...], "next": <token or null>} (each VM's latest outcome, a page at a time:
         `limit` 1-1000, default 100; pass `next` back as `continuation` for the page after)

Policy admins and tenant admins only. A resource id that does not parse is 400; a VM or resource
group outside EZSSH_ENROL_SCOPES is 403 (outside_enrolment_scopes); another tenant's policy is 404.
Nothing is pushed and no record is written in those cases.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse
from pydantic import Field

from ..core.errors import BackendUnavailable
from ..core.policy import Identity
from ..service.enrolment.enrol import ENROL_REFUSED
from .deps import Strict, body, caller, context

if TYPE_CHECKING:
    from ..service.enrolment import EnrolmentService

router = APIRouter(prefix="/api/policies", tags=["enrolments"])


class EnrolBody(Strict):
    vm_id: str | None = Field(None, max_length=400)
    resource_group: str | None = Field(None, max_length=200)
    tag: str | None = Field(None, max_length=600)


def _enrolments(request: Request) -> EnrolmentService:
    svc = context(request).enrolments
    if svc is None:
        raise BackendUnavailable("Enrolment is not available in this deployment.")
    return svc


@router.post("/{policy_id}/enrolments")
def enrol(
    request: Request, policy_id: str, who: Identity = Depends(caller), eb: EnrolBody = body(EnrolBody, ENROL_REFUSED)
) -> JSONResponse:
    svc = _enrolments(request)
    api_url = context(request).settings.public_url  # never the request's Host header
    job, items = svc.enrol(
        who, policy_id, vm_id=eb.vm_id, resource_group=eb.resource_group, tag=eb.tag, api_url=api_url
    )
    return JSONResponse(
        svc.describe(job, items),
        status_code=202,
        headers={"Location": f"/api/policies/{policy_id}/enrolment-jobs/{job.job_id}"},
    )


@router.get("/{policy_id}/enrolment-jobs/{job_id}")
def job(request: Request, policy_id: str, job_id: str, who: Identity = Depends(caller)) -> JSONResponse:
    svc = _enrolments(request)
    found, items = svc.job(who, policy_id, job_id)
    return JSONResponse(svc.describe(found, items))


@router.get("/{policy_id}/enrolments")
def list_(
    request: Request,
    policy_id: str,
    limit: int = Query(100),
    continuation: str | None = Query(None, max_length=512),
    who: Identity = Depends(caller),
) -> JSONResponse:
    recs, token = _enrolments(request).list(who, policy_id, limit=limit, continuation=continuation)
    return JSONResponse({"enrolments": [r.to_dict() for r in recs], "next": token})
