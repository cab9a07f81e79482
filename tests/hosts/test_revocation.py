"""Revocation: the API, the audit, the KRL the API serves (checked by ssh-keygen), and a real sshd that
fetches it through the installed helper with the policy's host token."""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from functions.core.krl import CaRevocations, encode_krl

from .sandbox import user_key
from .test_setup_script import issue, script_for


def revoke(client, headers, policy: str, serial, **body):
    return client.post(f"/api/certificates/{policy}/{serial}/revoke", headers=headers, json=body)


def krl_check(tmp_path, krl: bytes, cert_line: str) -> subprocess.CompletedProcess:
    k, c = tmp_path / "policy.krl", tmp_path / f"c{time.monotonic_ns()}-cert.pub"
    k.write_bytes(krl)
    c.write_text(cert_line + "\n")
    return subprocess.run(["ssh-keygen", "-Q", "-f", str(k), str(c)], capture_output=True, text=True)


def host_token(script: str) -> str:
    return script.split("EZSSH_HOST_TOKEN='")[1].split("'")[0]


def test_a_user_revokes_their_own_certificate_and_the_krl_says_revoked(client, auth, context, oidc, tmp_path):
    tid = oidc.tenant_id("contoso")
    _, pub = user_key(tmp_path, "a")
    _, pub2 = user_key(tmp_path, "b")
    mine, other = issue(client, auth("alice"), pub), issue(client, auth("alice"), pub2)
    since = time.time()
    r = revoke(client, auth("alice"), "demo", mine["serial"], reason="laptop lost")
    assert r.status_code == 200, r.text
    assert r.json()["serial"] == mine["serial"] and r.json()["revoked_by"] == "alice@contoso.test"

    rec = context.service.store.get_certificate(tid, "demo", int(mine["serial"]))
    assert rec.revoked_at is not None and rec.revoked_by == "alice@contoso.test"
    entries = [e for e in context.service.store.list_audit(tid, since=since - 1)
               if e.action == "certificate.revoked" and e.serial == mine["serial"]]
    assert len(entries) == 1
    e = entries[0]
    assert (e.key_id, e.serial, e.actor_upn, e.details["reason"]) == (mine["key_id"], mine["serial"],
                                                                        "alice@contoso.test", "laptop lost")
    assert e.verify()

    krl = client.get("/api/policies/demo/krl", headers=auth("alice"))
    assert krl.status_code == 200 and krl.headers["content-type"] == "application/octet-stream"
    revoked = krl_check(tmp_path, krl.content, mine["certificate"])
    assert revoked.returncode == 1 and "REVOKED" in revoked.stdout
    assert krl_check(tmp_path, krl.content, other["certificate"]).returncode == 0
    # byte-stable: the same revocations give the same KRL
    assert client.get("/api/policies/demo/krl", headers=auth("bob")).content == krl.content


def test_an_unchanged_krl_is_a_304_for_users_and_hosts_and_a_revocation_changes_it(client, auth, oidc, tmp_path):
    contoso = oidc.tenant_id("contoso")
    token = host_token(script_for(client, auth("carol"), "demo"))
    host = {"X-Ezssh-Host-Token": token}
    url = f"/api/policies/demo/krl?tenant={contoso}"
    first = client.get(url, headers=host)
    tag = first.headers["etag"]
    assert first.status_code == 200 and tag.startswith('"') and first.headers["cache-control"] == "no-store"
    assert client.get("/api/policies/demo/krl", headers=auth("alice")).headers["etag"] == tag  # one answer, one tag
    for who in (host, auth("alice")):
        for sent in (tag, f"W/{tag}", f'"other", {tag}'):
            again = client.get(url if who is host else "/api/policies/demo/krl", headers={**who, "If-None-Match": sent})
            assert again.status_code == 304 and again.content == b"" and again.headers["etag"] == tag, sent
    assert client.get(url, headers={**host, "If-None-Match": '"other"'}).content == first.content
    # the 304 is given only to callers who may read the KRL
    bad = client.get(url, headers={"X-Ezssh-Host-Token": token[:-1] + ("A" if token[-1] != "A" else "B"),
                                   "If-None-Match": tag})
    assert bad.status_code == 401
    assert client.get("/api/policies/demo/krl", headers={**auth("mallory"), "If-None-Match": tag}).status_code == 404
    # a revocation: the old tag gets the new KRL, which revokes the certificate
    _, pub = user_key(tmp_path, "etag")
    cert = issue(client, auth("alice"), pub)
    assert revoke(client, auth("alice"), "demo", cert["serial"]).status_code == 200
    changed = client.get(url, headers={**host, "If-None-Match": tag})
    assert changed.status_code == 200 and changed.headers["etag"] != tag
    assert krl_check(tmp_path, changed.content, cert["certificate"]).returncode == 1
    assert int(changed.headers["x-krl-version"]) >= int(first.headers["x-krl-version"])


