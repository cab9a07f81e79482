"""Host certificates.

    POST /api/policies/{id}/host-tokens          {hosts: [...], ttl_seconds?}   policy admins
      -> 201 {token, hosts, expires_at, tenant, policy}   (the token is shown once; only its hash is kept)
    POST /api/host-certificates                  hosts, no Entra token:
      {tenant, policy, token, challenge_id, host_keys: [{public_key, signature}, ...]}      first enrolment
      {tenant, policy, challenge_id, host_keys: [{public_key, signature}, ...]}             renewal
      (signature: `ssh-keygen -Y sign -n ezssh-host-enrol` at enrolment, `-n ezssh-host-renew` at
      renewal, over the challenge text)
      -> 200 {policy, principals, renew_after, certificates: [...]}, or with `Accept: text/plain`
         "# renew-after <epoch>" and one certificate line per host key (what the setup script reads)
    POST /api/host-certificates/challenge        {tenant, policy, host_keys: [...], token?}
      -> 200 {challenge_id, challenge, expires_at}; text/plain: the challenge text to sign. With a
         token: for the first enrolment of those keys; without: for their renewal
    GET  /api/known-hosts                        signed-in users
      -> 200 {known_hosts, krl (base64), policies}: `@cert-authority` lines of the host CAs of the
         policies the caller may use, and the revoked host certificates of those CAs; with an ETag,
         and 304 when If-None-Match names it (nothing changed for this caller)

Bad input from hosts is refused with a 4xx, counted and logged (hosts have no identity; nothing is
stored for it); host calls are rate-limited per key set, token or challenge.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import Field, ValidationError, model_validator

from ..core.errors import InvalidRequest
from ..core.policy import Identity
from ..service.hosttokens import HOST_CERTIFICATE_REFUSED, HOST_TOKEN_REFUSED
from .deps import Strict, body, caller, service
from .errors import describe
from .hosts import derived_response, etags

router = APIRouter(prefix="/api", tags=["host certificates"])


class TokenBody(Strict):
    hosts: list[str] = Field(..., max_length=32)
    ttl_seconds: int | None = None


class SignedKey(Strict):
    public_key: str = Field(..., max_length=16384)
    signature: str = Field(..., max_length=8192)


class HostCertBody(Strict):
    tenant: str = Field(..., max_length=64)
    policy: str = Field(..., max_length=64)
    token: str | None = Field(None, max_length=200)
    challenge_id: str | None = Field(None, max_length=64)
    host_keys: list[Any] = Field(..., max_length=8)

    @model_validator(mode="after")
    def _signed(self) -> HostCertBody:
        """Each host key with its signature of the challenge; refused like a bad body otherwise."""
        if self.challenge_id is None:
            raise InvalidRequest(
                "Send 'challenge_id' and each host key with its signature of the challenge "
                "(POST /api/host-certificates/challenge; with 'token' for a first enrolment)."
            )
        try:
            signed = [SignedKey.model_validate(k) for k in self.host_keys]
        except ValidationError as exc:
            raise InvalidRequest("Each host key is {public_key, signature}: " + describe(exc.errors())) from None
        return self.model_copy(update={"host_keys": signed})

    def pairs(self) -> list[tuple[str, str]]:
        return [(k.public_key, k.signature) for k in self.host_keys]


class ChallengeBody(Strict):
    tenant: str = Field(..., max_length=64)
    policy: str = Field(..., max_length=64)
    host_keys: list[str] = Field(..., max_length=8)
    token: str | None = Field(None, max_length=200)


def _wants_text(request: Request) -> bool:
    return "text/plain" in request.headers.get("accept", "")


@router.post("/policies/{policy_id}/host-tokens")
def mint_token(
    request: Request,
    policy_id: str,
    who: Identity = Depends(caller),
    tb: TokenBody = body(TokenBody, HOST_TOKEN_REFUSED),
) -> JSONResponse:
    token, rec = service(request).hostcerts.mint_token(who, policy_id, tb.hosts, tb.ttl_seconds)
    return JSONResponse(
        {
            "token": token,
            "hosts": list(rec.hosts),
            "expires_at": rec.expires_at,
            "tenant": rec.tenant_id,
            "policy": rec.policy_id,
        },
        status_code=201,
    )


@router.post("/host-certificates")
def host_certificates(
    request: Request, hb: HostCertBody = body(HostCertBody, HOST_CERTIFICATE_REFUSED, host=True)
) -> Response:
    svc = service(request).hostcerts
    challenge_id = hb.challenge_id or ""  # never empty: the body's check says so
    if hb.token is not None:
        issued = svc.issue_with_token(hb.tenant, hb.policy, hb.token, challenge_id, hb.pairs())
    else:
        issued = svc.renew(hb.tenant, hb.policy, challenge_id, hb.pairs())
    if _wants_text(request):
        return PlainTextResponse(issued.to_text())
    return JSONResponse(issued.to_dict())


@router.post("/host-certificates/challenge")
def challenge(
    request: Request, cb: ChallengeBody = body(ChallengeBody, HOST_CERTIFICATE_REFUSED, host=True)
) -> Response:
    ch = service(request).hostcerts.challenge(cb.tenant, cb.policy, cb.host_keys, cb.token)
    if _wants_text(request):
        return PlainTextResponse(ch.message.decode())
    return JSONResponse({"challenge_id": ch.id, "challenge": ch.message.decode(), "expires_at": ch.expires_at})


@router.get("/known-hosts")
def known_hosts(request: Request, who: Identity = Depends(caller)) -> Response:
    answer = service(request).known_hosts.client_trust(who, etags(request))
    return derived_response(request, answer, "application/json", {})
