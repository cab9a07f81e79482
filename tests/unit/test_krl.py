"""KRL encoding (functions/core/krl.py), checked by OpenSSH itself: `ssh-keygen -Q`."""

from __future__ import annotations

import struct
import subprocess
import time
from pathlib import Path

import pytest

from tests.realparts import needs_tool
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import ssh

from functions.core.krl import (
    MAGIC,
    CaRevocations,
    KrlError,
    encode_krl,
    header_length,
    krl_version_of,
    serial_runs,
)

pytestmark = needs_tool("ssh-keygen")


def openssh(pub) -> str:
    return pub.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()


def fp(pub) -> str:
    import base64
    import hashlib

    blob = base64.b64decode(openssh(pub).split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


@pytest.fixture(scope="module")
def cas():
    return {"ec": ec.generate_private_key(ec.SECP256R1()), "ed": ed25519.Ed25519PrivateKey.generate(),
            "rsa": rsa.generate_private_key(public_exponent=65537, key_size=2048)}


@pytest.fixture(scope="module")
def user_pub():
    return ed25519.Ed25519PrivateKey.generate().public_key()


def cert(tmp: Path, ca, user_pub, serial: int, key_id: str = "ezssh/test") -> Path:
    now = int(time.time())
    c = (ssh.SSHCertificateBuilder().public_key(user_pub).serial(serial).type(ssh.SSHCertificateType.USER)
         .key_id(key_id.encode()).valid_principals([b"alice"]).valid_after(now - 60).valid_before(now + 600)
         .sign(ca))
    path = tmp / f"cert-{serial}-{abs(hash(key_id))}.pub"
    path.write_bytes(c.public_bytes() + b"\n")
    return path


def query(krl: Path, *certs: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["ssh-keygen", "-Q", "-f", str(krl), *map(str, certs)], capture_output=True, text=True)


def listing(krl: Path) -> str:
    r = subprocess.run(["ssh-keygen", "-Q", "-l", "-f", str(krl)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return r.stdout


def write(tmp: Path, data: bytes, name: str = "krl") -> Path:
    p = tmp / name
    p.write_bytes(data)
    return p


def test_empty_krl_is_valid_and_revokes_nothing(tmp_path, cas, user_pub):
    krl = write(tmp_path, encode_krl([]))
    assert krl.read_bytes().startswith(MAGIC) and len(krl.read_bytes()) == 44
    assert "# KRL version 0" in listing(krl)
    c = cert(tmp_path, cas["ec"], user_pub, 42)
    r = query(krl, c)
    assert r.returncode == 0 and r.stdout.strip().endswith(": ok")


def test_header_fields_and_comment(tmp_path):
    data = encode_krl([], krl_version=7, generated_date=1_700_000_000, comment="ezssh policy demo")
    text = listing(write(tmp_path, data))
    assert "# KRL version 7" in text
    assert "# Generated at 20231114T" in text
    assert "# Comment: ezssh policy demo" in text
    assert krl_version_of(data) == 7 and header_length(data) == 44 + len("ezssh policy demo")


def test_revoked_serial_is_reported_revoked_and_others_ok(tmp_path, cas, user_pub):
    ca = cas["ec"]
    krl = write(tmp_path, encode_krl([CaRevocations(openssh(ca.public_key()), frozenset({1001, 5}))]))
    revoked, other = cert(tmp_path, ca, user_pub, 1001), cert(tmp_path, ca, user_pub, 1002)
    r = query(krl, revoked)
    assert r.returncode == 1 and "REVOKED" in r.stdout
    r = query(krl, other)
    assert r.returncode == 0 and r.stdout.strip().endswith(": ok")


def test_listing_shows_cas_serials_ranges_and_key_ids(tmp_path, cas):
    ec_line, ed_line = openssh(cas["ec"].public_key()), openssh(cas["ed"].public_key())
    data = encode_krl([
        CaRevocations(ec_line, frozenset({10, 20, 21, 30, 31, 32, 33}), frozenset({"ezssh/demo/r1/bob@x"})),
        CaRevocations(ed_line, frozenset({2**63 - 1})),
    ])
    text = listing(write(tmp_path, data))
    ec_block = text.split(f"# CA key ecdsa-sha2-nistp256 {fp(cas['ec'].public_key())}")[1].split("# CA key")[0]
    assert "serial: 10\n" in ec_block
    # ssh-keygen shows consecutive serials as ranges whatever the encoding (sizes: see below)
    assert "serial: 20-21\n" in ec_block
    assert "serial: 30-33\n" in ec_block
    assert "id: ezssh/demo/r1/bob@x" in ec_block
    assert f"# CA key ssh-ed25519 {fp(cas['ed'].public_key())}" in text
    assert f"serial: {2**63 - 1}" in text


def test_several_cas_in_one_krl_each_revokes_only_its_own(tmp_path, cas, user_pub):
    lines = {k: openssh(v.public_key()) for k, v in cas.items()}
    krl = write(tmp_path, encode_krl([CaRevocations(lines["ec"], frozenset({7})),
                                      CaRevocations(lines["rsa"], frozenset({8})),
                                      CaRevocations(lines["ed"], frozenset(), frozenset({"only-this-id"}))]))
    assert query(krl, cert(tmp_path, cas["ec"], user_pub, 7)).returncode == 1
    assert query(krl, cert(tmp_path, cas["rsa"], user_pub, 8)).returncode == 1
    assert query(krl, cert(tmp_path, cas["ed"], user_pub, 7)).returncode == 0  # serial 7 of another CA
    assert query(krl, cert(tmp_path, cas["ec"], user_pub, 8)).returncode == 0
    assert query(krl, cert(tmp_path, cas["ed"], user_pub, 9, "only-this-id")).returncode == 1
    assert query(krl, cert(tmp_path, cas["ed"], user_pub, 9, "another-id")).returncode == 0


def test_ranges_revoke_their_ends_and_middle_but_not_neighbours(tmp_path, cas, user_pub):
    ca = cas["ed"]
    krl = write(tmp_path, encode_krl([CaRevocations(openssh(ca.public_key()), frozenset(range(100, 200)))]))
    assert "serial: 100-199" in listing(krl)
    for s, revoked in ((99, False), (100, True), (150, True), (199, True), (200, False)):
        assert (query(krl, cert(tmp_path, ca, user_pub, s)).returncode == 1) is revoked, s


def test_compact_encoding_sizes():
    line = openssh(ec.generate_private_key(ec.SECP256R1()).public_key())
    base = len(encode_krl([CaRevocations(line, frozenset({1}))]))
    # three separate serials: one list subsection, 8 bytes each
    assert len(encode_krl([CaRevocations(line, frozenset({1, 3, 5}))])) == base + 16
    # a run of 1000 is one 21-byte range subsection, no matter its length
    run = len(encode_krl([CaRevocations(line, frozenset(range(1, 1001)))]))
    assert run == base - (1 + 4 + 8) + 21
    assert serial_runs([5, 1, 2, 3, 3, 9]) == [(1, 3), (5, 5), (9, 9)]


def test_output_is_byte_stable_and_order_independent():
    a = openssh(ed25519.Ed25519PrivateKey.generate().public_key())
    b = openssh(ec.generate_private_key(ec.SECP256R1()).public_key())
    one = encode_krl([CaRevocations(a, frozenset({3, 1})), CaRevocations(b, frozenset({2}))], krl_version=5)
    two = encode_krl([CaRevocations(b, frozenset({2})), CaRevocations(a, frozenset({1, 3}))], krl_version=5)
    assert one == two


def test_concatenated_sections_of_two_krls_are_one_valid_krl(tmp_path, cas, user_pub):
    """What hosts do to merge policies: one header, then each KRL's sections."""
    k1 = encode_krl([CaRevocations(openssh(cas["ec"].public_key()), frozenset({11}))], comment="one")
    k2 = encode_krl([CaRevocations(openssh(cas["ed"].public_key()), frozenset({12}))], comment="policy two")
    merged = write(tmp_path, encode_krl([]) + k1[header_length(k1):] + k2[header_length(k2):])
    assert query(merged, cert(tmp_path, cas["ec"], user_pub, 11)).returncode == 1
    assert query(merged, cert(tmp_path, cas["ed"], user_pub, 12)).returncode == 1
    assert query(merged, cert(tmp_path, cas["ed"], user_pub, 11)).returncode == 0


@pytest.mark.parametrize("bad", [0, -1, 2**64, "7", True])
def test_bad_serials_are_refused(bad):
    line = openssh(ed25519.Ed25519PrivateKey.generate().public_key())
    with pytest.raises(KrlError):
        encode_krl([CaRevocations(line, frozenset({bad}))])


def test_bad_ca_keys_and_headers_are_refused():
    with pytest.raises(KrlError):
        encode_krl([CaRevocations("ssh-ed25519", frozenset({1}))])
    with pytest.raises(KrlError):
        encode_krl([CaRevocations("ssh-ed25519 !!notbase64!!", frozenset({1}))])
    line = openssh(ed25519.Ed25519PrivateKey.generate().public_key())
    with pytest.raises(KrlError):  # the blob says ssh-ed25519, the line says otherwise
        encode_krl([CaRevocations("ssh-rsa " + line.split()[1], frozenset({1}))])
    with pytest.raises(KrlError):
        header_length(b"not a krl at all, but long enough to have a header.....")
    with pytest.raises(KrlError):
        header_length(encode_krl([], comment="abc")[:45])
    assert struct.unpack(">I", encode_krl([])[8:12]) == (1,)
