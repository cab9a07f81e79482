"""functions.core.certificate: Grant -> OpenSSH user certificate, and the final check on it.

Golden certificate
------------------
`golden_certificate()` builds a certificate from fixed inputs only (CA seed, user key, clock, serial,
nonce); its line must equal tests/unit/golden/user-cert.pub byte for byte, and `ssh-keygen -L`
must read back what the grant says. When the certificate format changes on purpose, regenerate
the file deliberately, from the repository root, and review the diff:

    .venv/bin/python -m tests.unit.test_certificate --regen
"""

from __future__ import annotations

import contextlib

import base64
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.serialization import ssh

from functions.core.serials import new_serial
from functions.core.certificate import (
    DEFAULT_BACKDATE,
    MAX_SERIAL,
    Grant,
    IssuedCertificate,
    build_certificate,
    verify_issued,
)
from functions.core.errors import IntegrityError, InvalidRequest
from functions.core.keys import fingerprint, parse_public_key
from functions.core.evaluation import make_grant
from functions.core.policy import Identity
from functions.core.policydoc import policy_from_document

from tests.realparts import needs_tool

from .test_keys import fixed_ed25519, openssh_of, private_key

SSH_KEYGEN = shutil.which("ssh-keygen")
needs_ssh_keygen = needs_tool("ssh-keygen")

GOLDEN_FILE = Path(__file__).parent / "golden" / "user-cert.pub"

# ---- fixed inputs of the golden certificate -------------------------------------------------

GOLDEN_TENANT = "11111111-2222-3333-4444-555555555555"
GOLDEN_NOW = 1_700_000_000  # 2023-11-14T22:13:20Z
GOLDEN_SERIAL = 0x1234_5678_9ABC_DEF0
GOLDEN_NONCE = b"\x01" * 32
GOLDEN_REQUEST = "req-0001"
GOLDEN_UPN = "alice@contoso.example"
GOLDEN_OID = "a11ce000-0000-4000-8000-000000000001"
GOLDEN_PRINCIPAL = "deploy"
GOLDEN_TTL = 1800
GOLDEN_POLICY_DOC = {
    "id": "prod-web",
    "name": "Production web servers",
    "rules": [{"users": [GOLDEN_OID], "action": "auto"}],
    "hosts": ["web*.contoso.example", "10.20.0.0/16"],
    "principals": ["deploy", "alice"],
    "default_ttl": 900,
    "max_ttl": 7200,
    "extensions": ["permit-pty", "permit-port-forwarding", "permit-agent-forwarding"],
    "force_command": "/usr/local/bin/session-recorder --policy prod-web",
    "source_address": ["10.0.0.0/8", "192.168.10.0/24"],
}


def golden_ca() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.from_private_bytes(bytes(range(32)))


def golden_user_key():
    return parse_public_key(openssh_of(ed25519.Ed25519PrivateKey.from_private_bytes(bytes(range(32, 64))).public_key())
                            + " alice@laptop")


def golden_grant() -> Grant:
    policy = policy_from_document(GOLDEN_POLICY_DOC, tenant_id=GOLDEN_TENANT)
    who = Identity(oid=GOLDEN_OID, tid=GOLDEN_TENANT, upn=GOLDEN_UPN)
    return make_grant(policy, GOLDEN_REQUEST, who, GOLDEN_PRINCIPAL, GOLDEN_TTL)


@contextlib.contextmanager
def pinned_nonce(nonce: bytes):
    """cryptography draws the certificate nonce from `os.urandom` inside SSHCertificateBuilder.sign;
    the golden tests pin it by swapping that module's `os` for the duration (the test's own patch)."""

    class FixedOs:
        def __getattr__(self, name: str):
            return getattr(os, name)

        @staticmethod
        def urandom(n: int) -> bytes:
            if n != len(nonce):
                raise ValueError("pinned nonce has the wrong length")
            return nonce

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ssh, "os", FixedOs())
        yield


def golden_certificate() -> IssuedCertificate:
    with pinned_nonce(GOLDEN_NONCE):
        return build_certificate(golden_grant(), golden_user_key(), golden_ca(), now=GOLDEN_NOW,
                                 serial=GOLDEN_SERIAL)


def regenerate_golden() -> Path:
    GOLDEN_FILE.parent.mkdir(parents=True, exist_ok=True)
    GOLDEN_FILE.write_text(golden_certificate().openssh + "\n")
    return GOLDEN_FILE


# ---- helpers ---------------------------------------------------------------------------------


