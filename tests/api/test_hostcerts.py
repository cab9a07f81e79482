"""Host certificates over HTTP (issue 12): the host CA per policy, enrolment tokens, renewal by proof
of possession, the client's known-hosts answer, and every kind of bad input refused, audited and
issuing nothing. Against uvicorn + Azurite + SoftHSM + the OIDC stand-in; certificates, signatures
and KRLs are checked with ssh-keygen."""

from __future__ import annotations

import base64
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from devstack.stack import enrol_with_token
from functions.core.hostcert import ENROL_NAMESPACE
from functions.service import Service
from tests.realparts import needs_tool

pytestmark = needs_tool("ssh-keygen")


def host_keys(d: Path, *types: str) -> dict[str, Path]:
    """Real host key pairs made by ssh-keygen: {type: private key path}."""
    d.mkdir(parents=True, exist_ok=True)
    out = {}
    for t in types or ("ed25519", "ecdsa"):
        p = d / f"ssh_host_{t}_key"
        args = ["-b", "3072"] if t == "rsa" else []
        subprocess.run(["ssh-keygen", "-q", "-t", t, *args, "-N", "", "-f", str(p)], check=True)
        out[t] = p
    return out


def pub(p: Path) -> str:
    return " ".join(p.with_name(p.name + ".pub").read_text().split()[:2])


def mint(client, auth, hosts, user: str = "carol", policy: str = "demo", **kw):  # type: ignore[no-untyped-def]
    return client.post(f"/api/policies/{policy}/host-tokens", headers=auth(user), json={"hosts": hosts, **kw})


def challenge(client, tenant: str, token: str | None, pubs: list[str], policy: str = "demo"):  # type: ignore[no-untyped-def]
    body = {"tenant": tenant, "policy": policy, "host_keys": pubs, **({"token": token} if token else {})}
    return client.post("/api/host-certificates/challenge", json=body)


def enrol(client, tenant: str, token: str, keys: list[Path], policy: str = "demo", text: bool = False):  # type: ignore[no-untyped-def]
    """What the host script does: a challenge for the token and the keys, signed with each key."""
    ch = challenge(client, tenant, token, [pub(p) for p in keys], policy)
    if ch.status_code != 200:
        return ch
    c = ch.json()
    signed = [{"public_key": pub(p), "signature": sign(p, c["challenge"], p.parent, ENROL_NAMESPACE)} for p in keys]
    headers = {"Accept": "text/plain"} if text else {}
    return client.post("/api/host-certificates", headers=headers,
                       json={"tenant": tenant, "policy": policy, "token": token, "challenge_id": c["challenge_id"],
                             "host_keys": signed})


def keygen_L(tmp: Path, line: str) -> str:
    f = tmp / "c-cert.pub"
    f.write_text(line + "\n")
    return subprocess.run(["ssh-keygen", "-L", "-f", str(f)], capture_output=True, text=True, check=True).stdout


def fp_of(line: str, tmp: Path) -> str:
    f = tmp / "k.pub"
    f.write_text(line + "\n")
    return subprocess.run(["ssh-keygen", "-l", "-f", str(f)], capture_output=True, text=True, check=True).stdout.split()[1]


_STATE: dict = {}


@pytest.fixture(autouse=True)
def _api_log(state_dir):
    _STATE["log"] = state_dir / "logs" / "api.log"


def refusals(context, since: float, code: str, partition: str = "_unauthenticated") -> list:
    """Host refusals: in the tenant's log once the host presented a real token or challenge of it.
    Without one there is no identity behind the call: the API logs and counts the refusal and stores
    nothing (anyone could fill storage with such calls), so read the API's log lines since `since`."""
    from datetime import datetime

    stored = [e for e in context.service.store.list_audit(partition, since=since, limit=100000)
              if e.action == "host_certificate.refused" and e.error_code == code]
    if partition != "_unauthenticated":
        return stored
    assert not stored
    out = []
    for _ in range(50):  # the log line may land a moment after the answer
        for line in _STATE["log"].read_text().splitlines():
            if "host_certificate.refused" in line and f"error={code} " in line:
                at = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
                if at >= since:
                    out.append(line)
        if out:
            break
        time.sleep(0.1)
    return out