def test_admins_may_revoke_others_certificates_members_may_not(client, auth, context, oidc, tmp_path):
    tid = oidc.tenant_id("contoso")
    _, pub = user_key(tmp_path)
    cert = issue(client, auth("alice"), pub)
    r = revoke(client, auth("bob"), "demo", cert["serial"])  # a member and approver, not an admin
    assert r.status_code == 403 and r.json()["error"] == "forbidden"
    assert context.service.store.get_certificate(tid, "demo", int(cert["serial"])).revoked_at is None
    r = revoke(client, auth("carol"), "demo", cert["serial"], reason="offboarding")
    assert r.status_code == 200 and r.json()["revoked_by"] == "carol@contoso.test"
    again = revoke(client, auth("carol"), "demo", cert["serial"])  # her retry: the revocation on record
    assert again.status_code == 200 and again.json() == r.json()
    late = revoke(client, auth("alice"), "demo", cert["serial"])  # carol's came first: says so
    assert late.status_code == 409 and late.json()["error"] == "conflict"
    assert "carol@contoso.test" in late.json()["message"]


def test_bad_revocations_change_nothing(client, auth, context, oidc, tmp_path, fabrikam_policy):
    tid = oidc.tenant_id("contoso")
    _, pub = user_key(tmp_path)
    cert = issue(client, auth("alice"), pub)
    krl_before = client.get("/api/policies/demo/krl", headers=auth("alice")).content
    cases = [
        (auth("alice"), "demo", "123456789", {}, 404, "not_found"),  # unknown serial
        (auth("alice"), "demo", "12ab", {}, 400, "invalid_request"),  # not a number
        (auth("alice"), "demo", "0", {}, 400, "invalid_request"),
        (auth("alice"), "demo", "99999999999999999999", {}, 400, "invalid_request"),
        (auth("alice"), "no-such-policy", cert["serial"], {}, 404, "not_found"),
        (auth("mallory"), "demo", cert["serial"], {}, 404, "not_found"),  # another tenant
        (auth("alice"), "fab-hosts", cert["serial"], {}, 404, "not_found"),
        (auth("alice"), "demo", cert["serial"], {"reason": "x", "extra": 1}, 400, "invalid_request"),
        ({}, "demo", cert["serial"], {}, 401, "unauthenticated"),
    ]
    for headers, policy, serial, body, status, code in cases:
        r = revoke(client, headers, policy, serial, **body)
        assert (r.status_code, r.json()["error"]) == (status, code), (policy, serial, r.text)
    assert context.service.store.get_certificate(tid, "demo", int(cert["serial"])).revoked_at is None
    assert client.get("/api/policies/demo/krl", headers=auth("alice")).content == krl_before