def ssh_keygen_list(line: str, tmp_path: Path) -> dict:
    """`ssh-keygen -L` on a certificate line, parsed into a dict (lists for the three sections)."""
    path = tmp_path / "cert.pub"
    path.write_text(line + "\n")
    proc = subprocess.run([SSH_KEYGEN, "-L", "-f", str(path)], capture_output=True, text=True,
                          env={**os.environ, "TZ": "UTC"})
    if proc.returncode != 0:
        raise AssertionError(f"ssh-keygen -L failed ({proc.returncode}): {proc.stderr.strip()}")
    out: dict = {}
    section = None
    for raw in proc.stdout.splitlines()[1:]:
        if not raw.strip():
            continue
        indent = len(raw) - len(raw.lstrip())
        if section is not None and indent > 8:
            out[section].append(raw.strip())
            continue
        key, _, value = raw.strip().partition(":")
        value = value.strip()
        if key in ("Principals", "Critical Options", "Extensions"):
            section = key
            out[key] = [] if value in ("", "(none)") else [value]
        else:
            section = None
            out[key] = value
    return out


def parse_validity(valid: str) -> tuple[int, int]:
    # "from 2023-11-14T22:12:20 to 2023-11-14T22:43:20", printed in UTC because TZ=UTC
    words = valid.split()
    assert words[0] == "from" and words[2] == "to", valid

    def ts(s: str) -> int:
        return int(datetime.strptime(s, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=timezone.utc).timestamp())

    return ts(words[1]), ts(words[3])


def grant(**over) -> Grant:
    base = dict(
        tenant_id="tid-1",
        policy_id="pol",
        request_id="req-42",
        upn="bob@contoso.example",
        principals=("bob",),
        ttl_seconds=3600,
        extensions=("permit-pty",),
        critical_options=(),
    )
    base.update(over)
    return Grant(**base)


def user_key(kind: str = "ed25519"):
    return parse_public_key(openssh_of(private_key(kind).public_key()))


NOW = 1_750_000_000


# ---- fields of a built certificate -----------------------------------------------------------


def test_every_field_of_a_built_certificate():
    g = grant(
        principals=("deploy",),
        ttl_seconds=1234,
        extensions=("permit-port-forwarding", "permit-pty"),
        critical_options=(("force-command", "/bin/echo hi"), ("source-address", "10.0.0.0/8")),
        backdate_seconds=90,
    )
    key = user_key()
    ca = fixed_ed25519(3)
    issued = build_certificate(g, key, ca, now=NOW, serial=987654321)
    cert = issued.certificate

    assert cert.type == ssh.SSHCertificateType.USER
    assert cert.valid_principals == [b"deploy"]
    assert cert.key_id == b"ezssh/pol/req-42/bob@contoso.example"
    assert cert.serial == 987654321
    assert cert.valid_after == NOW - 90
    assert cert.valid_before == NOW + 1234
    assert cert.extensions == {b"permit-port-forwarding": b"", b"permit-pty": b""}
    assert cert.critical_options == {b"force-command": b"/bin/echo hi", b"source-address": b"10.0.0.0/8"}
    assert openssh_of(cert.public_key()) == key.openssh
    assert openssh_of(cert.signature_key()) == openssh_of(ca.public_key())
    cert.verify_cert_signature()

    assert issued.serial == 987654321
    assert issued.key_id == "ezssh/pol/req-42/bob@contoso.example"
    assert issued.principals == ("deploy",)
    assert (issued.valid_after, issued.valid_before) == (NOW - 90, NOW + 1234)
    assert issued.extensions == ("permit-port-forwarding", "permit-pty")
    assert issued.critical_options == (("force-command", "/bin/echo hi"), ("source-address", "10.0.0.0/8"))
    assert issued.ca_fingerprint == fingerprint(ca.public_key())
    kind, b64, comment = issued.openssh.split(" ")
    assert kind == "ssh-ed25519-cert-v01@openssh.com"
    assert comment == issued.key_id
    assert b64.encode() == cert.public_bytes().split()[1]
    assert ssh.load_ssh_public_identity(issued.openssh.encode()).public_bytes() == cert.public_bytes()


def test_default_backdate_is_sixty_seconds():
    issued = build_certificate(grant(), user_key(), fixed_ed25519(3), now=NOW, serial=1)
    assert DEFAULT_BACKDATE == 60
    assert issued.certificate.valid_after == NOW - 60
    assert issued.certificate.valid_before == NOW + 3600


def test_no_critical_options_unless_the_grant_has_them():
    issued = build_certificate(grant(extensions=()), user_key(), fixed_ed25519(3), now=NOW, serial=1)
    assert issued.certificate.critical_options == {}
    assert issued.certificate.extensions == {}