@pytest.fixture(scope="module")
def tenant(oidc) -> str:
    return oidc.tenant_id("contoso")


def test_each_policy_has_a_separate_host_ca_shown_per_kind(client, auth, demo_policy):
    user = client.get("/api/policies/demo/ca", headers=auth("alice"))
    host = client.get("/api/policies/demo/ca?kind=host", headers=auth("alice"))
    assert user.status_code == host.status_code == 200
    assert user.text.strip() == client.get("/api/policies/demo/ca?kind=user", headers=auth("alice")).text.strip()
    assert user.text.split()[1] != host.text.split()[1]
    assert "ezssh-host-ca:demo" in host.text
    j = client.get("/api/policies/demo/ca?format=json", headers=auth("alice")).json()
    assert j["host"][0]["public_key"].split()[1] == host.text.split()[1] and "key_ref" not in j["host"][0]
    assert j["user"][0]["public_key"].split()[1] == user.text.split()[1]
    bad = client.get("/api/policies/demo/ca?kind=root", headers=auth("alice"))
    assert bad.status_code == 400


def test_a_policy_without_a_host_ca_gets_one_on_first_need_audited(client, auth, context, oidc):
    doc = {"id": "old-hosts", "rules": [{"groups": [oidc.group_id("contoso", "ezssh-users")], "action": "auto"}],
           "hosts": ["old-*"], "principals": ["{username}"]}
    r = client.post("/api/policies", headers=auth("carol"), json=doc)
    assert r.status_code == 201, r.text
    store = context.service.store
    tid = oidc.tenant_id("contoso")
    p = store.get_policy(tid, "old-hosts")
    # as written before host CAs existed
    from functions.core.audit import AuditEntry

    old = store.replace_policy(replace(p, host_ca=()), p.etag, AuditEntry(tid, time.time(), "test.setup", "ok").sealed())
    assert old.current_host_ca is None
    since = time.time() - 1
    host = client.get("/api/policies/old-hosts/ca?kind=host", headers=auth("alice"))
    assert host.status_code == 200 and host.text.startswith("ecdsa-sha2-nistp256 ")
    again = client.get("/api/policies/old-hosts/ca?kind=host", headers=auth("alice"))
    assert again.text == host.text  # made once
    stored = store.get_policy(tid, "old-hosts")
    assert stored.current_host_ca.public_key.split()[1] == host.text.split()[1]
    made = [e for e in store.list_audit(tid, since=since, limit=100000) if e.action == "policy.host_ca_created"]
    assert len(made) == 1 and made[0].policy_id == "old-hosts"


def test_token_enrolment_issues_host_certificates_for_the_token_names(client, auth, tenant, tmp_path, context):
    r = mint(client, auth, ["web1.contoso.example", "127.0.0.9"], policy="demo")
    # web* covers web1.contoso.example; 127.0.0.0/8 covers 127.0.0.9; both in the namespaces
    assert r.status_code == 201, r.text
    tok = r.json()
    assert tok["token"].startswith("ezh_") and tok["hosts"] == ["web1.contoso.example", "127.0.0.9"]
    assert tok["expires_at"] - time.time() <= 3600 + 5
    keys = host_keys(tmp_path / "h1", "ed25519", "ecdsa", "rsa")
    resp = enrol(client, tenant, tok["token"], list(keys.values()), text=True)
    assert resp.status_code == 200, resp.text
    lines = resp.text.splitlines()
    assert lines[0].startswith("# renew-after ")
    certs = lines[1:]
    assert len(certs) == 3
    host_ca = client.get("/api/policies/demo/ca?kind=host", headers=auth("alice")).text.splitlines()[0]
    for cert, (t, p) in zip(certs, keys.items()):
        out = keygen_L(tmp_path, cert)
        assert "host certificate" in out
        assert out.split("Principals:")[1].split("Critical Options:")[0].split() == ["web1.contoso.example", "127.0.0.9"]
        assert f"Signing CA: ECDSA {fp_of(host_ca, tmp_path)}" in out
        assert f"Public key: " in out and fp_of(pub(p), tmp_path) in out
    renew_after = int(lines[0].split()[-1])
    assert time.time() + 15 * 86400 < renew_after < time.time() + 21 * 86400  # two thirds into 30 days
    # audited: one issuance per key, with names, fingerprint and who proved it
    issued = [e for e in context.service.store.list_audit(tenant, since=time.time() - 30, limit=100000)
              if e.action == "host_certificate.issued" and e.details.get("token_id") == tok_id(tok["token"])]
    assert len(issued) == 3
    assert {e.details["public_key_fingerprint"] for e in issued} == {fp_of(pub(p), tmp_path) for p in keys.values()}
    assert all(e.details["token_created_by"] == "carol@contoso.test" and e.host == "web1.contoso.example,127.0.0.9"
               for e in issued)
    # the token is single use
    since = time.time() - 1
    again = enrol(client, tenant, tok["token"], [keys["ed25519"]])
    assert again.status_code == 403 and again.json()["error"] == "host_proof_refused"
    assert "already used" in again.json()["message"]
    [reuse] = [e for e in refusals(context, since, "host_proof_refused", tenant)
               if e.details.get("token_id") == tok_id(tok["token"])]
    assert reuse.details["token_created_by"] == "carol@contoso.test" and reuse.policy_id == "demo"


