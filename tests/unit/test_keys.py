"""functions.core.keys: which user public keys are accepted, which are refused and how.

Fingerprints are checked against `ssh-keygen -lf`, not against our own arithmetic.
"""

from __future__ import annotations

import base64
import shutil
import struct
import subprocess
import warnings
from pathlib import Path

import pytest

from tests.realparts import needs_tool
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from functions.core import keys
from functions.core.errors import EzsshError, InvalidPublicKey, WeakPublicKey
from functions.core.keys import MAX_KEY_TEXT, VettedKey, fingerprint, fingerprint_of_blob, parse_public_key

SSH_KEYGEN = shutil.which("ssh-keygen")
needs_ssh_keygen = needs_tool("ssh-keygen")

# ---- helpers shared with the other unit test modules (no test_ prefix: pytest must not collect them)


def sshstr(b: bytes | str) -> bytes:
    if isinstance(b, str):
        b = b.encode()
    return struct.pack(">I", len(b)) + b


def mpint(n: int) -> bytes:
    if n == 0:
        return sshstr(b"")
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    if raw[0] & 0x80:
        raw = b"\x00" + raw  # positive numbers keep a zero sign byte
    return sshstr(raw)


def openssh_of(public_key) -> str:
    return public_key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()


def line_of(key_type: str, blob: bytes, comment: str = "") -> str:
    return f"{key_type} {base64.b64encode(blob).decode()}" + (f" {comment}" if comment else "")


def blob_of(line: str) -> bytes:
    return base64.b64decode(line.split()[1])


def fixed_ed25519(seed: int = 7) -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.from_private_bytes(bytes([seed]) * 32)


_KEY_CACHE: dict[str, object] = {}


def private_key(kind: str):
    """One private key per kind per test session (RSA generation is slow)."""
    if kind not in _KEY_CACHE:
        if kind == "ed25519":
            k = ed25519.Ed25519PrivateKey.generate()
        elif kind.startswith("ecdsa"):
            curve = {"ecdsa256": ec.SECP256R1, "ecdsa384": ec.SECP384R1, "ecdsa521": ec.SECP521R1}[kind]()
            k = ec.generate_private_key(curve)
        elif kind.startswith("rsa"):
            k = rsa.generate_private_key(public_exponent=65537, key_size=int(kind[3:]))
        else:  # pragma: no cover
            raise KeyError(kind)
        _KEY_CACHE[kind] = k
    return _KEY_CACHE[kind]


def ssh_keygen_fingerprint(line: str, tmp_path: Path) -> tuple[int, str, str]:
    path = tmp_path / "key.pub"
    path.write_text(line + "\n")
    out = subprocess.run([SSH_KEYGEN, "-l", "-E", "sha256", "-f", str(path)], capture_output=True, text=True,
                         check=True).stdout.split()
    # "256 SHA256:abc... comment (ED25519)"
    return int(out[0]), out[1], out[-1]


# ---- accepted ------------------------------------------------------------------------------

ACCEPTED = [
    ("ed25519", "ssh-ed25519", 256, "(ED25519)"),
    ("ecdsa256", "ecdsa-sha2-nistp256", 256, "(ECDSA)"),
    ("ecdsa384", "ecdsa-sha2-nistp384", 384, "(ECDSA)"),
    ("ecdsa521", "ecdsa-sha2-nistp521", 521, "(ECDSA)"),
    ("rsa2048", "ssh-rsa", 2048, "(RSA)"),
    ("rsa3072", "ssh-rsa", 3072, "(RSA)"),
]