def test_critical_options_come_only_from_the_policy():
    doc = {
        "id": "locked",
        "rules": [{"users": ["*"], "action": "auto"}],
        "hosts": ["*"],
        "principals": ["ops"],
        "force_command": "/usr/bin/rbash",
        "source_address": ["10.1.0.0/16"],
        "extensions": [],
    }
    policy = policy_from_document(doc, tenant_id="t")
    g = make_grant(policy, "r1", Identity(oid="o", tid="t", upn="x@y"), "ops", 600)
    issued = build_certificate(g, user_key(), fixed_ed25519(3), now=NOW, serial=5)
    assert issued.certificate.critical_options == {b"force-command": b"/usr/bin/rbash",
                                                   b"source-address": b"10.1.0.0/16"}
    assert issued.certificate.extensions == {}

    open_policy = replace(policy, force_command=None, source_address=())
    issued = build_certificate(make_grant(open_policy, "r1", Identity(oid="o", tid="t", upn="x@y"), "ops", 600), user_key(), fixed_ed25519(3),
                               now=NOW, serial=5)
    assert issued.certificate.critical_options == {}


def test_empty_principals_refused():
    with pytest.raises(InvalidRequest) as info:
        build_certificate(grant(principals=()), user_key(), fixed_ed25519(3), now=NOW, serial=1)
    assert "principal" in info.value.message


@pytest.mark.parametrize("serial", [0, -1, MAX_SERIAL + 1, 2**64 - 1])
def test_bad_serials_refused(serial):
    with pytest.raises(InvalidRequest) as info:
        build_certificate(grant(), user_key(), fixed_ed25519(3), now=NOW, serial=serial)
    assert "serial" in info.value.message


def test_largest_63_bit_serial_is_fine():
    issued = build_certificate(grant(), user_key(), fixed_ed25519(3), now=NOW, serial=MAX_SERIAL)
    assert issued.certificate.serial == 2**63 - 1


def test_pinned_nonce_makes_output_stable_and_random_nonce_does_not():
    args = (grant(), user_key(), fixed_ed25519(3))
    with pinned_nonce(b"\x07" * 32):
        a = build_certificate(*args, now=NOW, serial=9)
        b = build_certificate(*args, now=NOW, serial=9)
    c = build_certificate(*args, now=NOW, serial=9)
    d = build_certificate(*args, now=NOW, serial=9)
    assert a.openssh == b.openssh
    assert c.openssh != d.openssh != a.openssh
    assert a.certificate.nonce == b"\x07" * 32
    assert ssh.os is os  # the swap is undone


def test_wrong_nonce_length_fails_and_restores_os():
    with pytest.raises(ValueError), pinned_nonce(b"\x07" * 16):
        build_certificate(grant(), user_key(), fixed_ed25519(3), now=NOW, serial=9)
    assert ssh.os is os


# ---- the final check -------------------------------------------------------------------------

CA_KINDS = ["ed25519", "ecdsa256", "ecdsa384", "ecdsa521", "rsa2048"]


@pytest.mark.parametrize("ca_kind", CA_KINDS)
@pytest.mark.parametrize("user_kind", ["ed25519", "ecdsa256", "rsa3072"])
def test_verify_issued_passes_for_a_good_certificate(ca_kind, user_kind):
    ca = private_key(ca_kind)
    key = user_key(user_kind)
    g = grant(critical_options=(("source-address", "192.168.0.0/16"),))
    issued = build_certificate(g, key, ca, now=NOW, serial=new_serial(NOW))
    verify_issued(issued, g, key, ca.public_key(), now=NOW)
    # Checking a little later is fine too (the signer may be slow); earlier would look too long.
    verify_issued(issued, g, key, ca.public_key(), now=NOW + 5)


def check_fails(issued, g, key, ca_pub, *, now=NOW, because: str, **kw):
    with pytest.raises(IntegrityError) as info:
        verify_issued(issued, g, key, ca_pub, now=now, **kw)
    assert because in info.value.message, info.value.message
    assert info.value.status == 500 and info.value.code == "internal_error"
    return info.value


def test_signed_by_a_different_ca_is_caught():
    key, g = user_key(), grant()
    issued = build_certificate(g, key, fixed_ed25519(4), now=NOW, serial=1)
    check_fails(issued, g, key, fixed_ed25519(3).public_key(), because="signed by an unexpected CA")


