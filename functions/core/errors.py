"""Typed errors. Each carries an HTTP status and a stable machine-readable code.

The API maps these to responses in exactly one place (functions/api/errors.py). Anything that is
not an EzsshError is a system error: logged with a request id and answered with a generic 500.
"""

from __future__ import annotations


class EzsshError(Exception):
    """Base of every error the service raises on purpose."""

    status: int = 400
    code: str = "bad_request"

    def __init__(self, message: str, **details: object) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


# ---- client errors (4xx) ------------------------------------------------------------------


class InvalidRequest(EzsshError):
    status, code = 400, "invalid_request"


class IdempotencyKeyAhead(InvalidRequest):
    """A UUIDv7 idempotency key whose time is ahead of the service's clock: nothing was written; the
    client may ask again with a key of another kind."""

    code = "idempotency_key_ahead"


class InvalidPublicKey(EzsshError):
    status, code = 400, "invalid_public_key"


class WeakPublicKey(EzsshError):
    status, code = 400, "weak_public_key"


class TtlTooLong(EzsshError):
    status, code = 400, "ttl_too_long"


class Unauthenticated(EzsshError):
    status, code = 401, "unauthenticated"


class Forbidden(EzsshError):
    status, code = 403, "forbidden"


class Denied(EzsshError):
    """The policy says no: no rule lets this user in, or a rule denies them."""

    status, code = 403, "denied"


class PrincipalNotAllowed(Denied):
    code = "principal_not_allowed"


class NoPolicyForHost(Denied):
    code = "no_policy_for_host"


class PolicyNeedsUpdate(Denied):
    """A stored policy names people by UPN (from before names were refused): it grants nothing until
    an admin replaces them with object ids."""

    code = "policy_needs_update"


class TooManyRequests(EzsshError):
    status, code = 429, "too_many_requests"


class TooManyPending(TooManyRequests):
    code = "too_many_pending"


class NotFound(EzsshError):
    status, code = 404, "not_found"


class Conflict(EzsshError):
    """A lost race: the thing changed since it was read (ETag mismatch) or already exists."""

    status, code = 409, "conflict"


class PreconditionFailed(EzsshError):
    status, code = 412, "precondition_failed"


class PreconditionRequired(EzsshError):
    status, code = 428, "precondition_required"


# ---- system errors (5xx) that are still expected ------------------------------------------


class BackendUnavailable(EzsshError):
    """A dependency (storage, HSM, Key Vault, identity provider) cannot be reached."""

    status, code = 503, "backend_unavailable"


class SignerUnavailable(BackendUnavailable):
    code = "signer_unavailable"


class StorageUnavailable(BackendUnavailable):
    code = "storage_unavailable"


class NotConfigured(EzsshError):
    """A feature needs a setting this deployment does not have."""

    status, code = 503, "not_configured"


class CaKeyNotFound(EzsshError):
    """The CA key a policy names does not exist (or is disabled) in its key store."""

    status, code = 503, "ca_key_unavailable"


class IntegrityError(EzsshError):
    """A final check on a signed certificate failed. Never shown to users as anything but a 500."""

    status, code = 500, "internal_error"