@needs_ssh_keygen
@pytest.mark.parametrize("kind,key_type,bits,label", ACCEPTED, ids=[a[0] for a in ACCEPTED])
def test_accepted_key_types_and_fingerprint_matches_ssh_keygen(kind, key_type, bits, label, tmp_path):
    pub = private_key(kind).public_key()
    line = openssh_of(pub)
    vetted = parse_public_key(line + " alice@laptop")

    assert isinstance(vetted, VettedKey)
    assert vetted.key_type == key_type
    assert vetted.bits == bits
    assert vetted.openssh == line  # comment dropped, type and base64 exactly as ssh writes them
    assert openssh_of(vetted.key) == line
    kg_bits, kg_fp, kg_label = ssh_keygen_fingerprint(line + " alice@laptop", tmp_path)
    assert vetted.fingerprint == kg_fp
    assert kg_bits == bits and kg_label == label
    assert fingerprint(pub) == kg_fp
    assert fingerprint_of_blob(blob_of(line)) == kg_fp


def test_fingerprint_format_is_unpadded_base64_of_sha256():
    fp = fingerprint_of_blob(b"")
    # SHA-256 of the empty string, base64 without '='
    assert fp == "SHA256:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU"


def test_surrounding_whitespace_and_comment_with_spaces_are_fine():
    line = openssh_of(fixed_ed25519().public_key())
    vetted = parse_public_key(f"  \t{line} my laptop key (work)  \n")
    assert vetted.openssh == line
    assert vetted.key_type == "ssh-ed25519"


def test_non_canonical_base64_is_accepted_and_normalised():
    # A P-256 blob is 104 bytes: its base64 ends in one '=' and the last character carries two
    # unused bits. Setting one decodes to the same bytes; the vetted line must be canonical, or the
    # certificate's final check would not recognise the key.
    line = openssh_of(private_key("ecdsa256").public_key())
    key_type, b64 = line.split()
    assert b64.endswith("=") and not b64.endswith("==")
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    tweaked = b64[:-2] + alphabet[alphabet.index(b64[-2]) ^ 1] + b64[-1]
    assert tweaked != b64 and base64.b64decode(tweaked) == base64.b64decode(b64)

    vetted = parse_public_key(f"{key_type} {tweaked}")
    assert vetted.openssh == line


# ---- refused -------------------------------------------------------------------------------


def refused(text, error_class) -> EzsshError:
    with pytest.raises(EzsshError) as info:
        parse_public_key(text)
    assert type(info.value) is error_class, f"{type(info.value).__name__}: {info.value}"
    assert info.value.message == str(info.value)
    assert info.value.message.endswith("."), "messages are one clear sentence"
    return info.value


def test_dsa_key_made_by_cryptography_is_refused_as_weak():
    from cryptography.hazmat.primitives.asymmetric import dsa

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # cryptography deprecates DSA ssh keys; that is the point here
        line = openssh_of(dsa.generate_private_key(key_size=1024).public_key())  # SSH DSA: 1024 bits only
    assert line.startswith("ssh-dss ")
    err = refused(line, WeakPublicKey)
    assert "DSA" in err.message and "ed25519" in err.message
    assert err.status == 400 and err.code == "weak_public_key"


def test_dsa_key_blob_crafted_by_hand_is_refused_as_weak():
    blob = sshstr("ssh-dss") + mpint(2**1023 + 1) + mpint(2**159 + 7) + mpint(2) + mpint(12345)
    err = refused(line_of("ssh-dss", blob), WeakPublicKey)
    assert "DSA keys are not accepted" in err.message


def test_rsa_1024_is_refused_as_weak_and_says_how_many_bits():
    line = openssh_of(rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key())
    err = refused(line, WeakPublicKey)
    assert "2048" in err.message and "1024" in err.message


def test_rsa_over_the_maximum_is_refused():
    # A hand-made modulus: the parser does not factor, only the size matters here.
    n = (1 << (keys.MAX_RSA_BITS + 8)) | 1
    blob = sshstr("ssh-rsa") + mpint(65537) + mpint(n)
    line = line_of("ssh-rsa", blob)
    assert len(line) < MAX_KEY_TEXT
    err = refused(line, InvalidPublicKey)
    assert str(keys.MAX_RSA_BITS) in err.message


def test_rsa_with_even_exponent_is_refused():
    n = (1 << 2047) | 1
    blob = sshstr("ssh-rsa") + mpint(65538) + mpint(n)
    with pytest.raises((InvalidPublicKey, WeakPublicKey)):
        parse_public_key(line_of("ssh-rsa", blob))


