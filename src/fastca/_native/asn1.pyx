"""Strict DER reader (see asn1.pxd) and walk_der, its Python face."""

from libc.stdio cimport snprintf
from libc.string cimport memcmp, memcpy

from .errors cimport FAIL_CSR_MALFORMED, Failure, fail, failure_to_error

from .der import encode_oid

MAX_DER_DEPTH = DER_DEPTH_LIMIT

# Four length octets reach 4 GiB, far above any input cap; a fifth octet
# (2^32 and up) is refused before the length is even assembled.
cdef enum:
    MAX_LENGTH_OCTETS = 4


cdef void der_cursor(DerCursor* cursor, const unsigned char* data, size_t size) noexcept nogil:
    cursor.position = data
    cursor.end = data + size


cdef void der_enter(const DerTlv* tlv, DerCursor* inner) noexcept nogil:
    inner.position = tlv.content
    inner.end = tlv.content + tlv.content_size


cdef bint der_at_end(const DerCursor* cursor) noexcept nogil:
    return cursor.position >= cursor.end


cdef int der_next(DerCursor* cursor, DerTlv* tlv) noexcept nogil:
    cdef const unsigned char* p = cursor.position
    cdef size_t available = <size_t>(cursor.end - p)
    cdef size_t header
    cdef size_t length
    cdef size_t octets
    cdef size_t i
    if p >= cursor.end:
        return DER_TRUNCATED
    if (p[0] & 0x1F) == 0x1F:
        return DER_HIGH_TAG
    if available < 2:
        return DER_TRUNCATED
    if p[1] < 0x80:
        length = p[1]
        header = 2
    elif p[1] == 0x80:
        return DER_INDEFINITE_LENGTH
    else:
        octets = p[1] & 0x7F
        if octets > MAX_LENGTH_OCTETS:
            return DER_LENGTH_TOO_LARGE
        if available < 2 + octets:
            return DER_TRUNCATED
        if p[2] == 0:
            return DER_NONMINIMAL_LENGTH
        length = 0
        for i in range(octets):
            length = (length << 8) | p[2 + i]
        if length < 0x80:
            return DER_NONMINIMAL_LENGTH
        header = 2 + octets
    if length > available - header:
        return DER_TRUNCATED
    tlv.tag = p[0]
    tlv.start = p
    tlv.content = p + header
    tlv.content_size = length
    tlv.size = header + length
    cursor.position = p + header + length
    return DER_OK


cdef int der_expect(DerCursor* cursor, unsigned char tag, DerTlv* tlv) noexcept nogil:
    cdef int status = der_next(cursor, tlv)
    if status != DER_OK:
        return status
    if tlv.tag != tag:
        return DER_UNEXPECTED_TAG
    return DER_OK


cdef int der_check_primitive(const DerTlv* tlv) noexcept nogil:
    cdef const unsigned char* c = tlv.content
    cdef size_t n = tlv.content_size
    cdef size_t i
    cdef unsigned char unused
    if tlv.tag == 0x01:
        if n != 1 or (c[0] != 0x00 and c[0] != 0xFF):
            return DER_BAD_BOOLEAN
    elif tlv.tag == 0x02 or tlv.tag == 0x0A:
        if n == 0:
            return DER_BAD_INTEGER
        if n > 1 and ((c[0] == 0x00 and not (c[1] & 0x80)) or (c[0] == 0xFF and (c[1] & 0x80))):
            return DER_BAD_INTEGER
    elif tlv.tag == 0x03:
        if n == 0:
            return DER_BAD_BIT_STRING
        unused = c[0]
        if unused > 7 or (n == 1 and unused != 0):
            return DER_BAD_BIT_STRING
        if unused and (c[n - 1] & ((1 << unused) - 1)):
            return DER_BAD_BIT_STRING
    elif tlv.tag == 0x05:
        if n != 0:
            return DER_BAD_NULL
    elif tlv.tag == 0x06:
        if n == 0 or (c[n - 1] & 0x80):
            return DER_BAD_OID
        for i in range(n):
            if c[i] == 0x80 and (i == 0 or not (c[i - 1] & 0x80)):
                return DER_BAD_OID
    return DER_OK


cdef void der_walk_init(DerWalk* walk, const unsigned char* data, size_t size) noexcept nogil:
    der_cursor(&walk.levels[0], data, size)
    walk.depth = 1
    walk.seen_top = False


cdef int der_walk_next(DerWalk* walk, DerTlv* tlv, int* level) noexcept nogil:
    """Pre-order walk over every TLV; an explicit stack bounds the depth."""
    cdef DerCursor* cursor
    cdef int status
    while True:
        cursor = &walk.levels[walk.depth - 1]
        if not der_at_end(cursor):
            break
        if walk.depth == 1:
            return DER_END if walk.seen_top else DER_TRUNCATED
        walk.depth -= 1
    if walk.depth == 1 and walk.seen_top:
        return DER_TRAILING_DATA
    status = der_next(cursor, tlv)
    if status != DER_OK:
        return status
    walk.seen_top = True
    level[0] = walk.depth - 1
    if tlv.tag & 0x20:
        # DER forbids the constructed form of strings; of the universal
        # types only SEQUENCE and SET may be constructed.
        if (tlv.tag & 0xC0) == 0 and tlv.tag != 0x30 and tlv.tag != 0x31:
            return DER_CONSTRUCTED_STRING
        if tlv.content_size:
            if walk.depth >= DER_DEPTH_LIMIT:
                return DER_TOO_DEEP
            der_enter(tlv, &walk.levels[walk.depth])
            walk.depth += 1
        return DER_OK
    return der_check_primitive(tlv)


