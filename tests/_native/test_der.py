"""DerWriter: exact encodings, back-patched lengths, times, and random trees
checked against a reference encoder, pyasn1 and the strict reader."""

from __future__ import annotations

import datetime as dt

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pyasn1.codec.der import decoder as pyasn1_decoder
from pyasn1.type import char, univ, useful

from fastca._native.testing import MAX_DER_DEPTH, DerWriter, walk_der


def reference_tlv(tag: int, content: bytes) -> bytes:
    n = len(content)
    if n < 0x80:
        length = bytes([n])
    else:
        octets = n.to_bytes((n.bit_length() + 7) // 8, "big")
        length = bytes([0x80 | len(octets)]) + octets
    return bytes([tag]) + length + content


def reference_integer(magnitude: bytes) -> bytes:
    value = int.from_bytes(magnitude, "big")
    return reference_tlv(0x02, value.to_bytes(value.bit_length() // 8 + 1, "big"))


@pytest.mark.parametrize("size", [0, 1, 127, 128, 255, 256, 65535, 65536, 1 << 20])
def test_constructed_length_is_back_patched_minimally(size):
    w = DerWriter(initial_capacity=4)
    w.begin(0x30)
    w.raw(b"\xab" * size)
    w.end()
    assert w.getvalue() == reference_tlv(0x30, b"\xab" * size)
    assert len(w) == len(reference_tlv(0x30, b"\xab" * size))


def test_nested_long_elements_each_move_their_content():
    w = DerWriter()
    w.begin(0x30)
    w.begin(0xA3)
    w.primitive(0x04, b"x" * 300)
    w.end()
    w.primitive(0x05, b"")
    w.end()
    inner = reference_tlv(0xA3, reference_tlv(0x04, b"x" * 300))
    assert w.getvalue() == reference_tlv(0x30, inner + b"\x05\x00")


@pytest.mark.parametrize("magnitude, encoded", [
    (b"", "020100"),
    (b"\x00", "020100"),
    (b"\x00\x00\x01", "020101"),
    (b"\x7f", "02017f"),
    (b"\x80", "02020080"),
    (b"\x00\xff\xff", "020300ffff"),
    (b"\x01\x00", "02020100"),
])
def test_integer_is_minimal_and_positive(magnitude, encoded):
    w = DerWriter()
    w.integer(magnitude)
    assert w.getvalue().hex() == encoded


@pytest.mark.parametrize("dotted, encoded", [
    ("1.2.840.113549.1.1.11", "06092a864886f70d01010b"),
    ("2.5.29.17", "0603551d11"),
    ("1.3.132.0.34", "06052b81040022"),
    ("2.999.3", "0603883703"),
    ("0.0", "060100"),
])
def test_oid_encoding(dotted, encoded):
    w = DerWriter()
    w.oid(dotted)
    assert w.getvalue().hex() == encoded


@pytest.mark.parametrize("dotted", ["", "1", "3.1", "1.40", "1.2.x", "1..2", "1.-2", "1.2.+3"])
def test_invalid_oid_is_refused(dotted):
    with pytest.raises(ValueError):
        DerWriter().oid(dotted)


@pytest.mark.parametrize("when, encoded", [
    (dt.datetime(1970, 1, 1), b"\x17\x0d700101000000Z"),
    (dt.datetime(1950, 1, 1), b"\x17\x0d500101000000Z"),
    (dt.datetime(1949, 12, 31, 23, 59, 59), b"\x18\x0f19491231235959Z"),
    (dt.datetime(2049, 12, 31, 23, 59, 59), b"\x17\x0d491231235959Z"),
    (dt.datetime(2050, 1, 1), b"\x18\x0f20500101000000Z"),
    (dt.datetime(2000, 2, 29, 12, 30, 1), b"\x17\x0d000229123001Z"),
    (dt.datetime(2100, 3, 1), b"\x18\x0f21000301000000Z"),
    (dt.datetime(9999, 12, 31, 23, 59, 59), b"\x18\x0f99991231235959Z"),
    (dt.datetime(1, 1, 1), b"\x18\x0f00010101000000Z"),
])
def test_time_uses_utctime_from_1950_through_2049(when, encoded):
    w = DerWriter()
    w.utc_or_generalized_time(int(when.replace(tzinfo=dt.timezone.utc).timestamp()))
    assert w.getvalue() == encoded


@given(st.datetimes(min_value=dt.datetime(1, 1, 1), max_value=dt.datetime(9999, 12, 31, 23, 59, 59)))
def test_time_matches_the_calendar(when):
    when = when.replace(microsecond=0, tzinfo=dt.timezone.utc)
    w = DerWriter()
    w.utc_or_generalized_time(int(when.timestamp()))
    text = when.strftime("%y%m%d%H%M%SZ") if 1950 <= when.year < 2050 else \
        f"{when.year:04d}" + when.strftime("%m%d%H%M%SZ")
    assert w.getvalue() == reference_tlv(0x17 if len(text) == 13 else 0x18, text.encode())


@pytest.mark.parametrize("seconds", [-62167219201, 253402300800, 2**63, -(2**63) - 1])
def test_time_outside_four_digit_years_is_refused(seconds):
    with pytest.raises(ValueError):
        DerWriter().utc_or_generalized_time(seconds)


def test_misuse_is_refused():
    w = DerWriter()
    with pytest.raises(ValueError):
        w.end()
    with pytest.raises(ValueError):
        w.begin(0x04)           # primitive tag
    with pytest.raises(ValueError):
        w.primitive(0x1F, b"")  # high-tag-number form
    with pytest.raises(ValueError):
        w.primitive(0x100, b"")
    w.begin(0x30)
    with pytest.raises(ValueError):
        w.getvalue()


def test_depth_is_bounded_like_the_reader():
    w = DerWriter()
    for _ in range(MAX_DER_DEPTH - 1):
        w.begin(0x30)
    w.primitive(0x05, b"")
    with pytest.raises(ValueError):
        w.begin(0x30)
        w.begin(0x30)
    w = DerWriter()
    for _ in range(MAX_DER_DEPTH - 1):
        w.begin(0x30)
    w.primitive(0x05, b"")
    for _ in range(MAX_DER_DEPTH - 1):
        w.end()
    assert len(walk_der(w.getvalue())) == MAX_DER_DEPTH


# --- random trees ------------------------------------------------------------
# A node is ("seq", [children]) | ("ctx", tag, [children]) | ("octets", bytes)
# | ("int", bytes) | ("oid", str) | ("null",) | ("bool", bool) | ("time", int)

oids = st.builds(lambda first, second, rest: ".".join(map(str, [first, second, *rest])),
                 st.integers(0, 2), st.integers(0, 39), st.lists(st.integers(0, 2**70), max_size=6))
leaves_without_null = [
    st.tuples(st.just("octets"), st.binary(max_size=300)),
    st.tuples(st.just("int"), st.binary(max_size=40)),
    st.tuples(st.just("oid"), oids),
    st.tuples(st.just("bool"), st.booleans()),
    st.tuples(st.just("time"), st.integers(-62135596800, 253402300799)),   # years 1..9999
]
leaves = st.one_of(*leaves_without_null, st.tuples(st.just("null")))


def pyasn1_trees():
    """pyasn1's schema-less decoder mishandles empty SEQUENCEs and NULL
    (returns None / an OCTET STRING), so its trees avoid both."""
    return st.recursive(st.one_of(*leaves_without_null),
                        lambda children: st.tuples(st.just("seq"), st.lists(children, min_size=1, max_size=5)),
                        max_leaves=40)


def trees():
    def extend(children):
        return st.one_of(st.tuples(st.just("seq"), st.lists(children, max_size=5)),
                         st.tuples(st.just("ctx"), st.integers(0, 30), st.lists(children, max_size=5)))
    return st.recursive(leaves, extend, max_leaves=40)


def write(w: DerWriter, node) -> None:
    kind = node[0]
    if kind == "seq":
        w.begin(0x30)
        for child in node[1]:
            write(w, child)
        w.end()
    elif kind == "ctx":
        w.begin(0xA0 | node[1])
        for child in node[2]:
            write(w, child)
        w.end()
    elif kind == "octets":
        w.primitive(0x04, node[1])
    elif kind == "int":
        w.integer(node[1])
    elif kind == "oid":
        w.oid(node[1])
    elif kind == "null":
        w.primitive(0x05, b"")
    elif kind == "bool":
        w.primitive(0x01, b"\xff" if node[1] else b"\x00")
    else:
        w.utc_or_generalized_time(node[1])


def reference(node) -> bytes:
    kind = node[0]
    if kind == "seq":
        return reference_tlv(0x30, b"".join(reference(c) for c in node[1]))
    if kind == "ctx":
        return reference_tlv(0xA0 | node[1], b"".join(reference(c) for c in node[2]))
    if kind == "octets":
        return reference_tlv(0x04, node[1])
    if kind == "int":
        return reference_integer(node[1])
    if kind == "oid":
        arcs = [int(a) for a in node[1].split(".")]
        body = bytearray()
        for arc in [arcs[0] * 40 + arcs[1], *arcs[2:]]:
            chunk = [arc & 0x7F]
            while arc > 0x7F:
                arc >>= 7
                chunk.append(0x80 | (arc & 0x7F))
            body.extend(reversed(chunk))
        return reference_tlv(0x06, bytes(body))
    if kind == "null":
        return b"\x05\x00"
    if kind == "bool":
        return reference_tlv(0x01, b"\xff" if node[1] else b"\x00")
    when = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc) + dt.timedelta(seconds=node[1])
    if 1950 <= when.year < 2050:
        return reference_tlv(0x17, when.strftime("%y%m%d%H%M%SZ").encode())
    return reference_tlv(0x18, (f"{when.year:04d}" + when.strftime("%m%d%H%M%SZ")).encode())


def wrapped(node):
    return node if node[0] == "seq" else ("seq", [node])


@settings(max_examples=300, deadline=None)
@given(trees())
def test_writer_matches_reference_encoder_and_strict_reader(node):
    node = wrapped(node)
    w = DerWriter(initial_capacity=1)
    write(w, node)
    encoded = w.getvalue()
    assert encoded == reference(node)
    walked = walk_der(encoded)
    assert walked[0] == (0, 0x30, None)
    assert sum(1 for _ in walked) == count_nodes(node)


def count_nodes(node) -> int:
    if node[0] == "seq":
        return 1 + sum(count_nodes(c) for c in node[1])
    if node[0] == "ctx":
        return 1 + sum(count_nodes(c) for c in node[2])
    return 1


@settings(max_examples=200, deadline=None)
@given(pyasn1_trees())
def test_pyasn1_decodes_writer_output_to_the_same_tree(node):
    node = wrapped(node)
    w = DerWriter()
    write(w, node)
    decoded, rest = pyasn1_decoder.decode(w.getvalue())
    assert rest == b""
    assert pyasn1_view(decoded) == plain_view(node)


def pyasn1_view(value):
    if isinstance(value, (univ.SequenceOf, univ.Sequence)):
        return ("seq", [pyasn1_view(value.getComponentByPosition(i)) for i in range(len(value))])
    if isinstance(value, (useful.UTCTime, useful.GeneralizedTime)):
        return ("time", str(value))
    if isinstance(value, univ.Boolean):
        return ("bool", bool(value))
    if isinstance(value, univ.Integer):
        return ("int", int(value))
    if isinstance(value, univ.OctetString) and not isinstance(value, char.AbstractCharacterString):
        return ("octets", bytes(value))
    if isinstance(value, univ.ObjectIdentifier):
        return ("oid", str(value))
    if isinstance(value, univ.Null):
        return ("null",)
    raise AssertionError(f"unexpected pyasn1 type {type(value).__name__}")


def plain_view(node):
    kind = node[0]
    if kind == "seq":
        return ("seq", [plain_view(c) for c in node[1]])
    if kind == "int":
        return ("int", int.from_bytes(node[1], "big"))
    if kind == "time":
        return ("time", reference(node)[2:].decode())
    return node
