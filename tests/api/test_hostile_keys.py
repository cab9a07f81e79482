"""Hostile public keys through the real API: each refused with a 400 and a clear message, audited,
and no certificate. The keys are real ones with one field changed, so only that field can be why."""

from __future__ import annotations

import base64
import struct

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa


def sshstr(b: bytes | str) -> bytes:
    b = b.encode() if isinstance(b, str) else b
    return struct.pack(">I", len(b)) + b


def mpint(n: int) -> bytes:
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return sshstr(b"\x00" + raw if raw[0] & 0x80 else raw)


@pytest.fixture(scope="module")
def rsa_numbers() -> tuple[int, int]:
    nums = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key().public_numbers()
    return nums.e, nums.n


def rsa_line(e: int, n: int, tail: bytes = b"") -> str:
    return "ssh-rsa " + base64.b64encode(sshstr("ssh-rsa") + mpint(e) + mpint(n) + tail).decode()


def ec_line_off_curve() -> str:
    line = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    blob = bytearray(base64.b64decode(line.split()[1]))
    blob[-1] ^= 1  # the point's last byte: off the curve
    return "ecdsa-sha2-nistp256 " + base64.b64encode(bytes(blob)).decode()


CASES = {
    "even modulus": (lambda e, n: rsa_line(e, n * 2), "modulus is even"),
    "small prime factor": (lambda e, n: rsa_line(e, n * 3), "divisible by 3"),
    "exponent 1": (lambda e, n: rsa_line(1, n), "at least 3"),
    "even exponent": (lambda e, n: rsa_line(65536, n), "odd"),
    "huge exponent": (lambda e, n: rsa_line(2**40 + 1, n), "too large"),
    "trailing data": (lambda e, n: rsa_line(e, n, b"\x00\x00\x00\x01x"), "trailing data"),
    "point off the curve": (lambda e, n: ec_line_off_curve(), "does not parse"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_keys_get_a_400_and_no_certificate(client, auth, context, oidc, rsa_numbers, case):
    make, needle = CASES[case]
    line = make(*rsa_numbers)
    assert rsa_line(*rsa_numbers) != line or case == "point off the curve"
    r = client.post("/api/requests", headers=auth("alice"),
                    json={"host": "127.0.0.1", "principal": "alice", "public_key": line})
    assert r.status_code == 400, r.text
    body = r.json()
    assert body["error"] in ("invalid_public_key", "weak_public_key") and needle in body["message"]
    assert "certificate" not in body
    refused = [e for e in context.service.store.list_audit(oidc.tenant_id("contoso"), limit=100_000)
               if e.action == "request.refused" and e.message == body["message"]]
    assert refused, "the refusal is audited"


def test_the_unchanged_key_is_accepted(client, auth, rsa_numbers):
    r = client.post("/api/requests", headers=auth("alice"),
                    json={"host": "127.0.0.1", "principal": "alice", "public_key": rsa_line(*rsa_numbers)})
    assert r.status_code == 201 and r.json()["principals"] == ["alice"]
