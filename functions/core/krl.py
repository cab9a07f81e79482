"""OpenSSH key revocation lists (KRL), encoded by the layout in OpenSSH's PROTOCOL.krl.

Only what ezssh needs: certificate sections (type 1), one per CA key, revoking by serial and by key
id. Building a KRL needs only the CA's PUBLIC key, so HSM-held CAs are fine.

    header   : "SSHKRL\\n\\0", uint32 format version 1, uint64 krl_version, uint64 generated_date,
               uint64 flags, string reserved, string comment
    section  : byte type, string data          (type 1 = certificates)
    type 1   : string ca_key, string reserved, then subsections (byte type, string data):
               0x20 serial list (uint64 each), 0x21 serial range (uint64 lo, uint64 hi), 0x23 key ids

Serials are encoded compactly: a run of 3 or more consecutive serials becomes a range (21 bytes),
everything else goes into one list (8 bytes a serial). The output is a pure function of its
inputs, so the same revocations always give the same bytes (hosts compare files byte for byte).
"""

from __future__ import annotations

import base64
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field

MAGIC = b"SSHKRL\n\x00"
FORMAT_VERSION = 1
SECTION_CERTIFICATES = 1
CERT_SERIAL_LIST = 0x20
CERT_SERIAL_RANGE = 0x21
CERT_KEY_ID = 0x23
MAX_SERIAL = 2**64 - 1
HEADER_LEN_NO_COMMENT = 8 + 4 + 8 + 8 + 8 + 4 + 4  # magic .. reserved .. comment length


class KrlError(ValueError):
    """Bad input for a KRL (a zero serial, a CA key that does not parse, ...)."""


@dataclass(frozen=True)
class CaRevocations:
    """What one CA revokes. `ca_key` is an OpenSSH public key line ("type base64 [comment]")."""

    ca_key: str
    serials: frozenset[int] = field(default_factory=frozenset)
    key_ids: frozenset[str] = field(default_factory=frozenset)

    @property
    def ca_key_blob(self) -> bytes:
        return ca_key_blob(self.ca_key)


def ca_key_blob(openssh_line: str) -> bytes:
    """The wire blob of an OpenSSH public key line (what PROTOCOL.krl calls ca_key)."""
    parts = openssh_line.strip().split()
    if len(parts) < 2:
        raise KrlError("A CA key must be an OpenSSH public key line: '<type> <base64> [comment]'.")
    try:
        blob = base64.b64decode(parts[1], validate=True)
    except ValueError:
        raise KrlError("The CA key's base64 does not decode.") from None
    (n,) = struct.unpack(">I", blob[:4]) if len(blob) >= 4 else (None,)
    if n is None or blob[4 : 4 + n].decode("ascii", "replace") != parts[0]:
        raise KrlError("The CA key's blob does not match its key type.")
    return blob


def _string(b: bytes) -> bytes:
    return struct.pack(">I", len(b)) + b


def _u64(n: int) -> bytes:
    return struct.pack(">Q", n)


def serial_runs(serials: Iterable[int]) -> list[tuple[int, int]]:
    """Sorted, de-duplicated serials as inclusive (lo, hi) runs of consecutive numbers."""
    runs: list[tuple[int, int]] = []
    for s in sorted(set(serials)):
        if isinstance(s, bool) or not isinstance(s, int) or not 0 < s <= MAX_SERIAL:
            raise KrlError(f"Serial {s!r} is not a non-zero 64-bit number.")
        if runs and runs[-1][1] + 1 == s:
            runs[-1] = (runs[-1][0], s)
        else:
            runs.append((s, s))
    return runs


def _serial_subsections(serials: Iterable[int]) -> bytes:
    singles: list[int] = []
    ranges: list[tuple[int, int]] = []
    for lo, hi in serial_runs(serials):
        # a range costs 1 + 4 + 16 = 21 bytes; in a list each serial costs 8
        if hi - lo + 1 >= 3:
            ranges.append((lo, hi))
        else:
            singles.extend(range(lo, hi + 1))
    out = b""
    if singles:
        out += bytes([CERT_SERIAL_LIST]) + _string(b"".join(_u64(s) for s in singles))
    for lo, hi in ranges:
        out += bytes([CERT_SERIAL_RANGE]) + _string(_u64(lo) + _u64(hi))
    return out


def _certificates_section(blob: bytes, serials: Iterable[int], key_ids: Iterable[str]) -> bytes:
    body = _string(blob) + _string(b"")
    body += _serial_subsections(serials)
    ids = sorted(set(key_ids))
    if ids:
        if any(not k for k in ids):
            raise KrlError("A revoked key id must not be empty.")
        body += bytes([CERT_KEY_ID]) + _string(b"".join(_string(k.encode()) for k in ids))
    return bytes([SECTION_CERTIFICATES]) + _string(body)


def encode_krl(
    cas: Iterable[CaRevocations],
    *,
    krl_version: int = 0,
    generated_date: int = 0,
    comment: str = "",
) -> bytes:
    """A KRL holding one certificates section per CA that revokes anything (sorted by CA blob)."""
    for name, v in (("krl_version", krl_version), ("generated_date", generated_date)):
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_SERIAL:
            raise KrlError(f"{name} must be a 64-bit unsigned number.")
    header = (
        MAGIC
        + struct.pack(">I", FORMAT_VERSION)
        + _u64(krl_version)
        + _u64(generated_date)
        + _u64(0)
        + _string(b"")
        + _string(comment.encode())
    )
    merged: dict[bytes, tuple[set[int], set[str]]] = {}
    for ca in cas:
        serials, ids = merged.setdefault(ca.ca_key_blob, (set(), set()))
        serials.update(ca.serials)
        ids.update(ca.key_ids)
    sections = b""
    for blob in sorted(merged):
        serials, ids = merged[blob]
        if not serials and not ids:
            continue
        sections += _certificates_section(blob, serials, ids)
    return header + sections


def header_length(krl: bytes) -> int:
    """Length of a KRL's header, i.e. where its sections start. Raises KrlError if it is not a KRL."""
    if len(krl) < HEADER_LEN_NO_COMMENT or not krl.startswith(MAGIC):
        raise KrlError("Not an OpenSSH KRL (bad magic or too short).")
    reserved_len = int.from_bytes(krl[36:40], "big")
    off = 40 + reserved_len
    if len(krl) < off + 4:
        raise KrlError("Truncated KRL header.")
    comment_len = int.from_bytes(krl[off : off + 4], "big")
    end = off + 4 + comment_len
    if len(krl) < end:
        raise KrlError("Truncated KRL header.")
    return end


def krl_version_of(krl: bytes) -> int:
    header_length(krl)
    return int.from_bytes(krl[12:20], "big")