def test_principals_outside_the_grant_are_caught():
    key = user_key()
    issued = build_certificate(grant(principals=("root",)), key, fixed_ed25519(3), now=NOW, serial=1)
    check_fails(issued, grant(principals=("bob",)), key, fixed_ed25519(3).public_key(),
                because="principals outside the grant")


def test_validity_longer_than_the_grant_is_caught():
    key, ca = user_key(), fixed_ed25519(3)
    issued = build_certificate(grant(ttl_seconds=7200), key, ca, now=NOW, serial=1)
    check_fails(issued, grant(ttl_seconds=3600), key, ca.public_key(), because="validity longer than the grant")
    # and the same certificate checked with an earlier clock
    issued = build_certificate(grant(), key, ca, now=NOW, serial=1)
    check_fails(issued, grant(), key, ca.public_key(), now=NOW - 1, because="validity longer than the grant")


def test_key_id_critical_options_and_extensions_are_compared_with_the_grant():
    key, ca = user_key(), fixed_ed25519(3)
    issued = build_certificate(grant(), key, ca, now=NOW, serial=1)
    check_fails(issued, grant(request_id="req-43"), key, ca.public_key(), because="key id differs")
    check_fails(issued, grant(critical_options=(("force-command", "/bin/true"),)), key, ca.public_key(),
                because="critical options differ")

    wide = build_certificate(grant(extensions=("permit-pty", "permit-X11-forwarding")), key, ca, now=NOW, serial=1)
    check_fails(wide, grant(), key, ca.public_key(), because="extensions outside the grant")

    forced = build_certificate(grant(critical_options=(("force-command", "/bin/true"),)), key, ca, now=NOW, serial=1)
    check_fails(forced, grant(), key, ca.public_key(), because="critical options differ")


def test_certificate_for_another_key_is_caught():
    ca = fixed_ed25519(3)
    issued = build_certificate(grant(), user_key("ed25519"), ca, now=NOW, serial=1)
    check_fails(issued, grant(), user_key("ecdsa256"), ca.public_key(), because="certified key is not the user's key")


def test_flipped_signature_bit_is_caught():
    key, ca, g = user_key(), fixed_ed25519(3), grant()
    issued = build_certificate(g, key, ca, now=NOW, serial=1)
    kind, b64, comment = issued.openssh.split(" ")
    blob = bytearray(base64.b64decode(b64))
    blob[-5] ^= 0x01  # inside the Ed25519 signature, the last field
    tampered = replace(issued, openssh=f"{kind} {base64.b64encode(bytes(blob)).decode()} {comment}")
    check_fails(tampered, g, key, ca.public_key(), because="signature does not verify")


def test_injected_signature_verifier_is_used():
    key, ca, g = user_key(), fixed_ed25519(3), grant()
    issued = build_certificate(g, key, ca, now=NOW, serial=1)
    seen = []

    def refuse(cert):
        seen.append(cert.serial)
        raise InvalidSignature()

    check_fails(issued, g, key, ca.public_key(), because="signature does not verify", verify_signature=refuse)
    assert seen == [1]
    verify_issued(issued, g, key, ca.public_key(), now=NOW, verify_signature=lambda cert: None)


def test_all_problems_are_reported_together():
    key, ca = user_key(), fixed_ed25519(3)
    issued = build_certificate(grant(principals=("root",), ttl_seconds=7200), key, fixed_ed25519(4), now=NOW,
                               serial=1)
    err = check_fails(issued, grant(), key, ca.public_key(), because="principals outside the grant")
    for part in ("validity longer than the grant", "signed by an unexpected CA"):
        assert part in err.message


def test_a_plain_key_in_place_of_the_certificate_is_caught():
    key, ca, g = user_key(), fixed_ed25519(3), grant()
    issued = build_certificate(g, key, ca, now=NOW, serial=1)
    check_fails(replace(issued, openssh=key.openssh), g, key, ca.public_key(), because="does not parse as a certificate")


# ---- checked by ssh-keygen -------------------------------------------------------------------


@needs_ssh_keygen
@pytest.mark.parametrize("ca_kind,alg", [("ed25519", "ssh-ed25519"), ("ecdsa256", "ecdsa-sha2-nistp256"),
                                         ("ecdsa384", "ecdsa-sha2-nistp384"), ("ecdsa521", "ecdsa-sha2-nistp521"),
                                         ("rsa2048", "rsa-sha2-512")])
@pytest.mark.parametrize("user_kind,label", [("ed25519", "ED25519-CERT"), ("ecdsa384", "ECDSA-CERT"),
                                             ("rsa2048", "RSA-CERT")])
