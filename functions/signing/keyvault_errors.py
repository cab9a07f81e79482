"""Whatever the Azure SDK raised while talking to Key Vault, as one clear EzsshError: which vault,
which key, what went wrong, and for a 403 the role or permission that is missing. A customer's own
key (bring your own key, an admin action) gets client errors (4xx) naming what to fix; the service's
own keys get SignerUnavailable/CaKeyNotFound (503)."""

from __future__ import annotations

import logging

from azure.core.exceptions import (
    AzureError,
    ClientAuthenticationError,
    HttpResponseError,
    ResourceNotFoundError,
    ServiceRequestError,
    ServiceResponseError,
)

from functions.core.errors import CaKeyNotFound, EzsshError, Forbidden, InvalidRequest, SignerUnavailable

log = logging.getLogger("functions.signing.keyvault")

# what each operation needs: (RBAC role, access-policy permission)
_PERMISSION = {
    "get": ("Key Vault Reader", "keys/get"),
    "list": ("Key Vault Reader", "keys/list"),
    "sign": ("Key Vault Crypto User", "keys/sign"),
    "create": ("Key Vault Crypto Officer", "keys/create"),
    "update": ("Key Vault Crypto Officer", "keys/update"),
}


def _error_parts(e: HttpResponseError) -> tuple[str, str, str]:
    """(code, inner code, message) of a Key Vault error body, as far as it has them."""
    err = getattr(e, "error", None)
    code = getattr(err, "code", None) or ""
    message = getattr(err, "message", None) or ""
    inner = getattr(err, "innererror", None) or {}
    inner_code = inner.get("code", "") if isinstance(inner, dict) else ""
    return str(code), str(inner_code), str(message)


def _one_line(text: str, limit: int = 160) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _is_disabled(code: str, inner: str, message: str) -> bool:
    return inner in ("KeyDisabled", "Disabled") or "disabled key" in message.lower() or "is disabled" in message.lower()


def _missing_permission(op: str, vault: str) -> str:
    role, perm = _PERMISSION[op]
    return (
        f"the service's identity lacks '{role}' ({op}) on {vault}: grant it the role '{role}' "
        f"or the access-policy key permission {perm}"
    )


def _translate(e: BaseException, *, op: str, vault: str, name: str, key_ref: str, byok: bool) -> EzsshError:
    """One clear EzsshError for anything the SDK raised while doing `op`."""
    what = f"key {name!r} in {vault}" if name else vault
    if isinstance(e, EzsshError):
        return e
    if isinstance(e, HttpResponseError) and e.status_code is not None:
        status = e.status_code
        code, inner, message = _error_parts(e)
        detail = "/".join(x for x in (code, inner) if x) or (e.reason or "")
        if status == 404 or isinstance(e, ResourceNotFoundError):
            if byok:
                return InvalidRequest(f"there is no {what} (HTTP 404 {detail})", key_ref=key_ref)
            return CaKeyNotFound(f"the CA {what} does not exist (HTTP 404 {detail})", key_ref=key_ref)
        if status == 403 and _is_disabled(code, inner, message):
            if byok:
                return InvalidRequest(f"the {what} is disabled; enable it first", key_ref=key_ref)
            return CaKeyNotFound(f"the CA {what} is disabled", key_ref=key_ref)
        if status == 403 and (inner == "ForbiddenByFirewall" or "client address is not authorized" in message.lower()):
            text = f"the firewall of {vault} refuses the service's address (HTTP 403 {detail})"
            return Forbidden(text, key_ref=key_ref) if byok else SignerUnavailable(text, key_ref=key_ref)
        if status == 403:
            text = f"{_missing_permission(op, vault)} (HTTP 403 {detail} on {op} of key {name!r})"
            return Forbidden(text, key_ref=key_ref) if byok else SignerUnavailable(text, key_ref=key_ref)
        if status == 401:
            text = (
                f"{vault} rejected the service's access token for {op} (HTTP 401 {detail}: "
                f"{_one_line(message)}); check the identity and its tenant"
            )
            return Forbidden(text, key_ref=key_ref) if byok else SignerUnavailable(text, key_ref=key_ref)
        if status == 429:
            # both of azure-core's response types carry headers; the type the error declares does not
            after = (getattr(e.response, "headers", None) or {}).get("Retry-After")
            text = f"{vault} is throttling requests (HTTP 429 {detail})" + (f"; retry after {after} s" if after else "")
            return SignerUnavailable(text, key_ref=key_ref, retry_after=after)
        if 400 <= status < 500:
            text = f"{vault} refused to {op} {what} (HTTP {status} {detail}: {_one_line(message)})"
            return InvalidRequest(text, key_ref=key_ref) if byok else SignerUnavailable(text, key_ref=key_ref)
        return SignerUnavailable(f"{vault} failed to {op} (HTTP {status} {detail})", key_ref=key_ref)
    if isinstance(e, ClientAuthenticationError):  # no HTTP response: the credential itself failed
        return SignerUnavailable(
            f"could not get an access token for {vault}: {_one_line(getattr(e, 'message', str(e)))}", key_ref=key_ref
        )
    if isinstance(e, (ServiceRequestError, ServiceResponseError)):
        return SignerUnavailable(f"cannot reach {vault} to {op}: {_one_line(str(e), 120)}", key_ref=key_ref)
    if isinstance(e, AzureError):
        return SignerUnavailable(f"{vault} failed to {op}: {_one_line(str(e), 120)}", key_ref=key_ref)
    log.warning("Key Vault %s: unexpected error during %s", vault, op, exc_info=e)
    return SignerUnavailable(f"{vault} failed to {op}: {type(e).__name__}: {_one_line(str(e), 120)}", key_ref=key_ref)