def tok_id(token: str) -> str:
    import hashlib

    return hashlib.sha256(token.encode()).hexdigest()[:12]


def test_minting_is_for_admins_and_names_inside_the_patterns(client, auth, context, oidc):
    assert mint(client, auth, ["web1"], user="alice").status_code == 403
    assert mint(client, auth, ["web1"], user="mallory").status_code == 404  # another tenant's policy
    for names, code in ((["db1.example.com"], "host_name_refused"), (["web*"], "host_name_refused"),
                        ([""], "host_name_refused"), ([], "host_name_refused"), (["10.9.9.9"], "host_name_refused"),
                        (["web1"], "host_name_refused"), (["web1.github.com"], "host_name_refused")):
        since = time.time() - 1
        r = mint(client, auth, names)
        assert r.status_code == 400 and r.json()["error"] == code, (names, r.text)
        tid = oidc.tenant_id("contoso")
        assert any(e.action == "host_token.refused" and e.error_code == code
                   for e in context.service.store.list_audit(tid, since=since, limit=100000))
    assert mint(client, auth, ["web1.contoso.example"], ttl_seconds=30 * 86400).status_code == 400


def test_bad_host_input_is_refused_and_issues_nothing(client, auth, tenant, tmp_path, context):
    tok = mint(client, auth, ["web2.contoso.example"]).json()["token"]
    user_key = ed25519.Ed25519PrivateKey.generate()
    user_cert = client.post("/api/requests", headers=auth("alice"), json={
        "host": "127.0.0.1", "principal": "alice",
        "public_key": user_key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                         serialization.PublicFormat.OpenSSH).decode()}).json()["certificate"]
    rsa2048 = tmp_path / "rsa2048"
    subprocess.run(["ssh-keygen", "-q", "-t", "rsa", "-b", "2048", "-N", "", "-f", str(rsa2048)], check=True)
    dsa_like = "ssh-dss AAAAB3NzaC1kc3MAAACBAP"
    cases = [([user_cert], "invalid_public_key"), ([pub(rsa2048)], "weak_public_key"), ([dsa_like], "invalid_public_key"),
             ([], "invalid_request")]
    for keys, code in cases:
        since = time.time() - 1
        r = challenge(client, tenant, tok, keys)
        assert r.status_code == 400 and r.json()["error"] == code, (code, r.text)
        assert refusals(context, since, code, tenant)  # a real token: the tenant's admins see it
    # the KRL host token of the policy is no enrolment token
    krl_token = context.service.hosts.host_token(context.service.store.get_policy(tenant, "demo"))
    good = host_keys(tmp_path / "h2", "ed25519")
    since = time.time() - 1
    r = enrol(client, tenant, krl_token, [good["ed25519"]])
    assert r.status_code == 403 and r.json()["error"] == "host_proof_refused"
    assert refusals(context, since, "host_proof_refused")  # no real token: logged and counted, not stored
    # a token of this tenant under another policy, or under another tenant id, is refused
    assert enrol(client, tenant, tok, [good["ed25519"]], policy="nope").status_code == 403
    other_tenant = "00000000-0000-0000-0000-000000000042"
    assert enrol(client, other_tenant, tok, [good["ed25519"]]).status_code == 403
    # none of that used the token up: it still works once
    ok = enrol(client, tenant, tok, [good["ed25519"]])
    assert ok.status_code == 200, ok.text
    assert [c["public_key_fingerprint"] for c in ok.json()["certificates"]] == [fp_of(pub(good["ed25519"]), tmp_path)]