def test_ssh_keygen_reads_every_ca_and_user_key_type(ca_kind, alg, user_kind, label, tmp_path):
    ca, key = private_key(ca_kind), user_key(user_kind)
    issued = build_certificate(grant(), key, ca, now=NOW, serial=31337)
    out = ssh_keygen_list(issued.openssh, tmp_path)
    assert out["Public key"] == f"{label} {key.fingerprint}"
    assert out["Signing CA"].endswith(f"{issued.ca_fingerprint} (using {alg})")
    assert out["Serial"] == "31337"
    assert out["Principals"] == ["bob"]


@needs_ssh_keygen
def test_ssh_keygen_refuses_a_flipped_signature_bit(tmp_path):
    issued = build_certificate(grant(), user_key(), fixed_ed25519(3), now=NOW, serial=1)
    kind, b64, comment = issued.openssh.split(" ")
    blob = bytearray(base64.b64decode(b64))
    blob[-5] ^= 0x01
    with pytest.raises(AssertionError, match="ssh-keygen -L failed"):
        ssh_keygen_list(f"{kind} {base64.b64encode(bytes(blob)).decode()} {comment}", tmp_path)


# ---- golden certificate ----------------------------------------------------------------------


def test_golden_certificate_is_byte_identical():
    assert GOLDEN_FILE.exists(), f"missing {GOLDEN_FILE}; see this module's docstring to regenerate it"
    expected = GOLDEN_FILE.read_text()
    assert expected.endswith("\n") and expected.count("\n") == 1
    actual = golden_certificate().openssh + "\n"
    assert actual == expected


def test_golden_inputs_are_what_they_claim():
    g = golden_grant()
    assert g.principals == ("deploy",)
    assert g.ttl_seconds == GOLDEN_TTL
    assert g.extensions == ("permit-agent-forwarding", "permit-port-forwarding", "permit-pty")
    assert g.critical_options == (
        ("force-command", "/usr/local/bin/session-recorder --policy prod-web"),
        ("source-address", "10.0.0.0/8,192.168.10.0/24"),
    )
    issued = golden_certificate()
    assert issued.certificate.nonce == GOLDEN_NONCE
    verify_issued(issued, g, golden_user_key(), golden_ca().public_key(), now=GOLDEN_NOW)


@needs_ssh_keygen
def test_golden_certificate_as_ssh_keygen_reads_it(tmp_path):
    g = golden_grant()
    user = golden_user_key()
    out = ssh_keygen_list(GOLDEN_FILE.read_text().strip(), tmp_path)

    assert out["Type"] == "ssh-ed25519-cert-v01@openssh.com user certificate"
    assert out["Public key"] == f"ED25519-CERT {user.fingerprint}"
    assert out["Signing CA"] == f"ED25519 {fingerprint(golden_ca().public_key())} (using ssh-ed25519)"
    assert out["Key ID"] == f'"ezssh/prod-web/{GOLDEN_REQUEST}/{GOLDEN_UPN}"' == f'"{g.key_id}"'
    assert out["Serial"] == str(GOLDEN_SERIAL)
    assert parse_validity(out["Valid"]) == (GOLDEN_NOW - g.backdate_seconds, GOLDEN_NOW + g.ttl_seconds)
    assert out["Valid"] == "from 2023-11-14T22:12:20 to 2023-11-14T22:43:20"
    assert out["Principals"] == list(g.principals) == ["deploy"]
    assert out["Critical Options"] == [f"{k} {v}" for k, v in g.critical_options]
    assert out["Extensions"] == list(g.extensions)


if __name__ == "__main__":
    if sys.argv[1:] != ["--regen"]:
        sys.exit("usage: python -m tests.unit.test_certificate --regen   (rewrites the golden certificate)")
    print(f"wrote {regenerate_golden()}")


def test_final_check_refuses_a_record_that_differs_from_the_signed_certificate():
    """What storage and the audit record (serial, validity) must be what was signed."""
    import dataclasses

    from functions.core.certificate import build_certificate, verify_issued
    from functions.core.errors import IntegrityError

    g = grant()
    key = user_key()
    ca = fixed_ed25519(7)
    issued = build_certificate(g, key, ca, now=NOW, serial=42)
    verify_issued(issued, g, key, ca.public_key(), now=NOW)
    for change in ({"serial": 43}, {"valid_before": issued.valid_before - 1}, {"valid_after": issued.valid_after + 1}):
        with pytest.raises(IntegrityError, match="differs from what will be recorded"):
            verify_issued(dataclasses.replace(issued, **change), g, key, ca.public_key(), now=NOW)