@pytest.mark.parametrize("kind", ["ed25519", "ecdsa256", "rsa2048"])
def test_certificate_sent_in_place_of_key_is_refused(kind):
    from cryptography.hazmat.primitives.serialization import ssh

    ca = fixed_ed25519(1)
    user = private_key(kind).public_key()
    cert = (
        ssh.SSHCertificateBuilder()
        .public_key(user)
        .serial(1)
        .type(ssh.SSHCertificateType.USER)
        .key_id(b"x")
        .valid_principals([b"alice"])
        .valid_after(0)
        .valid_before(2**40)
        .sign(ca)
    )
    line = cert.public_bytes().decode()
    assert "-cert-v01@openssh.com " in line
    err = refused(line + " comment", InvalidPublicKey)
    assert "certificate" in err.message


@pytest.mark.parametrize(
    "encoding,fmt",
    [
        (serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH),
        (serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8),
        (serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL),
    ],
    ids=["openssh", "pkcs8", "traditional"],
)
def test_private_key_pem_is_refused_with_the_private_key_message(encoding, fmt):
    pem = private_key("rsa2048").private_bytes(encoding, fmt, serialization.NoEncryption()).decode()
    assert "PRIVATE KEY" in pem and pem.count("\n") > 2
    err = refused(pem, InvalidPublicKey)
    assert "private key" in err.message
    assert "never leaves" in err.message


def test_public_key_pem_is_refused_pointing_at_the_openssh_line():
    pem = private_key("ecdsa256").public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()
    err = refused(pem, InvalidPublicKey)
    assert "PEM" in err.message and "OpenSSH" in err.message


@pytest.mark.parametrize(
    "text,needle",
    [
        ("ssh-ed25519 !!!not-base64!!!", "base64"),
        ("ssh-ed25519 AAAA*AAA", "base64"),
        ("ssh-ed25519 QUJD", "truncated"),  # 3 bytes: not even a length prefix
        ("ssh-ed25519 " + base64.b64encode(b"hello, world").decode(), "malformed"),
        ("ssh-ed25519", "<type> <base64>"),
        ("AAAAC3NzaC1lZDI1NTE5AAAAIA", "<type> <base64>"),
    ],
)
def test_garbage_is_refused(text, needle):
    err = refused(text, InvalidPublicKey)
    assert needle in err.message


def test_right_type_but_broken_key_data_does_not_parse():
    blob = sshstr("ssh-ed25519") + sshstr(b"\x00" * 10)  # ed25519 keys are 32 bytes
    err = refused(line_of("ssh-ed25519", blob), InvalidPublicKey)
    assert "32 bytes" in err.message and "10" in err.message


def test_trailing_bytes_after_the_key_do_not_parse():
    blob = blob_of(openssh_of(fixed_ed25519().public_key())) + b"\x00\x00\x00\x01x"
    refused(line_of("ssh-ed25519", blob), InvalidPublicKey)


def test_ecdsa_curve_inside_blob_must_match_the_label():
    # Claims nistp256 everywhere except in the curve name field, which says nistp384.
    real = blob_of(openssh_of(private_key("ecdsa256").public_key()))
    point = real[4 + 19 + 4 + 8:]
    blob = sshstr("ecdsa-sha2-nistp256") + sshstr("nistp384") + point
    refused(line_of("ecdsa-sha2-nistp256", blob), InvalidPublicKey)


def test_type_label_and_blob_disagree():
    ed_line = openssh_of(fixed_ed25519().public_key())
    err = refused("ssh-rsa " + ed_line.split()[1], InvalidPublicKey)
    assert "'ssh-rsa'" in err.message and "'ssh-ed25519'" in err.message


def test_label_of_a_weak_type_over_a_good_blob_is_still_a_mismatch():
    # Checking the label before the blob would let the label alone pick the message.
    ed_line = openssh_of(fixed_ed25519().public_key())
    err = refused("ssh-dss " + ed_line.split()[1], InvalidPublicKey)
    assert "ssh-dss" in err.message and "ssh-ed25519" in err.message


