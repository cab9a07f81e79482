"""People who leave lose their certificates at once: `ezssh revoke --user` revokes every live
certificate of a person or app in one audited step, and the leaver sweep does the same when
Microsoft Graph (an HTTPS stand-in speaking Graph's shapes) says the account was disabled or
deleted, or Entra ID Protection rates it risky. A real sshd then refuses the certificate (KRL)."""

from __future__ import annotations

import json

import pytest

from devstack.demo import cli_env, run_cli
from functions.graph import GraphDirectory
from functions.service.identities import Identities, SweepConfig
from tests.standins.graph import GraphStandIn
from tests.standins.keyvault import StaticTokenCredential
from tests.workloads.conftest import LOGIN, install_krl


@pytest.fixture(scope="module")
def graph():
    g = GraphStandIn().start()
    yield g
    g.stop()


def signed_in(tmp_path, api_server, oidc, user: str) -> dict:
    env = cli_env(tmp_path / f"{user}-home")
    assert run_cli(["configure", "--server", api_server, "--ca-bundle", str(oidc.ca_path)], env).returncode == 0
    r = run_cli(["login"], env, username=user, ca_path=oidc.ca_path)
    assert r.returncode == 0, r.stderr
    return env


def ssh(env, sshd):
    return run_cli(["ssh", f"{LOGIN}@127.0.0.1", "-p", str(sshd.port), "-o", "BatchMode=yes", "whoami"], env)


def sweeper(context, graph, **cfg) -> Identities:
    """The leaver sweep as the timer runs it, against the Graph stand-in."""
    directory = GraphDirectory(graph.url, StaticTokenCredential(graph.token), verify=graph.ca_path)
    return Identities(context.service.base, context.service.hosts, directory, SweepConfig(**cfg))


def everyone_active(context, graph, tid: str) -> None:
    """Every identity that holds a live certificate in the tenant exists in the directory, enabled."""
    for c in context.service.store.live_user_certificates(tid, int(context.service.clock()), 3 * 86400):
        graph.accounts.setdefault(c.requester_oid, ("user", True))


def identity_revoked(context, tid: str, oid: str) -> list:
    return [e for e in context.service.store.list_audit(tid, since=context.service.clock() - 600, limit=100000)
            if e.action == "identity.revoked" and e.details.get("target_oid") == oid]


def test_ezssh_revoke_user_revokes_every_live_certificate_at_once(tmp_path, api_server, oidc, wl_sshd, context,
                                                                    client, auth):
    lee = signed_in(tmp_path, api_server, oidc, "lee")
    first = ssh(lee, wl_sshd)
    assert first.returncode == 0 and first.stdout.strip() == LOGIN, first.stderr
    carol = signed_in(tmp_path, api_server, oidc, "carol")
    r = run_cli(["revoke", "--user", oidc.user("lee")["oid"], "--reason", "left the company", "--json"], carol)
    assert r.returncode == 0, r.stderr
    revoked = json.loads(r.stdout)["revoked"]
    assert revoked and {c["policy"] for c in revoked} == {"wl-e2e"}
    tid = oidc.tenant_id("contoso")
    assert not context.service.store.live_user_certificates(tid, int(context.service.clock()), 86400,
                                                            requester_oid=oidc.user("lee")["oid"])
    [entry] = identity_revoked(context, tid, oidc.user("lee")["oid"])
    assert entry.actor_oid == oidc.user("carol")["oid"] and entry.details["reason"] == "left the company"
    assert sorted(entry.details["serials"]) == sorted(c["serial"] for c in revoked)
    install_krl(client, auth("carol"), wl_sshd)
    again = ssh(lee, wl_sshd)  # lee's cached certificate, now in the KRL
    assert again.returncode != 0 and again.stdout.strip() != LOGIN
    # a second call finds nothing live
    r = run_cli(["revoke", "--user", oidc.user("lee")["oid"], "--json"], carol)
    assert r.returncode == 0 and json.loads(r.stdout)["revoked"] == [], r.stdout


def test_only_admins_revoke_what_someone_holds(client, auth, oidc, wl_sshd):
    lee = oidc.user("lee")["oid"]
    r = client.post(f"/api/identities/{lee}/revoke", headers=auth("alice"), json={})
    assert r.status_code == 403, r.text
    r = client.post("/api/identities/lee@contoso.test/revoke", headers=auth("carol"), json={})
    assert r.status_code == 400 and "object id" in r.json()["message"], r.text
    r = client.post(f"/api/identities/{lee}/revoke", headers=auth("carol"), json={"reason": "x", "extra": 1})
    assert r.status_code == 422 or r.status_code == 400, r.text
    # erin, a member of another tenant, can't reach contoso's certificates
    r = client.post(f"/api/identities/{lee}/revoke", headers=auth("erin"), json={})
    assert r.status_code == 403, r.text