def test_a_token_alone_enrols_no_key_proof_of_possession_is_needed(client, auth, tenant, tmp_path, context):
    """A token holder can't enrol someone else's public key: without a signature by that key over
    the service's challenge there is no certificate."""
    tok = mint(client, auth, ["web8.contoso.example"]).json()["token"]
    victim, mine = host_keys(tmp_path / "victim", "ed25519")["ed25519"], host_keys(tmp_path / "me", "ed25519")["ed25519"]
    # as a host enrolled before: the token and the public key only
    r = client.post("/api/host-certificates", json={"tenant": tenant, "policy": "demo", "token": tok,
                                                     "host_keys": [pub(victim)]})
    assert r.status_code == 400 and "certificates" not in r.json() and "challenge" in r.json()["message"]
    c = challenge(client, tenant, tok, [pub(victim)]).json()
    for sig in (sign(mine, c["challenge"], tmp_path, ENROL_NAMESPACE), sign(victim, c["challenge"], tmp_path)):
        r = client.post("/api/host-certificates", json={"tenant": tenant, "policy": "demo", "token": tok,
                                                         "challenge_id": c["challenge_id"],
                                                         "host_keys": [{"public_key": pub(victim), "signature": sig}]})
        assert r.status_code == 403 and r.json()["error"] == "host_proof_refused", r.text
    assert context.service.store.get_host_key(tenant, "demo", fp_of(pub(victim), tmp_path)) is None
    assert enrol(client, tenant, tok, [victim]).status_code == 200  # the key's holder enrols it


def test_tenant_admins_declare_the_host_namespaces_and_nobody_else(client, auth, oidc):
    got = client.get("/api/host-namespaces", headers=auth("alice"))
    assert got.status_code == 200 and "*.contoso.example" in got.json()["namespaces"]
    current = got.json()
    # a policy admin or a member can't change them; `*` or a public suffix is refused for anyone
    assert client.put("/api/host-namespaces", headers=auth("alice"),
                      json={"namespaces": ["*.contoso.example", "*.github.com"]}).status_code == 403
    for bad in (["*"], ["*.com"], ["*.co.uk"], ["0.0.0.0/0"]):
        r = client.put("/api/host-namespaces", headers={**auth("carol"), **({"If-Match": current["etag"]}
                                                                             if current["etag"] else {})},
                       json={"namespaces": bad})
        assert r.status_code == 400, (bad, r.text)
    # the tenant admin sets them (here: to what they are, so the other tests see no change)
    r = client.put("/api/host-namespaces", headers={**auth("carol"), **({"If-Match": current["etag"]}
                                                                         if current["etag"] else {})},
                   json={"namespaces": current["namespaces"]})
    assert r.status_code == 200, r.text
    assert r.json()["source"] == "tenant" and r.json()["namespaces"] == current["namespaces"]
    # a stale or missing ETag changes nothing
    assert client.put("/api/host-namespaces", headers=auth("carol"),
                      json={"namespaces": current["namespaces"]}).status_code == 428
    assert client.put("/api/host-namespaces", headers={**auth("carol"), "If-Match": 'W/"stale"'},
                      json={"namespaces": current["namespaces"]}).status_code == 412


def test_an_expired_token_is_refused(client, auth, tenant, tmp_path, context):
    tok = mint(client, auth, ["web3.contoso.example"], ttl_seconds=60).json()["token"]
    later = Service(context.service.store, context.service.keys, context.service.base.config,
                    clock=lambda: time.time() + 120)
    from functions.core.hostcert import ProofRefused

    keys = host_keys(tmp_path / "h3", "ed25519")
    with pytest.raises(ProofRefused, match="expired"):
        enrol_with_token(later, tenant, "demo", tok, [keys["ed25519"]])
    assert context.service.store.get_host_key(tenant, "demo", fp_of(pub(keys["ed25519"]), tmp_path)) is None


