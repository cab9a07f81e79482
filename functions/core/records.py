"""What the service keeps about certificates, hosts and a user's attempts, as plain values.

The request record and its state machine are in core/requests.py; audit entries in core/audit.py;
policies in core/policy.py. Storage (functions/storage/base.py: the Store protocol) reads and writes
these; nothing here does I/O.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CertificateRecord:
    tenant_id: str
    policy_id: str
    serial: int
    key_id: str
    request_id: str
    requester_oid: str
    requester_upn: str
    principals: tuple[str, ...]
    host: str
    valid_after: int
    valid_before: int
    ca_fingerprint: str
    public_key_fingerprint: str
    certificate: str
    revoked_at: int | None = None
    revoked_by: str | None = None
    revoked_by_oid: str | None = None  # who revoked it (object id in the tenant; None: the service itself)
    etag: str | None = None


@dataclass(frozen=True)
class IdempotencyRecord:
    """A client's idempotency key for one attempt (stored hashed), and the request it made."""

    tenant_id: str
    owner_oid: str  # whose key: keys are per user, so one user's key never finds another's request
    key_hash: str  # hex SHA-256 of the key the client sent
    request_id: str
    digest: str  # hex SHA-256 of what was asked (host, login, policy, TTL, key fingerprint)
    created_at: int
    # True: the key is carried by the request row itself, whose id the key names (a UUIDv7 key,
    # core.serials.keyed_request_id): the request is one insert. False: a row of its own, written
    # in one transaction with the request.
    on_request_row: bool = False


@dataclass(frozen=True)
class PendingSlots:
    """The requests one user has waiting under one policy (the pending cap's row). Written with the
    request that takes a slot, in the same transaction, only if the row is still at `etag` (None:
    no row yet), so concurrent requests cannot both take the last slot. Decisions do not write it:
    a slot whose request is no longer pending is freed by the next request that reads the row."""

    tenant_id: str
    policy_id: str
    owner_oid: str
    requests: tuple[tuple[str, int], ...] = ()  # (request id, expires_at), oldest first
    etag: str | None = None


@dataclass(frozen=True)
class HostEnrolmentToken:
    """A one-time, short-lived token an admin mints for named hosts. Only its SHA-256 is stored."""

    tenant_id: str
    policy_id: str
    token_hash: str  # sha256 hex of the token
    hosts: tuple[str, ...]
    created_at: int
    expires_at: int
    created_by_oid: str
    created_by_upn: str
    used_at: int | None = None
    used_by: str | None = None  # the host key fingerprints it was used for
    etag: str | None = None


@dataclass(frozen=True)
class HostNamespaces:
    """The DNS suffixes, host names and IP ranges a tenant's hosts live in (core.namespaces), as its
    tenant admins last set them. One row per tenant; without one, the deployment setting applies."""

    tenant_id: str
    namespaces: tuple[str, ...]
    updated_at: int
    updated_by_oid: str
    updated_by_upn: str
    etag: str | None = None


@dataclass(frozen=True)
class HostChallenge:
    """A server-issued nonce a host signs with its current host key(s) to renew. Single use."""

    tenant_id: str
    policy_id: str
    id: str
    nonce: str
    fingerprints: tuple[str, ...]
    created_at: int
    expires_at: int
    used_at: int | None = None
    etag: str | None = None

    @property
    def message(self) -> bytes:
        """What the host signs (ssh-keygen -Y sign -n ezssh-host-renew)."""
        return (
            f"ezssh host renewal\ntenant {self.tenant_id}\npolicy {self.policy_id}\nchallenge {self.id}\n"
            f"nonce {self.nonce}\n".encode()
        )


@dataclass(frozen=True)
class HostKeyRecord:
    """The latest host certificate of one host key under one policy (what renewal looks up)."""

    tenant_id: str
    policy_id: str
    fingerprint: str
    public_key: str
    principals: tuple[str, ...]
    serial: int
    valid_after: int
    valid_before: int
    proof: str  # token:<hash prefix> | arm:<vm id> | renewal:<serial>
    subject: str  # the VM resource id, or the token's first host name
    updated_at: int
    etag: str | None = None


@dataclass(frozen=True)
class Revoked:
    """One revoked certificate as the KRLs need it (an index row written with the revocation)."""

    policy_id: str
    serial: int
    ca_fingerprint: str
    valid_before: int
    revoked_at: int
    host: bool  # a host certificate (else a user certificate)


@dataclass(frozen=True)
class TrustVersion:
    """What a derived answer (a policy's KRL, a tenant's known-hosts) was built from, in one point read.

    `tag` changes with every write of what it versions (it is the version row's own ETag; "" while
    nothing was ever written); `at` is the time (epoch seconds) of the latest such write, the KRL's
    krl_version."""

    tag: str
    at: int = 0
