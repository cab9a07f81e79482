"""Azurite's table and queue services: the local Table Storage and Storage Queues.

Two processes (`azurite-table`, `azurite-queue`) sharing one data directory, each on its own port;
the connection string names both endpoints.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass
from pathlib import Path

from .proc import NODE_BIN, Proc, StandInError, free_port, require_free, spawn, wait_for_port

# Azurite's well-known development account (public, documented; not a secret).
ACCOUNT = "devstoreaccount1"
ACCOUNT_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


@dataclass
class Azurite:
    proc: Proc
    port: int
    queue_proc: Proc | None = None
    queue_port: int | None = None

    @property
    def connection_string(self) -> str:
        return connection_string(self.port, self.queue_port)

    @property
    def procs(self) -> list[Proc]:
        return [p for p in (self.proc, self.queue_proc) if p is not None]

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.stop()


def connection_string(port: int, queue_port: int | None = None) -> str:
    queue = f"QueueEndpoint=http://127.0.0.1:{queue_port}/{ACCOUNT};" if queue_port else ""
    return (
        f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={ACCOUNT_KEY};"
        f"TableEndpoint=http://127.0.0.1:{port}/{ACCOUNT};{queue}"
    )


def _start(service: str, state_dir: Path, port: int, timeout: float | None) -> Proc:
    exe = NODE_BIN / f"azurite-{service}"
    if not exe.exists():
        raise StandInError(f"Azurite is not installed ({exe} is missing): run `npm ci` in the repository.")
    require_free(port, f"azurite-{service}")
    data = state_dir / "azurite"
    data.mkdir(parents=True, exist_ok=True)
    proc = spawn(
        "azurite" if service == "table" else f"azurite-{service}",
        [str(exe), f"--{service}Host", "127.0.0.1", f"--{service}Port", str(port), "--location", str(data),
         "--disableTelemetry", "--skipApiVersionCheck", "--silent"],
        state_dir / "logs" / ("azurite.log" if service == "table" else f"azurite-{service}.log"),
        stop_signal=signal.SIGINT,  # SIGTERM loses recent writes
    )
    wait_for_port(proc, port, timeout)
    return proc


def start_azurite(state_dir: Path, port: int, *, queue_port: int | None = None, with_queue: bool = True,
                  timeout: float | None = None) -> Azurite:
    """Table service on `port`; with_queue: the queue service too, on queue_port or a free port."""
    table = _start("table", state_dir, port, timeout)
    if not with_queue:
        return Azurite(table, port)
    try:
        qport = queue_port or free_port()
        queue = _start("queue", state_dir, qport, timeout)
    except BaseException:
        table.stop()
        raise
    return Azurite(table, port, queue, qport)