def test_two_lines_are_refused():
    a = openssh_of(fixed_ed25519(1).public_key())
    b = openssh_of(fixed_ed25519(2).public_key())
    assert "exactly one" in refused(f"{a}\n{b}", InvalidPublicKey).message
    assert "exactly one" in refused(f"{a}\r\n{b}", InvalidPublicKey).message
    assert "exactly one" in refused(f"{a} comment\r{b}", InvalidPublicKey).message


@pytest.mark.parametrize("text", ["", "   ", "\n\t\n", None, 42, b"ssh-ed25519 AAAA", ["ssh-ed25519 AAAA"], {}])
def test_empty_and_non_string_are_refused(text):
    err = refused(text, InvalidPublicKey)
    assert "one OpenSSH public key line" in err.message


def test_over_long_text_is_refused_before_any_parsing():
    line = openssh_of(fixed_ed25519().public_key())
    err = refused(line + " " + "c" * MAX_KEY_TEXT, InvalidPublicKey)
    assert "too long" in err.message
    # exactly at the limit is still parsed (the comment is ignored)
    padded = line + " " + "c" * (MAX_KEY_TEXT - len(line) - 1)
    assert len(padded) == MAX_KEY_TEXT
    assert parse_public_key(padded).openssh == line


@pytest.mark.parametrize(
    "key_type,payload",
    [
        ("sk-ssh-ed25519@openssh.com", sshstr(b"\x11" * 32) + sshstr("ssh:")),
        ("sk-ecdsa-sha2-nistp256@openssh.com", sshstr("nistp256") + sshstr(b"\x04" + b"\x22" * 64) + sshstr("ssh:")),
    ],
)
def test_fido_sk_keys_are_refused(key_type, payload):
    err = refused(line_of(key_type, sshstr(key_type) + payload), InvalidPublicKey)
    assert "FIDO" in err.message and "sk-" in err.message and "not supported" in err.message


@pytest.mark.parametrize("key_type", ["ssh-xmss@openssh.com", "rsa-sha2-256", "ssh-ed448", "x509v3-ssh-rsa"])
def test_other_types_are_refused_as_unsupported(key_type):
    err = refused(line_of(key_type, sshstr(key_type) + sshstr(b"\x01" * 32)), InvalidPublicKey)
    assert key_type in err.message and "not supported" in err.message


def test_error_classes_carry_http_status_and_stable_codes():
    assert (InvalidPublicKey.status, InvalidPublicKey.code) == (400, "invalid_public_key")
    assert (WeakPublicKey.status, WeakPublicKey.code) == (400, "weak_public_key")


# ---- structure and RSA numbers, as OpenSSH and Go's x/crypto/ssh check them ----------------------


def rsa_numbers(kind: str = "rsa2048") -> tuple[int, int]:
    nums = private_key(kind).public_key().public_numbers()
    return nums.e, nums.n


def rsa_line(e: int, n: int, *, e_raw: bytes | None = None, n_raw: bytes | None = None, tail: bytes = b"") -> str:
    blob = sshstr("ssh-rsa") + (sshstr(e_raw) if e_raw is not None else mpint(e)) + \
        (sshstr(n_raw) if n_raw is not None else mpint(n)) + tail
    return line_of("ssh-rsa", blob)


def test_a_real_rsa_key_rebuilt_by_hand_is_accepted():
    # the helpers below write the same bytes as cryptography: a refusal is the field we changed
    e, n = rsa_numbers()
    assert blob_of(rsa_line(e, n)) == blob_of(openssh_of(private_key("rsa2048").public_key()))
    assert parse_public_key(rsa_line(e, n)).bits == 2048


def test_rsa_with_an_even_modulus_is_refused():
    e, n = rsa_numbers()
    err = refused(rsa_line(e, n * 2), InvalidPublicKey)
    assert "modulus is even" in err.message and err.status == 400