def test_krl_for_another_tenants_policy_or_a_wrong_host_token_is_refused(client, auth, oidc, fabrikam_policy):
    contoso, fabrikam = oidc.tenant_id("contoso"), oidc.tenant_id("fabrikam")
    token = host_token(script_for(client, auth("carol"), "demo"))
    assert client.get("/api/policies/fab-hosts/krl", headers=auth("alice")).status_code == 404
    assert client.get("/api/policies/demo/krl", headers=auth("mallory")).status_code == 404
    assert client.get("/api/policies/demo/krl").status_code == 401
    ok = client.get(f"/api/policies/demo/krl?tenant={contoso}", headers={"X-Ezssh-Host-Token": token})
    assert ok.status_code == 200 and ok.content.startswith(b"SSHKRL\n\0")
    for url, tok in ((f"/api/policies/demo/krl?tenant={contoso}", token[:-1] + ("A" if token[-1] != "A" else "B")),
                     (f"/api/policies/demo/krl?tenant={fabrikam}", token),
                     (f"/api/policies/fab-hosts/krl?tenant={fabrikam}", token),
                     (f"/api/policies/hosts-b/krl?tenant={contoso}", token),
                     ("/api/policies/demo/krl?tenant=not-a-guid", token)):
        r = client.get(url, headers={"X-Ezssh-Host-Token": tok})
        assert r.status_code == 401 and r.json()["error"] == "unauthenticated", url
    r = client.get("/api/policies/demo/krl", headers={"X-Ezssh-Host-Token": token})
    assert r.status_code == 400


def test_sshd_refuses_a_revoked_certificate_after_the_host_fetches_the_krl(make_host, client, auth, tmp_path):
    host = make_host()
    assert host.run_setup(script_for(client, auth("carol"), "demo")).returncode == 0
    host.wait_reloaded()
    k1, pub1 = user_key(tmp_path, "one")
    k2, pub2 = user_key(tmp_path, "two")
    doomed, kept = issue(client, auth("alice"), pub1), issue(client, auth("alice"), pub2)
    assert host.login("alice", k1, doomed["certificate"]).returncode == 0  # the KRL blocks nothing yet

    assert revoke(client, auth("alice"), "demo", doomed["serial"]).status_code == 200
    helper = host.etc / "ezssh" / "bin" / "ezssh-krl-update"
    fetched = subprocess.run(["sh", str(helper), "--root", str(host.root)], capture_output=True, text=True,
                             timeout=60)
    assert fetched.returncode == 0, fetched.stderr
    combined = host.etc / "ezssh" / "revoked_keys"
    check = subprocess.run(["ssh-keygen", "-Q", "-f", str(combined), str(k1) + "-cert.pub"], capture_output=True,
                           text=True)
    assert check.returncode == 1 and "REVOKED" in check.stdout

    refused = host.login("alice", k1, doomed["certificate"])
    assert refused.returncode == 255 and "Permission denied" in refused.stderr
    deadline = time.time() + 5
    while "revoked by file" not in host.log_text() and time.time() < deadline:
        time.sleep(0.1)
    assert "revoked by file" in host.log_text()
    ok = host.login("alice", k2, kept["certificate"])
    assert ok.returncode == 0 and ok.stdout.strip() == "alice"

    # a second fetch changes nothing; a fetch with a wrong token keeps the last good KRL
    before = host.snapshot()
    assert subprocess.run(["sh", str(helper), "--root", str(host.root)], capture_output=True).returncode == 0
    assert host.snapshot() == before
    # the helper kept the KRL's ETag and asks with If-None-Match: the server's 304 keeps the copy it
    # has (here replaced by hand with an empty KRL, which a full answer would overwrite)
    krl_file = next((host.etc / "ezssh" / "krl.d").glob("*_demo.krl"))
    etag_file = krl_file.with_suffix(".etag")
    served = client.get("/api/policies/demo/krl", headers=auth("alice"))
    assert etag_file.read_text() == served.headers["etag"] and krl_file.read_bytes() == served.content
    krl_file.write_bytes(encode_krl([], krl_version=1))
    assert subprocess.run(["sh", str(helper), "--root", str(host.root)], capture_output=True).returncode == 0
    assert krl_file.read_bytes() == encode_krl([], krl_version=1)  # 304: kept
    etag_file.write_text("")  # no ETag: a full answer
    assert subprocess.run(["sh", str(helper), "--root", str(host.root)], capture_output=True).returncode == 0
    assert krl_file.read_bytes() == served.content and etag_file.read_text() == served.headers["etag"]
    token_file = next((host.etc / "ezssh" / "policies").glob("*_demo.token"))
    token_file.write_text("X-Ezssh-Host-Token: wrong-wrong-wrong-wrong-wrong\n")
    before = host.snapshot()
    bad = subprocess.run(["sh", str(helper), "--root", str(host.root)], capture_output=True, text=True)
    assert bad.returncode == 1 and "keeping the last good one" in bad.stderr
    assert host.snapshot() == before
    assert host.login("alice", k1, doomed["certificate"]).returncode == 255


