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
