"""functions.core.text (host names, typed text) and the API's JSON bounds (functions.api.deps)."""

from __future__ import annotations

import json

import pytest

from functions.api.deps import MAX_DEPTH, finite_number, json_depth, load_json
from functions.core.errors import InvalidRequest
from functions.core.text import normalize_host, printable_text, storable_text


@pytest.mark.parametrize("raw,canonical", [
    ("web1", "web1"), ("WEB1.Contoso.Test.", "web1.contoso.test"), ("  db-7.corp  ", "db-7.corp"),
    ("127.0.0.1", "127.0.0.1"), ("[::1]", "::1"), ("2001:DB8:0:0::1", "2001:db8::1"), ("[2001:db8::1]", "2001:db8::1"),
    ("::ffff:10.0.0.1", "::ffff:a00:1"), ("bücher.example", "xn--bcher-kva.example"),
    ("xn--bcher-kva.example", "xn--bcher-kva.example"), ("a" * 63 + ".test", "a" * 63 + ".test"),
])
def test_hosts_normalise(raw, canonical):
    assert normalize_host(raw) == canonical
    # canonical is a fixed point
    assert normalize_host(canonical) == canonical


@pytest.mark.parametrize("raw", [
    "web1\n*Requester:* carol", "web1\r", "web1\x00", "web 1", "web1\u2028", "web\u200b1", "-web", "web-", "we_b",
    "web1..corp", ".web1", "a" * 64, ".".join(["a" * 63] * 5), "10.0.0", "1.2.3.4.5", "300.1.1.1", "010.1.1.1",
    "fe80::1%eth0", "[::1", "web*", "web?", "web/1", "user@web1", "web1:22", "", "   ", "\ud800", "1.2.3.999",
    "1234", "web1.123",
])
def test_hosts_refused(raw):
    with pytest.raises(InvalidRequest) as info:
        normalize_host(raw)
    assert info.value.status == 400 and info.value.code == "invalid_request"


def test_host_must_be_a_string():
    with pytest.raises(InvalidRequest):
        normalize_host(5)  # type: ignore[arg-type]


@pytest.mark.parametrize("text", ["deploy hotfix #42", "Überprüfung – ticket “INC-7”", "日本語", "a" * 1000])
def test_printable_text_passes(text):
    assert printable_text(text, "reason", 1000) == text.strip()


@pytest.mark.parametrize("text,needle", [
    ("line1\nline2", "U+000A"), ("tab\there", "U+0009"), ("bell\x07", "U+0007"), ("del\x7f", "U+007F"),
    ("c1\x85", "U+0085"), ("rtl\u202eevil", "U+202E"), ("isolate\u2066x", "U+2066"), ("ls\u2028x", "U+2028"),
    ("private\ue000", "U+E000"), ("lone \ud800 surrogate", "lone surrogate"), ("x" * 1001, "at most 1000"),
])
def test_printable_text_refuses(text, needle):
    with pytest.raises(InvalidRequest) as info:
        printable_text(text, "reason", 1000)
    assert needle in info.value.message


def test_multiline_allows_newlines_only():
    assert printable_text("a\nb", "comment", 10, multiline=True) == "a\nb"
    with pytest.raises(InvalidRequest):
        printable_text("a\rb", "comment", 10, multiline=True)


def test_storable_text():
    assert storable_text("ok ü", "name") == "ok ü"
    with pytest.raises(InvalidRequest):
        storable_text("\udfff", "name")


# ---- JSON bounds at the API edge ---------------------------------------------------------------


@pytest.mark.parametrize("text,depth", [
    ("{}", 1), ("[]", 1), ('{"a": [1, {"b": []}]}', 4), ('"[[[["', 0), ('{"a": "\\"[[["}', 1), ("1", 0),
    ("[" * 10 + "]" * 10, 10),
])
def test_json_depth_counts_nesting_outside_strings(text, depth):
    assert json_depth(text.encode()) == depth


def test_deep_json_is_refused_before_parsing():
    for raw in (b"[" * 60_000, b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1), b'{"a":' * 5000):
        with pytest.raises(InvalidRequest) as info:
            load_json(raw)
        assert "nests deeper" in info.value.message
    ok = "[" * MAX_DEPTH + "]" * MAX_DEPTH
    assert load_json(ok.encode()) == json.loads(ok)


@pytest.mark.parametrize("raw,needle", [
    (b'{"ttl_seconds": NaN}', "finite"), (b'{"ttl_seconds": Infinity}', "finite"), (b'{"x": -Infinity}', "finite"),
    (b'{"x": 1e400}', "finite"), (b'{"name": "\\ud800"}', "lone surrogate"), (b'{"\\udc00": 1}', "lone surrogate"),
    (b'{"x": [1, "\\ud83d"]}', "lone surrogate"), (b"{", "not valid JSON"), (b"\xff", "not valid JSON"),
    (b'{"x": ' + b"1" * 5000 + b"}", "not valid JSON"), (b" " * (64 * 1024 + 1), "too large"),
])
def test_bad_json_bodies(raw, needle):
    with pytest.raises(InvalidRequest) as info:
        load_json(raw)
    assert needle in info.value.message


def test_paired_surrogates_are_a_real_character():
    assert load_json(b'{"e": "\\ud83d\\ude00"}') == {"e": "\U0001F600"}


@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "NaN", "Infinity", "1e400", "x", ""])
def test_query_numbers_must_be_finite(value):
    with pytest.raises(InvalidRequest):
        finite_number(value, "since")


def test_query_numbers():
    assert finite_number("1700000000.5", "since") == 1700000000.5 and finite_number(None, "since") is None