@pytest.mark.parametrize("p", [3, 5, 7, 1999])
def test_rsa_modulus_with_a_small_prime_factor_is_refused(p):
    e, n = rsa_numbers()
    err = refused(rsa_line(e, n * p), InvalidPublicKey)
    assert f"divisible by {p}" in err.message


def test_small_primes_are_the_primes_under_2000():
    assert keys.SMALL_PRIMES[:5] == (2, 3, 5, 7, 11) and keys.SMALL_PRIMES[-1] == 1999
    assert len(keys.SMALL_PRIMES) == 303  # pi(2000)


@pytest.mark.parametrize("e,needle,cls", [(1, "odd and at least 3", WeakPublicKey),
                                          (0, "odd and at least 3", WeakPublicKey),
                                          (65536, "odd and at least 3", WeakPublicKey),
                                          (2**32 + 1, "too large", InvalidPublicKey),
                                          (2**64 + 1, "too large", InvalidPublicKey)])
def test_rsa_exponent_bounds(e, needle, cls):
    _, n = rsa_numbers()
    err = refused(rsa_line(e, n), cls)
    assert needle in err.message


def test_rsa_exponent_three_is_accepted():
    _, n = rsa_numbers()
    assert parse_public_key(rsa_line(3, n)).key_type == "ssh-rsa"


def test_rsa_mpints_must_be_canonical_and_positive():
    e, n = rsa_numbers()
    raw_n = n.to_bytes((n.bit_length() + 7) // 8, "big")
    assert raw_n[0] & 0x80  # a 2048-bit modulus needs its zero sign byte
    err = refused(rsa_line(e, n, n_raw=raw_n), InvalidPublicKey)  # sign byte missing: negative
    assert "negative" in err.message
    err = refused(rsa_line(e, n, e_raw=b"\x00\x01\x00\x01"), InvalidPublicKey)  # a needless zero byte
    assert "canonical" in err.message


def test_rsa_trailing_data_and_truncation():
    e, n = rsa_numbers()
    err = refused(rsa_line(e, n, tail=b"\x00"), InvalidPublicKey)
    assert "trailing data" in err.message
    blob = sshstr("ssh-rsa") + mpint(e)
    err = refused(line_of("ssh-rsa", blob), InvalidPublicKey)
    assert "truncated" in err.message and "modulus" in err.message


def test_ed25519_key_of_33_bytes_is_refused():
    raw = blob_of(openssh_of(fixed_ed25519().public_key()))[-32:]
    err = refused(line_of("ssh-ed25519", sshstr("ssh-ed25519") + sshstr(raw + b"\x00")), InvalidPublicKey)
    assert "32 bytes" in err.message


def _ec_parts(kind: str = "ecdsa256") -> tuple[str, bytes]:
    line = openssh_of(private_key(kind).public_key())
    r = keys._Reader(blob_of(line))
    r.string("t"), r.string("c")
    return line.split()[0], r.string("q")


def test_ecdsa_point_not_on_the_curve_is_refused():
    key_type, q = _ec_parts()
    bad = q[:-1] + bytes([q[-1] ^ 1])
    blob = sshstr(key_type) + sshstr("nistp256") + sshstr(bad)
    err = refused(line_of(key_type, blob), InvalidPublicKey)
    assert "does not parse" in err.message


def test_ecdsa_compressed_or_wrong_size_point_is_refused():
    key_type, q = _ec_parts()
    compressed = bytes([2 + (q[-1] & 1)]) + q[1:33]
    for point in (compressed, q + b"\x00", q[:-1]):
        blob = sshstr(key_type) + sshstr("nistp256") + sshstr(point)
        err = refused(line_of(key_type, blob), InvalidPublicKey)
        assert "uncompressed" in err.message


def test_ecdsa_key_type_and_curve_name_must_agree():
    key_type, q = _ec_parts("ecdsa384")
    blob = sshstr("ecdsa-sha2-nistp384") + sshstr("nistp521") + sshstr(q)
    err = refused(line_of("ecdsa-sha2-nistp384", blob), InvalidPublicKey)
    assert "'nistp521'" in err.message