def test_a_disabled_app_loses_its_certificates_in_one_sweep_and_sshd_refuses_them(
        tmp_path, api_server, oidc, wl_sshd, context, graph, client, auth):
    app = oidc.app("web1-identity")
    env = cli_env(tmp_path / "vm", IDENTITY_ENDPOINT=oidc.mi_endpoint, IDENTITY_HEADER=oidc.mi_header)
    assert run_cli(["configure", "--server", api_server, "--ca-bundle", str(oidc.ca_path)], env).returncode == 0
    assert run_cli(["login", "--managed-identity", "--client-id", app["client_id"]], env).returncode == 0
    assert ssh(env, wl_sshd).stdout.strip() == LOGIN
    tid = app["tid"]
    everyone_active(context, graph, tid)
    sweep = sweeper(context, graph)
    assert sweep.sweep([tid])["revoked"] == 0  # everyone may still sign in: nothing changes
    assert context.service.store.live_user_certificates(tid, int(context.service.clock()), 86400,
                                                        requester_oid=app["oid"])
    graph.accounts[app["oid"]] = ("servicePrincipal", False)  # an admin disables the app's identity
    result = sweep.sweep([tid], force=True)
    assert result["revoked"] >= 1 and result["identities"] == 1, result
    assert not context.service.store.live_user_certificates(tid, int(context.service.clock()), 86400,
                                                            requester_oid=app["oid"])
    [entry] = identity_revoked(context, tid, app["oid"])
    assert entry.actor_oid is None and entry.details["reason"] == "account disabled in Entra ID"
    install_krl(client, auth("carol"), wl_sshd)
    assert ssh(env, wl_sshd).returncode != 0
    graph.accounts[app["oid"]] = ("servicePrincipal", True)


def test_the_sweep_revokes_nothing_when_graph_cannot_say(context, graph, oidc, tmp_path, api_server, wl_sshd):
    lee_env = signed_in(tmp_path, api_server, oidc, "lee")
    assert ssh(lee_env, wl_sshd).returncode == 0  # a new certificate for lee (the KRL holds only the old ones)
    tid = oidc.tenant_id("contoso")
    lee = oidc.user("lee")["oid"]
    live = context.service.store.live_user_certificates(tid, int(context.service.clock()), 86400, requester_oid=lee)
    assert live
    graph.accounts.pop(lee, None)  # deleted...
    everyone_active(context, graph, tid)
    graph.accounts.pop(lee, None)
    graph.fail_next_with(503, times=1)  # ...but Graph is down for the first batch
    result = sweeper(context, graph).sweep([tid], force=True)
    assert result["unavailable"] == 1 and result["revoked"] == 0
    assert len(context.service.store.live_user_certificates(tid, int(context.service.clock()), 86400,
                                                            requester_oid=lee)) == len(live)
    # the next run asks again and revokes: a deleted account is one Graph finds neither as user nor app
    result = sweeper(context, graph).sweep([tid], force=True)
    assert result["revoked"] == len(live) and result["identities"] == 1, result
    assert identity_revoked(context, tid, lee)[-1].details["reason"] == "account deleted in Entra ID"


def test_risky_users_are_revoked_where_the_tenant_asks_for_it(context, graph, oidc, tmp_path, api_server, wl_sshd):
    lee_env = signed_in(tmp_path, api_server, oidc, "lee")
    assert ssh(lee_env, wl_sshd).returncode == 0
    tid = oidc.tenant_id("contoso")
    lee = oidc.user("lee")["oid"]
    everyone_active(context, graph, tid)
    graph.accounts[lee] = ("user", True)
    graph.risky[lee] = "medium"
    assert sweeper(context, graph, risk_level="high").sweep([tid], force=True)["revoked"] == 0
    assert sweeper(context, graph).sweep([tid], force=True)["revoked"] == 0  # risk not asked for
    result = sweeper(context, graph, risk_level="medium").sweep([tid], force=True)
    assert result["revoked"] >= 1 and result["identities"] == 1, result
    assert "risk" in identity_revoked(context, tid, lee)[-1].details["reason"]
    graph.risky.clear()


def test_a_disabled_person_loses_their_certificates_in_one_sweep_and_sshd_refuses_them(
        tmp_path, api_server, oidc, wl_sshd, context, graph, client, auth):
    lee_env = signed_in(tmp_path, api_server, oidc, "lee")
    assert ssh(lee_env, wl_sshd).returncode == 0
    tid = oidc.tenant_id("contoso")
    lee = oidc.user("lee")["oid"]
    everyone_active(context, graph, tid)
    graph.accounts[lee] = ("user", False)  # an admin disables lee's account in Entra ID
    result = sweeper(context, graph).sweep([tid], force=True)
    assert result["revoked"] >= 1 and result["identities"] == 1, result
    assert identity_revoked(context, tid, lee)[-1].details["reason"] == "account disabled in Entra ID"
    install_krl(client, auth("carol"), wl_sshd)
    assert ssh(lee_env, wl_sshd).returncode != 0  # the cached certificate is in the KRL now
    graph.accounts[lee] = ("user", True)
