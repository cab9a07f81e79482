"""What Table Storage answers one client, counted on the wire by the Azure SDK's own response hook
(`raw_response_hook`): round trips, rows read, and point reads of rows by key prefix. For tests
that pin what a call costs in rows read, independent of timing."""

from __future__ import annotations

import json
import threading
import urllib.parse
from dataclasses import dataclass, field


@dataclass
class ReadCounter:
    reads: list[tuple[str, int]] = field(default_factory=list)  # (decoded URL, rows) per GET
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def hook(self, pipeline_response) -> None:  # type: ignore[no-untyped-def]
        request, response = pipeline_response.http_request, pipeline_response.http_response
        if request.method != "GET":
            return
        rows = 0
        if response.status_code == 200:
            try:
                body = json.loads(response.text())
                rows = len(body["value"]) if isinstance(body, dict) and "value" in body else 1
            except ValueError:
                rows = 0
        with self._lock:
            self.reads.append((urllib.parse.unquote(request.url), rows))

    def reset(self) -> None:
        with self._lock:
            self.reads.clear()

    @property
    def round_trips(self) -> int:
        return len(self.reads)

    @property
    def rows(self) -> int:
        return sum(n for _, n in self.reads)

    def point_reads(self, prefix: str) -> int:
        """GETs of one row whose RowKey starts with `prefix`."""
        return sum(1 for url, _ in self.reads if f"RowKey='{prefix}" in url)


def counting_store(connection_string: str, table: str):  # type: ignore[no-untyped-def]
    """A TableStore on `table` whose reads are counted, and its counter."""
    from azure.data.tables import TableServiceClient

    from functions.storage.tables import TableStore

    counter = ReadCounter()
    store = TableStore(
        TableServiceClient.from_connection_string(connection_string, raw_response_hook=counter.hook), table
    )
    store.ensure_table()
    return store, counter