def sign(key: Path, message: str, tmp: Path, namespace: str = "ezssh-host-renew") -> str:
    f = tmp / "challenge"
    f.write_text(message)
    subprocess.run(["ssh-keygen", "-q", "-Y", "sign", "-f", str(key), "-n", namespace, str(f)], check=True,
                   capture_output=True)
    sig = (tmp / "challenge.sig").read_text()
    (tmp / "challenge.sig").unlink()
    return sig


def test_renewal_by_proof_of_possession(client, auth, tenant, tmp_path, context):
    keys = host_keys(tmp_path / "h4", "ed25519", "ecdsa")
    tok = mint(client, auth, ["web4.contoso.example", "127.0.0.4"]).json()["token"]
    first = enrol(client, tenant, tok, list(keys.values())).json()
    ch = client.post("/api/host-certificates/challenge",
                     json={"tenant": tenant, "policy": "demo", "host_keys": [pub(p) for p in keys.values()]})
    assert ch.status_code == 200, ch.text
    c = ch.json()
    signed = [{"public_key": pub(p), "signature": sign(p, c["challenge"], tmp_path)} for p in keys.values()]
    r = client.post("/api/host-certificates", json={"tenant": tenant, "policy": "demo",
                                                     "challenge_id": c["challenge_id"], "host_keys": signed})
    assert r.status_code == 200, r.text
    renewed = r.json()
    assert renewed["principals"] == ["web4.contoso.example", "127.0.0.4"]
    assert {x["serial"] for x in renewed["certificates"]}.isdisjoint({x["serial"] for x in first["certificates"]})
    out = keygen_L(tmp_path, renewed["certificates"][0]["certificate"])
    assert "host certificate" in out and "web4" in out
    entries = [e for e in context.service.store.list_audit(tenant, since=time.time() - 30, limit=100000)
               if e.action == "host_certificate.issued" and e.details.get("renewal")]
    assert {e.serial for e in entries} >= {x["serial"] for x in renewed["certificates"]}
    # the challenge is single use: the same proof again (a retry after a lost answer) gets the same
    # certificates, not a second set
    again = client.post("/api/host-certificates", json={"tenant": tenant, "policy": "demo",
                                                         "challenge_id": c["challenge_id"], "host_keys": signed})
    assert again.status_code == 200 and again.json() == renewed
    entries = [e for e in context.service.store.list_audit(tenant, since=time.time() - 30, limit=100000)
               if e.action == "host_certificate.issued" and e.details.get("renewal")
               and e.serial in {x["serial"] for x in renewed["certificates"]}]
    assert len(entries) == len(renewed["certificates"])


def test_renewal_signed_by_another_key_is_refused(client, auth, tenant, tmp_path, context):
    keys = host_keys(tmp_path / "h5", "ed25519")
    thief = host_keys(tmp_path / "thief", "ed25519")
    tok = mint(client, auth, ["web5.contoso.example"]).json()["token"]
    assert enrol(client, tenant, tok, [keys["ed25519"]]).status_code == 200
    # asking to renew a key that holds no certificate is refused before any challenge exists
    none = client.post("/api/host-certificates/challenge",
                       json={"tenant": tenant, "policy": "demo", "host_keys": [pub(thief["ed25519"])]})
    assert none.status_code == 403 and none.json()["error"] == "host_proof_refused"
    c = client.post("/api/host-certificates/challenge",
                    json={"tenant": tenant, "policy": "demo", "host_keys": [pub(keys["ed25519"])]}).json()
    since = time.time() - 1
    forged = [{"public_key": pub(keys["ed25519"]), "signature": sign(thief["ed25519"], c["challenge"], tmp_path)}]
    r = client.post("/api/host-certificates", json={"tenant": tenant, "policy": "demo",
                                                     "challenge_id": c["challenge_id"], "host_keys": forged})
    assert r.status_code == 403 and r.json()["error"] == "host_proof_refused"
    # anyone may fetch a host's challenge (its public key is public): a wrong signature proves
    # nothing, so it is logged and counted, never written to the tenant's audit log
    assert not [e for e in refusals(context, since, "host_proof_refused", tenant)
                if e.details.get("challenge") == c["challenge_id"]]
    assert any("another key" in line for line in refusals(context, since, "host_proof_refused"))
    # the right key still renews with that challenge: the forgery used nothing up
    good = [{"public_key": pub(keys["ed25519"]), "signature": sign(keys["ed25519"], c["challenge"], tmp_path)}]
    assert client.post("/api/host-certificates", json={"tenant": tenant, "policy": "demo",
                                                        "challenge_id": c["challenge_id"],
                                                        "host_keys": good}).status_code == 200


