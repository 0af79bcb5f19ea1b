"""The strict DER reader (walk_der): every BER leniency and every hostile
length or depth is refused, quickly and without recursion."""

from __future__ import annotations

import time

import pytest

from fastca._native.testing import E_CSR_MALFORMED, MAX_DER_DEPTH, NativeError, walk_der

# Hostile input must be refused without a pathological scan; this bounds
# that behaviour (the refusal itself takes microseconds), it is not a speed target.
HOSTILE_INPUT_BOUND_S = 1.0


def nested_sequences(depth: int, innermost: bytes = b"") -> bytes:
    """depth SEQUENCEs around innermost, each with a correct definite length."""
    headers = []
    n = len(innermost)
    for _ in range(depth):
        if n < 0x80:
            header = bytes([0x30, n])
        else:
            octets = n.to_bytes((n.bit_length() + 7) // 8, "big")
            header = bytes([0x30, 0x80 | len(octets)]) + octets
        headers.append(header)
        n += len(header)
    return b"".join(reversed(headers)) + innermost


def test_walk_reports_depth_tag_and_primitive_content():
    assert walk_der(bytes.fromhex("3008020101a0030401ff")) == [
        (0, 0x30, None), (1, 0x02, b"\x01"), (1, 0xA0, None), (2, 0x04, b"\xff")]


@pytest.mark.parametrize("encoded, reason", [
    ("", "truncated"),
    ("30", "truncated"),
    ("3004020101", "truncated"),
    ("3003020201", "truncated"),
    ("3080020101 0000", "indefinite"),
    ("308103020101", "not minimally"),
    ("30820003020101", "not minimally"),
    ("3085010000000002", "4 GiB"),
    ("3084ffffffff", "truncated"),
    ("30000500", "trailing"),
    ("1f2100", "high-tag"),
    ("2403040100", "constructed"),
    ("2303030100", "constructed"),
    ("010101", "BOOLEAN"),
    ("0100", "BOOLEAN"),
    ("02020001", "INTEGER"),
    ("0202ff80", "INTEGER"),
    ("0200", "INTEGER"),
    ("050100", "NULL"),
    ("0300", "BIT STRING"),
    ("030108", "BIT STRING"),
    ("030201ff", "BIT STRING"),
    ("0600", "OBJECT IDENTIFIER"),
    ("0602802a", "OBJECT IDENTIFIER"),
    ("06022a86", "OBJECT IDENTIFIER"),
])
def test_non_der_is_refused_with_a_reason(encoded, reason):
    with pytest.raises(NativeError) as caught:
        walk_der(bytes.fromhex(encoded.replace(" ", "")))
    assert caught.value.code == E_CSR_MALFORMED
    assert reason in str(caught.value)


def test_depth_limit_is_exact():
    assert len(walk_der(nested_sequences(MAX_DER_DEPTH, b"\x05\x00"[:0]))) == MAX_DER_DEPTH
    assert len(walk_der(nested_sequences(MAX_DER_DEPTH - 1, b"\x05\x00"))) == MAX_DER_DEPTH
    with pytest.raises(NativeError, match="deeper than 32"):
        walk_der(nested_sequences(MAX_DER_DEPTH, b"\x05\x00"))


def test_hundred_thousand_nested_sequences_fail_fast():
    hostile = nested_sequences(100_000)
    start = time.perf_counter()
    with pytest.raises(NativeError, match="deeper than 32"):
        walk_der(hostile)
    assert time.perf_counter() - start < HOSTILE_INPUT_BOUND_S


def test_length_claiming_two_to_the_32_fails_without_allocating():
    start = time.perf_counter()
    with pytest.raises(NativeError, match="4 GiB"):
        walk_der(bytes.fromhex("30850100000000") + b"\x00" * 16)
    assert time.perf_counter() - start < HOSTILE_INPUT_BOUND_S


def test_unknown_context_and_string_types_are_walked_not_judged():
    walked = walk_der(bytes.fromhex("3009 8001ff 0c024142 a100".replace(" ", "")))
    assert [tag for _, tag, _ in walked] == [0x30, 0x80, 0x0C, 0xA1]
