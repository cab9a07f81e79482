"""Host certificates survive a lost answer: enrolment by token and renewal by challenge, where the
storage write (certificates, their audit and the use of the token or challenge) commits but its
answer never reaches the service. The host's retry with the same proof and the same host keys gets
the certificates that were recorded: never a second set, never a refusal."""

from __future__ import annotations

import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from tests.realparts import needs_tool
from tests.standins.faultproxy import LOSE, PASS

from .conftest import Faulty

KEYGEN = shutil.which("ssh-keygen") or "ssh-keygen"
pytestmark = needs_tool("ssh-keygen")


def lose_the_write(i: int, method: str, path: str) -> str:
    """The issuance's one write (a $batch) commits and its answer is lost; later calls fail too."""
    return LOSE if "$batch" in path else PASS


def host_key(tmp: Path) -> tuple[Path, str]:
    path = tmp / f"hk-{uuid.uuid4().hex[:6]}"
    subprocess.run([KEYGEN, "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True,
                   capture_output=True, timeout=30)
    return path, (path.with_suffix(".pub")).read_text().strip()


def sign(key: Path, text: str, namespace: str = "ezssh-host-renew") -> str:
    out = subprocess.run([KEYGEN, "-Y", "sign", "-n", namespace, "-f", str(key)],
                         input=text.encode(), capture_output=True, check=True, timeout=30)
    return out.stdout.decode()


def enrolment(c, tid: str, pid: str, token: str, keys: list[tuple[Path, str]]) -> dict:  # type: ignore[no-untyped-def]
    """What the host script sends: the token, a challenge for it and the keys, signed by each key."""
    ch = c.post("/api/host-certificates/challenge",
                json={"tenant": tid, "policy": pid, "token": token, "host_keys": [p for _, p in keys]})
    assert ch.status_code == 200, ch.text
    return {"tenant": tid, "policy": pid, "token": token, "challenge_id": ch.json()["challenge_id"],
            "host_keys": [{"public_key": p, "signature": sign(k, ch.json()["challenge"], "ezssh-host-enrol")}
                          for k, p in keys]}


@pytest.fixture(scope="module")
def host_policy(faulty: Faulty, oidc, auth) -> str:
    r = faulty.client.post("/api/policies", headers=auth("carol"), json={
        "id": "f-hosts", "rules": [{"groups": [oidc.group_id("contoso", "ezssh-users")], "action": "auto"}],
        "hosts": ["fh-*.contoso.example"], "principals": ["alice"]})
    assert r.status_code == 201, r.text
    return "f-hosts"


def recorded(faulty: Faulty, tid: str, pid: str, fingerprints: list[str]) -> tuple[list[str], int]:
    """The certificate lines storage holds for these host keys, and how many issuances were audited."""
    certs = []
    for fp in fingerprints:
        rec = faulty.truth.get_host_key(tid, pid, fp)
        certs.append(faulty.truth.get_certificate(tid, pid, rec.serial).certificate)
    issued = [e for e in faulty.truth.list_audit(tid, limit=100_000)
              if e.action == "host_certificate.issued" and e.details.get("public_key_fingerprint") in fingerprints]
    return certs, len(issued)


def fingerprints(body: dict) -> list[str]:
    return [c["public_key_fingerprint"] for c in body["certificates"]]


def test_enrolment_by_token_with_its_answer_lost_gets_the_same_certificates_on_retry(
        faulty: Faulty, oidc, auth, host_policy, tmp_path) -> None:
    c, tid = faulty.client, oidc.tenant_id("contoso")
    host = f"fh-{uuid.uuid4().hex[:6]}.contoso.example"
    r = c.post(f"/api/policies/{host_policy}/host-tokens", headers=auth("carol"), json={"hosts": [host]})
    assert r.status_code == 201, r.text
    body = enrolment(c, tid, host_policy, r.json()["token"], [host_key(tmp_path), host_key(tmp_path)])

    faulty.proxy.plan = lose_the_write
    first = c.post("/api/host-certificates", json=body)
    faulty.proxy.heal()
    assert first.status_code == 503, first.text  # the write landed, but the service can't know
    again = c.post("/api/host-certificates", json=body)
    assert again.status_code == 200, again.text
    certs, audited = recorded(faulty, tid, host_policy, fingerprints(again.json()))
    assert [x["certificate"] for x in again.json()["certificates"]] == certs
    assert audited == 2  # one issuance per host key, not two
    # and again, as often as the host likes within the window: the same answer
    assert c.post("/api/host-certificates", json=body).json() == again.json()
    # the same token with other host keys is still refused: it was used
    other = c.post("/api/host-certificates", json={**body, "host_keys": body["host_keys"][:1]})
    assert other.status_code == 403 and other.json()["error"] == "host_proof_refused", other.text


def test_renewal_by_challenge_with_its_answer_lost_gets_the_same_certificates_on_retry(
        faulty: Faulty, oidc, auth, host_policy, tmp_path) -> None:
    c, tid = faulty.client, oidc.tenant_id("contoso")
    host = f"fh-{uuid.uuid4().hex[:6]}.contoso.example"
    token = c.post(f"/api/policies/{host_policy}/host-tokens", headers=auth("carol"),
                   json={"hosts": [host]}).json()["token"]
    key, pub = host_key(tmp_path)
    enrolled = c.post("/api/host-certificates", json=enrolment(c, tid, host_policy, token, [(key, pub)]))
    assert enrolled.status_code == 200, enrolled.text
    ch = c.post("/api/host-certificates/challenge", json={"tenant": tid, "policy": host_policy, "host_keys": [pub]})
    assert ch.status_code == 200, ch.text
    body = {"tenant": tid, "policy": host_policy, "challenge_id": ch.json()["challenge_id"],
            "host_keys": [{"public_key": pub, "signature": sign(key, ch.json()["challenge"])}]}

    faulty.proxy.plan = lose_the_write
    first = c.post("/api/host-certificates", json=body)
    faulty.proxy.heal()
    assert first.status_code == 503, first.text
    again = c.post("/api/host-certificates", json=body)
    assert again.status_code == 200, again.text
    certs, audited = recorded(faulty, tid, host_policy, fingerprints(again.json()))
    assert [x["certificate"] for x in again.json()["certificates"]] == certs
    assert certs[0] != enrolled.json()["certificates"][0]["certificate"]  # the renewal's, not the first one
    assert audited == 2  # the enrolment and one renewal
    assert c.post("/api/host-certificates", json=body).json() == again.json()
    # a signature by another key over the same challenge is no retry: refused
    key2, _ = host_key(tmp_path)
    forged = {**body, "host_keys": [{"public_key": pub, "signature": sign(key2, ch.json()["challenge"])}]}
    assert c.post("/api/host-certificates", json=forged).status_code == 403


def test_two_identical_enrolments_at_once_both_get_the_one_set_of_certificates(
        faulty: Faulty, oidc, auth, host_policy, tmp_path) -> None:
    import threading

    c, tid = faulty.client, oidc.tenant_id("contoso")
    for _ in range(5):
        token = c.post(f"/api/policies/{host_policy}/host-tokens", headers=auth("carol"),
                       json={"hosts": [f"fh-{uuid.uuid4().hex[:6]}.contoso.example"]}).json()["token"]
        body = enrolment(c, tid, host_policy, token, [host_key(tmp_path)])
        barrier, answers = threading.Barrier(2), []

        def enrol() -> None:
            barrier.wait(10)
            answers.append(c.post("/api/host-certificates", json=body))

        threads = [threading.Thread(target=enrol) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert [a.status_code for a in answers] == [200, 200], [a.text for a in answers]
        assert answers[0].json() == answers[1].json()
        certs, audited = recorded(faulty, tid, host_policy, fingerprints(answers[0].json()))
        assert [x["certificate"] for x in answers[0].json()["certificates"]] == certs and audited == 1
