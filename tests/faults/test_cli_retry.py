"""The CLI's side of idempotent issuance: one Idempotency-Key per attempt, sent again when the
service answers 503, so a lost answer never becomes a second request or certificate."""

from __future__ import annotations

import uuid

import pytest

from devstack.demo import cli_env, run_cli
from devstack.proc import StandInError, free_port
from devstack.stack import start_api
from functions.core.audit import verify_chain
from functions.storage.tables import TableStore
from tests.realparts import unavailable
from tests.standins.faultproxy import FAIL, LOSE, PASS, FaultProxy


@pytest.fixture(scope="module")
def cli_via_proxy(tmp_path_factory, api_env, azurite, oidc, demo_policy):
    """An API server whose storage goes through a fault proxy, and alice's signed-in CLI home."""
    tmp = tmp_path_factory.mktemp("cli-retry")
    proxy = FaultProxy(azurite.port).start()
    env = {**api_env, "EZSSH_STORAGE_CONNECTION_STRING": proxy.connection_string()}
    port = free_port()
    try:
        api = start_api(tmp, port, env)
    except StandInError as exc:
        unavailable(str(exc))
    home = cli_env(tmp / "home")
    r = run_cli(["configure", "--server", f"http://127.0.0.1:{port}", "--ca-bundle", str(oidc.ca_path)], home)
    assert r.returncode == 0, r.stderr
    r = run_cli(["login"], home, username="alice", ca_path=oidc.ca_path)
    assert r.returncode == 0, r.stderr
    yield proxy, home
    api.stop()
    proxy.stop()


def _write_plan(actions: list[str]):  # type: ignore[no-untyped-def]
    """The n-th issuance write (a POST: the request row's insert, or a $batch) gets actions[n-1];
    later ones pass; other calls pass."""
    seen = [0]

    def plan(i: int, method: str, path: str) -> str:
        if method != "POST":
            return PASS
        seen[0] += 1
        return actions[seen[0] - 1] if seen[0] <= len(actions) else PASS

    return plan


@pytest.mark.parametrize("actions,writes", [
    # the service's own 1 + 3 tries fail: 503; the CLI's second attempt writes
    ([FAIL] * 4, 5),
    # the first write lands but its answer is lost (a POST is not retried on a lost answer): 503;
    # the CLI's retry writes again (1 + 3 tries), finds its key taken, and gets the first answer
    ([LOSE] + [FAIL] * 3, 5),
], ids=["unavailable", "answer-lost"])
def test_a_503_is_retried_with_the_same_key_and_yields_one_certificate(cli_via_proxy, azurite, oidc, actions, writes):
    proxy, home = cli_via_proxy
    host = f"web-{uuid.uuid4().hex[:8]}"
    proxy.plan = _write_plan(actions)
    r = run_cli(["cert", "ensure", "-q", f"alice@{host}"], home)
    calls = proxy.calls_since_plan()
    proxy.heal()
    assert r.returncode == 0, r.stderr
    writes_seen = [p for m, p in calls if m == "POST"]
    assert len(writes_seen) == writes, writes_seen
    # the CLI's key names its request: every write is that one row's insert, never a transaction
    assert not [p for p in writes_seen if "$batch" in p], writes_seen
    tid = oidc.tenant_id("contoso")
    truth = TableStore.from_connection_string(azurite.connection_string, "ezssh")
    rows = [x for x in truth.list_requests(tid) if x.host == host]
    assert len(rows) == 1, f"{len(rows)} requests for one attempt"
    rec = rows[0]
    assert rec.state == "issued"
    cert = truth.get_certificate(tid, rec.policy_id, rec.serial)
    chain = [e for e in truth.list_audit(tid, request_id=rec.id, limit=100) if e.chain == f"req:{rec.id}"]
    assert verify_chain(chain, head=rec.audit_head)
    listed = run_cli(["certs", "list", "--json"], home)
    assert listed.returncode == 0 and str(cert.serial) in listed.stdout, listed.stdout