def test_an_empty_krl_blocks_nothing_in_sshd(make_host, client, auth, demo_policy, tmp_path):
    host = make_host()
    assert host.run_setup(script_for(client, auth("carol"), "demo")).returncode == 0
    host.wait_reloaded()
    combined = host.etc / "ezssh" / "revoked_keys"
    combined.write_bytes(encode_krl([]))
    key, pub = user_key(tmp_path)
    assert host.login("alice", key, issue(client, auth("alice"), pub)["certificate"]).returncode == 0
    # and a KRL of the same CA that revokes other serials does not block this one either
    combined.write_bytes(encode_krl([CaRevocations(demo_policy.current_ca.public_key, frozenset({1, 2, 3}))]))
    assert host.login("alice", key, issue(client, auth("alice"), pub)["certificate"]).returncode == 0


@pytest.mark.parametrize("n", [1, 1000, 10000])
def test_krl_size_and_encode_time(n, demo_policy):
    """Figures for the report: random 63-bit serials cost 8 bytes each (no runs to compress)."""
    import secrets

    serials = frozenset(secrets.randbits(63) | 1 for _ in range(n))
    started = time.perf_counter()
    data = encode_krl([CaRevocations(demo_policy.current_ca.public_key, serials)], krl_version=1)
    took = time.perf_counter() - started
    print(f"\nKRL with {n} revoked serials: {len(data)} bytes, encoded in {took * 1000:.2f} ms")
    assert len(data) < 200 + 8 * n


# ---- the CLI ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def alice_cli(tmp_path_factory, api_server, oidc):
    from devstack.demo import cli_env, run_cli

    env = cli_env(tmp_path_factory.mktemp("alice-hosts-home"))
    assert run_cli(["configure", "--server", api_server, "--ca-bundle", str(oidc.ca_path)], env).returncode == 0
    r = run_cli(["login"], env, username="alice", ca_path=oidc.ca_path)
    assert r.returncode == 0, r.stderr
    return env


def test_cli_prints_the_host_setup_script_and_revokes(alice_cli, client, auth, context, oidc, tmp_path):
    from devstack.demo import run_cli

    r = run_cli(["policy", "host-setup", "demo"], alice_cli)
    assert r.returncode != 0 and "admins" in r.stderr  # the script carries the host token: admins only
    assert run_cli(["policy", "host-setup", "fab-hosts"], alice_cli).returncode != 0

    _, pub = user_key(tmp_path)
    cert = issue(client, auth("alice"), pub)
    bad = run_cli(["certs", "revoke", "demo", "not-a-serial"], alice_cli)
    assert bad.returncode == 2 and "not a certificate serial" in bad.stderr
    unknown = run_cli(["certs", "revoke", "demo", "424242"], alice_cli)
    assert unknown.returncode != 0 and "424242" in unknown.stderr
    ok = run_cli(["certs", "revoke", "demo", cert["serial"], "--reason", "cli test", "--json"], alice_cli)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["serial"] == cert["serial"]
    rec = context.service.store.get_certificate(oidc.tenant_id("contoso"), "demo", int(cert["serial"]))
    assert rec.revoked_at is not None
    # revoking it again (a retry after a lost answer, say) answers with the revocation on record
    again = run_cli(["certs", "revoke", "demo", cert["serial"], "--json"], alice_cli)
    assert again.returncode == 0 and json.loads(again.stdout) == json.loads(ok.stdout), again.stderr