def test_known_hosts_for_users_and_revoked_host_certificates(client, auth, tenant, tmp_path, context):
    kh = client.get("/api/known-hosts", headers=auth("alice"))
    assert kh.status_code == 200
    body = kh.json()
    host_ca = client.get("/api/policies/demo/ca?kind=host", headers=auth("alice")).text.split()[1]
    lines = [x for x in body["known_hosts"].splitlines() if host_ca in x]
    assert all(x.startswith("@cert-authority ") for x in lines)
    patterns = [p for x in lines for p in x.split()[1].split(",")]
    # the demo policy's patterns (127.0.0.0/8, localhost, web*) within the tenant's namespaces
    assert {"127.*", "[127.*]:*", "localhost", "web*.contoso.example", "[web*.contoso.example]:*"} <= set(patterns)
    assert "*" not in patterns and "web*" not in patterns and "*:*" not in body["known_hosts"]
    assert "demo" in body["policies"]
    # unchanged: a 304 with no body for the same caller's ETag; another caller's answer has its own
    tag = kh.headers["etag"]
    again = client.get("/api/known-hosts", headers={**auth("alice"), "If-None-Match": tag})
    assert again.status_code == 304 and again.content == b"" and again.headers["etag"] == tag
    assert client.get("/api/known-hosts", headers={**auth("erin"), "If-None-Match": tag}).status_code == 200
    assert client.get("/api/known-hosts", headers={"If-None-Match": tag}).status_code == 401
    # another tenant's user sees none of contoso's host CAs
    assert host_ca not in client.get("/api/known-hosts", headers=auth("erin")).json()["known_hosts"]
    assert client.get("/api/known-hosts").status_code == 401
    # revoke a host certificate: it shows in the KRL the client gets
    keys = host_keys(tmp_path / "h6", "ed25519")
    tok = mint(client, auth, ["web6.contoso.example"]).json()["token"]
    cert = enrol(client, tenant, tok, [keys["ed25519"]]).json()["certificates"][0]
    krl = tmp_path / "krl"
    certfile = tmp_path / "web6-cert.pub"
    certfile.write_text(cert["certificate"] + "\n")
    krl.write_bytes(base64.b64decode(client.get("/api/known-hosts", headers=auth("alice")).json()["krl"]))
    assert subprocess.run(["ssh-keygen", "-Q", "-f", str(krl), str(certfile)], capture_output=True).returncode == 0
    r = client.post(f"/api/certificates/demo/{cert['serial']}/revoke", headers=auth("alice"), json={})
    assert r.status_code == 403  # a host certificate is revoked by admins only
    r = client.post(f"/api/certificates/demo/{cert['serial']}/revoke", headers=auth("carol"), json={})
    assert r.status_code == 200, r.text
    changed = client.get("/api/known-hosts", headers={**auth("alice"), "If-None-Match": tag})
    assert changed.status_code == 200 and changed.headers["etag"] != tag  # a host revocation changes it
    krl.write_bytes(base64.b64decode(changed.json()["krl"]))
    q = subprocess.run(["ssh-keygen", "-Q", "-f", str(krl), str(certfile)], capture_output=True, text=True)
    assert q.returncode == 1 and "REVOKED" in q.stdout
    # and a revoked certificate renews nothing
    ch = client.post("/api/host-certificates/challenge",
                     json={"tenant": tenant, "policy": "demo", "host_keys": [pub(keys["ed25519"])]})
    assert ch.status_code == 403 and "revoked" in ch.json()["message"]
