"""What the Functions host's queue trigger does, against Azurite's real queue service.

Core Tools cannot run here, so this stands in for the host's queue listener (the
Microsoft.Azure.WebJobs Storage Queues extension), with the knobs host.json gives it:
- receive up to `batchSize` messages, each made invisible while its function runs;
- decode each (base64 text, `messageEncoding`) into an azure.functions.QueueMessage with the trigger
  metadata the Python worker gets (Id, DequeueCount, PopReceipt, times), and call the user function
  that function_app.py registered for that queue;
- success: delete the message; an exception: make it visible again after `visibilityTimeout`;
- a message whose dequeue count reached `maxDequeueCount` goes to `<queue>-poison`.
The queue name comes from the function's own trigger binding, so the test runs the real wiring.
"""

from __future__ import annotations

import json
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from tests.functions_host import triggers, user_functions

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger("tests.queue_host")


def timespan(text: str) -> float:
    """host.json's "hh:mm:ss" -> seconds."""
    h, m, s = text.split(":")
    return int(h) * 3600 + int(m) * 60 + float(s)


def host_queue_settings() -> dict:
    doc = json.loads((REPO / "host.json").read_text())
    q = doc.get("extensions", {}).get("queues", {})
    return {"max_dequeue_count": int(q.get("maxDequeueCount", 5)),
            "retry_after": timespan(q.get("visibilityTimeout", "00:00:00")),
            "batch_size": int(q.get("batchSize", 16)),
            "encoding": q.get("messageEncoding", "base64"),
            "function_timeout": timespan(doc.get("functionTimeout", "00:05:00"))}


class QueueHost:
    def __init__(self, connection_string: str, function_name: str, *, invisible_for: float = 600,
                 retry_after: float | None = None) -> None:
        from azure.storage.queue import QueueClient, TextBase64DecodePolicy, TextBase64EncodePolicy

        cfg = host_queue_settings()
        assert cfg["encoding"] == "base64", "this stand-in decodes base64 as host.json says"
        trigger = triggers()[function_name]
        assert trigger["type"] == "queueTrigger", trigger
        self.queue_name = trigger["queueName"]
        self.function: Callable = user_functions()[function_name]
        self.max_dequeue_count = cfg["max_dequeue_count"]
        self.retry_after = cfg["retry_after"] if retry_after is None else retry_after
        self.batch_size = cfg["batch_size"]
        self.invisible_for = invisible_for  # the host keeps a running message invisible (and renews it)
        kw = {"message_encode_policy": TextBase64EncodePolicy(), "message_decode_policy": TextBase64DecodePolicy()}
        self.client = QueueClient.from_connection_string(connection_string, self.queue_name, **kw)
        self.poison = QueueClient.from_connection_string(connection_string, self.queue_name + "-poison", **kw)
        self.handled = 0
        self.failures = 0
        self._gate = threading.Lock()  # held by poll_once; paused() holds it to stop the listener
        self._pool = ThreadPoolExecutor(max_workers=self.batch_size, thread_name_prefix="queue-host")

    def _invoke(self, m) -> None:  # type: ignore[no-untyped-def]
        from azure.functions import meta
        from azure.functions.queue import QueueMessageInConverter

        if m.dequeue_count > self.max_dequeue_count:
            self._to_poison(m)
            return

        def iso(dt):  # type: ignore[no-untyped-def]
            return meta.Datum(dt.isoformat() if dt else None, "string")

        msg = QueueMessageInConverter.decode(meta.Datum(m.content, "string"), trigger_metadata={
            "Id": meta.Datum(m.id, "string"), "DequeueCount": meta.Datum(m.dequeue_count, "int"),
            "PopReceipt": meta.Datum(m.pop_receipt, "string"), "InsertionTime": iso(m.inserted_on),
            "ExpirationTime": iso(m.expires_on), "NextVisibleTime": iso(m.next_visible_on)})
        try:
            self.function(msg)
        except Exception as exc:  # noqa: BLE001 - the host logs, and retries or poisons
            self.failures += 1
            log.warning("%s: message %s failed (delivery %d): %s", self.queue_name, m.id, m.dequeue_count, exc)
            if m.dequeue_count >= self.max_dequeue_count:
                self._to_poison(m)
            else:
                self.client.update_message(m, visibility_timeout=int(self.retry_after))
            return
        self.client.delete_message(m)
        self.handled += 1

    def _to_poison(self, m) -> None:  # type: ignore[no-untyped-def]
        try:
            self.poison.create_queue()
        except Exception:  # noqa: BLE001 - exists
            pass
        self.poison.send_message(m.content)
        self.client.delete_message(m)

    def poll_once(self) -> int:
        """One batch: receive, run them concurrently (as the host does up to batchSize), settle each."""
        with self._gate:
            msgs = list(self.client.receive_messages(messages_per_page=self.batch_size, max_messages=self.batch_size,
                                                     visibility_timeout=int(self.invisible_for)))
            list(self._pool.map(self._invoke, msgs))
            return len(msgs)

    @contextmanager
    def paused(self) -> Iterator[None]:
        """The listener takes no message (and none is running) inside this block."""
        with self._gate:
            yield

    def run_until(self, done: Callable[[], bool], timeout: float = 60, idle: float = 0.1) -> None:
        import time

        deadline = time.monotonic() + timeout
        while not done():
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.queue_name}: not done within {timeout} s")
            if not self.poll_once():
                time.sleep(idle)

    def serve(self, stop: threading.Event, idle: float = 0.1) -> None:
        while not stop.is_set():
            try:
                if not self.poll_once():
                    stop.wait(idle)
            except Exception as exc:  # noqa: BLE001 - keep serving, like the host
                log.warning("queue host: %s", exc)
                stop.wait(idle)

    def pending(self) -> int:
        """Messages in the queue, visible or not (a received message counts until it is deleted)."""
        return int(self.client.get_queue_properties().approximate_message_count or 0)

    def drain(self, timeout: float = 60) -> None:
        """Wait until every message queued so far has been handled (the queue is empty)."""
        import time

        deadline = time.monotonic() + timeout
        while self.pending():
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.queue_name}: {self.pending()} message(s) left after {timeout} s")
            time.sleep(0.05)