cdef int der_check_tree(const unsigned char* data, size_t size) noexcept nogil:
    cdef DerWalk walk
    cdef DerTlv tlv
    cdef int level
    cdef int status
    der_walk_init(&walk, data, size)
    while True:
        status = der_walk_next(&walk, &tlv, &level)
        if status == DER_END:
            return DER_OK
        if status != DER_OK:
            return status


cdef bint der_oid_is(const DerTlv* tlv, const Oid* oid) noexcept nogil:
    return (tlv.tag == 0x06 and tlv.content_size == oid.size
            and memcmp(tlv.content, oid.content, oid.size) == 0)


cdef Oid oid_from_dotted(str dotted) except *:
    cdef Oid oid
    cdef bytes content = encode_oid(dotted)
    if <size_t>len(content) > sizeof(oid.content):
        raise ValueError(f"OID {dotted} is too long for a constant")
    oid.size = len(content)
    memcpy(oid.content, <const char*>content, oid.size)
    return oid


cdef str oid_to_dotted(const unsigned char* content, size_t size):
    cdef size_t i
    arcs = []
    arc = 0
    for i in range(size):
        arc = (arc << 7) | (content[i] & 0x7F)
        if not content[i] & 0x80:
            arcs.append(arc)
            arc = 0
    if not arcs:
        return ""
    first = arcs[0]
    head = [first // 40, first % 40] if first < 80 else [2, first - 80]
    return ".".join(str(a) for a in head + arcs[1:])


cdef size_t der_oid_text(const unsigned char* content, size_t size, char* out, size_t out_size) noexcept nogil:
    """Dotted form of OID content octets, for messages; arcs beyond 64 bits
    print as '?'. Returns the text length (truncated to out_size - 1)."""
    cdef size_t written = 0
    cdef size_t i = 0
    cdef unsigned long long arc
    cdef bint overflow
    cdef bint first = True
    cdef int n
    if out_size == 0:
        return 0
    out[0] = 0
    while i < size and written < out_size - 1:
        arc = 0
        overflow = False
        while i < size:
            if arc >> 57:
                overflow = True
            arc = (arc << 7) | (content[i] & 0x7F)
            i += 1
            if not (content[i - 1] & 0x80):
                break
        if first:
            if overflow:
                n = snprintf(out, out_size, "2.?")
            elif arc < 80:
                n = snprintf(out, out_size, "%llu.%llu", arc // 40, arc % 40)
            else:
                n = snprintf(out, out_size, "2.%llu", arc - 80)
            first = False
        elif overflow:
            n = snprintf(out + written, out_size - written, ".?")
        else:
            n = snprintf(out + written, out_size - written, ".%llu", arc)
        if n < 0:
            break
        written += <size_t>n
    if written > out_size - 1:
        written = out_size - 1
    return written


cdef const char* der_status_text(int status) noexcept nogil:
    if status == DER_TRUNCATED:
        return "an element is truncated or its length runs past the data"
    if status == DER_HIGH_TAG:
        return "high-tag-number identifiers are not supported"
    if status == DER_INDEFINITE_LENGTH:
        return "indefinite length (BER) is not DER"
    if status == DER_NONMINIMAL_LENGTH:
        return "length is not minimally encoded"
    if status == DER_LENGTH_TOO_LARGE:
        return "length field claims 4 GiB or more"
    if status == DER_TOO_DEEP:
        return "elements nested deeper than 32 levels"
    if status == DER_TRAILING_DATA:
        return "trailing data after the element"
    if status == DER_UNEXPECTED_TAG:
        return "unexpected element type"
    if status == DER_CONSTRUCTED_STRING:
        return "constructed encoding of a primitive type"
    if status == DER_BAD_BOOLEAN:
        return "BOOLEAN is not one octet 00 or FF"
    if status == DER_BAD_INTEGER:
        return "INTEGER is empty or not minimally encoded"
    if status == DER_BAD_NULL:
        return "NULL has content"
    if status == DER_BAD_BIT_STRING:
        return "BIT STRING has a bad unused-bits octet or non-zero padding"
    if status == DER_BAD_OID:
        return "OBJECT IDENTIFIER is empty or not minimally encoded"
    return "malformed DER"


def walk_der(const unsigned char[::1] data) -> list:
    """Every TLV of one strict-DER element, pre-order, as (depth, tag,
    content) with content None for constructed elements."""
    cdef DerWalk walk
    cdef DerTlv tlv
    cdef int level
    cdef int status
    cdef Failure failure
    cdef char message[160]
    elements = []
    der_walk_init(&walk, &data[0] if data.shape[0] else NULL, data.shape[0])
    while True:
        status = der_walk_next(&walk, &tlv, &level)
        if status == DER_END:
            return elements
        if status != DER_OK:
            snprintf(message, sizeof(message), "DER: %s (at offset %zu)", der_status_text(status),
                     <size_t>(walk.levels[walk.depth - 1].position - &data[0]) if data.shape[0] else 0)
            fail(&failure, FAIL_CSR_MALFORMED, message)
            raise failure_to_error(&failure)
        if tlv.tag & 0x20:
            elements.append((level, tlv.tag, None))
        else:
            elements.append((level, tlv.tag, (<const char*>tlv.content)[:tlv.content_size]))
