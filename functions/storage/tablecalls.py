"""The calls every Table Storage repository makes, and how their failures become errors: a
transport failure is StorageUnavailable (503); a lost If-Match race, a missing or existing row are
the caller's Conflict/PreconditionFailed, NotFound or Conflict; one entity-group transaction lands
whole or not at all."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

from azure.core import MatchConditions
from azure.core.exceptions import (
    AzureError,
    HttpResponseError,
    ResourceExistsError,
    ResourceModifiedError,
    ResourceNotFoundError,
)
from azure.data.tables import TableClient, TableTransactionError, UpdateMode

from ..core.errors import EzsshError, NotFound, StorageUnavailable

log = logging.getLogger("functions.storage.tables")
T = TypeVar("T")
UNAUTHENTICATED = "_unauthenticated"  # the partition of audit entries from callers whose token did not verify


def _serial_key(serial: int) -> str:
    return f"{serial:019d}"


def _guard(op: str, fn: Callable[[], T]) -> T:
    """Map transport failures to StorageUnavailable (503); let domain errors through."""
    try:
        return fn()
    except (ResourceNotFoundError, ResourceModifiedError, ResourceExistsError, TableTransactionError):
        raise
    except HttpResponseError as exc:
        if exc.status_code in (412, 409):
            raise
        if exc.status_code and exc.status_code < 500 and exc.status_code not in (403, 408, 429):
            raise
        log.warning("table storage %s failed: %s", op, exc)
        raise StorageUnavailable("Storage is unavailable; try again shortly.") from exc
    except AzureError as exc:
        log.warning("table storage %s failed: %s", op, exc)
        raise StorageUnavailable("Storage is unavailable; try again shortly.") from exc


def conditional_update(
    table: TableClient,
    op: str,
    entity: dict,
    etag: str,
    *,
    not_found: str,
    lost: EzsshError,
    mode: UpdateMode = UpdateMode.REPLACE,
) -> dict:
    """Write `entity` only if the row still has `etag` (If-Match). A missing row is NotFound; a
    changed one raises `lost` (the caller's 409 or 412), never a silent overwrite."""
    try:
        return _guard(
            op, lambda: table.update_entity(entity, mode=mode, etag=etag, match_condition=MatchConditions.IfNotModified)
        )
    except ResourceNotFoundError:
        raise NotFound(not_found) from None
    except (ResourceModifiedError, HttpResponseError):
        raise lost from None


def _if_match(etag: str, mode: UpdateMode = UpdateMode.REPLACE) -> dict:
    if not etag:
        raise ValueError("IfNotModified must be specified with etag.")  # as the SDK's own single writes do
    return {"mode": mode, "etag": etag, "match_condition": MatchConditions.IfNotModified}


def transact(table: TableClient, op: str, ops: list, *, not_found: str, lost: EzsshError, exists: EzsshError) -> list:
    """One entity-group transaction (all rows in one partition): every write lands, or none.

    A conditional row that changed meanwhile raises `lost` (409/412), a missing one NotFound, a row
    that already exists `exists`; a storage outage StorageUnavailable. If-Match holds inside the
    transaction on Table Storage and on Azurite alike (tests/contract/test_store.py)."""
    try:
        return _guard(op, lambda: table.submit_transaction(ops))
    except TableTransactionError as exc:
        status = exc.status_code
        if status == 404:
            raise NotFound(not_found) from None
        if status == 412:
            raise lost from None
        if status == 409 or "EntityAlreadyExists" in str(exc):
            raise exists from None
        if status and (status >= 500 or status in (408, 429)):
            log.warning("table storage %s failed: %s", op, exc)
            raise StorageUnavailable("Storage is unavailable; try again shortly.") from exc
        log.warning("table storage refused %s: %s", op, exc)
        raise StorageUnavailable("Storage refused the write; try again.") from exc


TENANT_VERSION = "ver|*"  # "*" is never part of a policy id (core.policy.POLICY_ID_RE)


def version_entity(tenant_id: str, row_key: str, at: float) -> tuple:
    """An upsert of a version row (tables.py: ver|<policy> and ver|*), for the transaction of the
    change it versions. Every write gives the row a new ETag (TrustVersion.tag), so no read is
    needed first and concurrent changes never conflict over it."""
    return (
        "upsert",
        {"PartitionKey": tenant_id, "RowKey": row_key, "Kind": "version", "At": int(at)},
        {"mode": UpdateMode.REPLACE},
    )
