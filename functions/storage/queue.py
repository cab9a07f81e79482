"""The enrolment job queue: Azure Storage Queues (azure-storage-queue); Azurite's queue service locally.

Messages are JSON, base64-encoded as the Functions host's queue trigger expects by default
(host.json `extensions.queues.messageEncoding`). The host moves a message that failed
`maxDequeueCount` times to `<queue>-poison`; both queues are created here (and by the Bicep).

Every call is bounded like a table call (CLIENT_OPTIONS): few retries with a short backoff, short
timeouts, and within an API request its deadline (functions/deadline.py), so an unreachable queue
costs a caller seconds, not the SDK's default minute and a half of retries. A message the queue did
not take stays in the job's outbox (storage/enrolmentjobs.py) for the timer to send.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

from azure.core.exceptions import AzureError, ResourceExistsError

from ..core.errors import BackendUnavailable
from ..deadline import deadline_hook

if TYPE_CHECKING:
    from azure.storage.queue import LinearRetry, QueueClient

log = logging.getLogger("ezssh.queue")

ENROL_QUEUE = "ezssh-enrol"
POISON_SUFFIX = "-poison"
MAX_VISIBILITY = 7 * 24 * 3600  # Azure Storage's limit for a message's initial invisibility
CLIENT_OPTIONS: dict[str, Any] = dict(connection_timeout=5, read_timeout=10, raw_request_hook=deadline_hook)


def _retry() -> LinearRetry:
    """Two retries, half a second apart (the storage SDK's default waits 15 s, then 18 s, ...); one
    policy object per client, as a pipeline links its policies."""
    from azure.storage.queue import LinearRetry

    return LinearRetry(backoff=0.5, retry_total=2, random_jitter_range=0.25)  # type: ignore[arg-type]  # SDK says int; sleeps floats


class JobQueue:
    def __init__(self, client: Any, poison: Any) -> None:
        self._client = client
        self._poison = poison
        self.name = client.queue_name

    @classmethod
    def from_connection_string(cls, conn: str, name: str = ENROL_QUEUE) -> JobQueue:
        from azure.storage.queue import QueueClient, TextBase64DecodePolicy, TextBase64EncodePolicy

        def make(n: str) -> QueueClient:
            return QueueClient.from_connection_string(
                conn,
                n,
                message_encode_policy=TextBase64EncodePolicy(),
                message_decode_policy=TextBase64DecodePolicy(),
                retry_policy=_retry(),
                **CLIENT_OPTIONS,
            )

        return cls(make(name), make(name + POISON_SUFFIX))

    @classmethod
    def from_account_url(cls, url: str, credential: Any, name: str = ENROL_QUEUE) -> JobQueue:
        from azure.storage.queue import QueueClient, TextBase64DecodePolicy, TextBase64EncodePolicy

        def make(n: str) -> QueueClient:
            return QueueClient(
                url,
                n,
                credential=credential,
                message_encode_policy=TextBase64EncodePolicy(),
                message_decode_policy=TextBase64DecodePolicy(),
                retry_policy=_retry(),
                **CLIENT_OPTIONS,
            )

        return cls(make(name), make(name + POISON_SUFFIX))

    def ensure(self) -> None:
        for q in (self._client, self._poison):
            try:
                q.create_queue()
            except ResourceExistsError:
                pass
            except AzureError as exc:
                log.warning("could not create queue %s: %s", q.queue_name, exc)

    def send(self, message: dict, *, delay: int = 0) -> None:
        """Queue one job message, invisible for `delay` seconds. BackendUnavailable if the queue can't be reached."""
        text = json.dumps(message, separators=(",", ":"), sort_keys=True)
        try:
            self._client.send_message(text, visibility_timeout=max(0, min(int(delay), MAX_VISIBILITY)) or None)
        except AzureError as exc:
            log.warning("queue %s: send failed: %s", self.name, exc)
            raise BackendUnavailable("The enrolment job queue could not be reached; nothing was queued.") from None

    def health(self) -> None:
        self._client.get_queue_properties()
