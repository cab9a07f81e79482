"""Azurite's table service: the local Table Storage."""

from __future__ import annotations

import signal
from dataclasses import dataclass
from pathlib import Path

from .proc import NODE_BIN, Proc, StandInError, require_free, spawn, wait_for_port

# Azurite's well-known development account (public, documented; not a secret).
ACCOUNT = "devstoreaccount1"
ACCOUNT_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


@dataclass
class Azurite:
    proc: Proc
    port: int

    @property
    def connection_string(self) -> str:
        return connection_string(self.port)

    def stop(self) -> None:
        self.proc.stop()


def connection_string(port: int) -> str:
    return (
        f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={ACCOUNT_KEY};"
        f"TableEndpoint=http://127.0.0.1:{port}/{ACCOUNT};"
    )


def start_azurite(state_dir: Path, port: int, *, timeout: float = 30.0) -> Azurite:
    exe = NODE_BIN / "azurite-table"
    if not exe.exists():
        raise StandInError(f"Azurite is not installed ({exe} is missing): run `npm ci` in the repository.")
    require_free(port, "azurite")
    data = state_dir / "azurite"
    data.mkdir(parents=True, exist_ok=True)
    proc = spawn(
        "azurite",
        [str(exe), "--tableHost", "127.0.0.1", "--tablePort", str(port), "--location", str(data),
         "--disableTelemetry", "--skipApiVersionCheck", "--silent"],
        state_dir / "logs" / "azurite.log",
        stop_signal=signal.SIGINT,  # SIGTERM loses recent writes
    )
    wait_for_port(proc, port, timeout)
    return Azurite(proc, port)
