"""The local stack's ports: set by EZSSH_DEV_PORTS / --ports, and a taken port names who holds it."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from devstack.proc import StandInError, free_port, require_free
from devstack.stack import Ports


def test_ports_spec():
    assert Ports.parse(None) == Ports()
    p = Ports.parse("api=17071, sshd=12222")
    assert (p.api, p.sshd, p.oidc, p.azurite) == (17071, 12222, 8443, 10002)
    for bad in ("api", "web=1", "api=x", "api=70000"):
        with pytest.raises(StandInError):
            Ports.parse(bad)


def test_a_busy_port_names_the_process_holding_it():
    port = free_port()
    holder = subprocess.Popen([sys.executable, "-c", "import socket,time; s=socket.socket(); "
                               f"s.bind(('127.0.0.1',{port})); s.listen(); print('up', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "up"
        with pytest.raises(StandInError) as ei:
            require_free(port, "api")
        assert f"127.0.0.1:{port} is already in use by pid {holder.pid} (" in str(ei.value)
        assert "EZSSH_DEV_PORTS=" in str(ei.value)
    finally:
        holder.kill()
        holder.wait()
    deadline = time.time() + 5
    while time.time() < deadline:
        try:
            require_free(port, "api")
            break
        except StandInError:
            time.sleep(0.1)
    else:
        pytest.fail("the port stayed busy")


def test_a_stand_in_that_never_listens_shows_its_output_and_what_to_try(tmp_path, monkeypatch):
    from devstack.proc import spawn, startup_timeout, wait_for_port

    monkeypatch.setenv("EZSSH_DEV_STARTUP_TIMEOUT", "1.5")
    assert startup_timeout() == 1.5
    proc = spawn("slowpoke", [sys.executable, "-c", "print('warming up the caches', flush=True); "
                              "import time; time.sleep(60)"], tmp_path / "slowpoke.log")
    try:
        with pytest.raises(StandInError) as info:
            wait_for_port(proc, free_port())
    finally:
        proc.stop()
    msg = str(info.value)
    assert "slowpoke did not listen" in msg and "within 2s" in msg
    assert "warming up the caches" in msg and str(tmp_path / "slowpoke.log") in msg
    assert "EZSSH_DEV_STARTUP_TIMEOUT" in msg
    monkeypatch.setenv("EZSSH_DEV_STARTUP_TIMEOUT", "soon")
    with pytest.raises(StandInError, match="not a number"):
        startup_timeout()
    monkeypatch.delenv("EZSSH_DEV_STARTUP_TIMEOUT")
    assert startup_timeout() >= 120  # sized for a loaded 2-core machine


def test_the_port_hint_names_every_port_of_the_stack():
    port = free_port()
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
        s.listen()
        with pytest.raises(StandInError) as info:
            require_free(port, "api")
    hinted = {kv.split("=")[0] for kv in str(info.value).split("EZSSH_DEV_PORTS=")[1].split()[0].split(",")}
    assert hinted == set(Ports.__dataclass_fields__), hinted
