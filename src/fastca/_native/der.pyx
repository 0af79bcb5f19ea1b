"""DER writer (see der.pxd) and its Python face, DerWriter."""

from libc.stdint cimport int64_t
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memcpy, memmove

# 0000-01-01T00:00:00Z and 9999-12-31T23:59:59Z: GeneralizedTime has four year digits.
cdef int64_t EARLIEST_TIME = -62167219200
cdef int64_t LATEST_TIME = 253402300799
# 1950-01-01 and 2050-01-01: RFC 5280 4.1.2.5 switches UTCTime/GeneralizedTime there.
cdef int64_t UTC_TIME_FROM = -631152000
cdef int64_t UTC_TIME_UNTIL = 2524608000


cdef int derbuf_init(DerBuf* buf, size_t capacity) noexcept nogil:
    if capacity < 16:
        capacity = 16
    buf.data = <unsigned char*>malloc(capacity)
    buf.length = 0
    buf.depth = 0
    buf.capacity = capacity if buf.data != NULL else 0
    buf.failed = buf.data == NULL
    return -1 if buf.failed else 0


cdef void derbuf_free(DerBuf* buf) noexcept nogil:
    free(buf.data)
    buf.data = NULL
    buf.length = 0
    buf.capacity = 0
    buf.depth = 0


cdef int derbuf_reserve(DerBuf* buf, size_t extra) noexcept nogil:
    cdef size_t needed
    cdef size_t capacity
    cdef unsigned char* grown
    if buf.failed:
        return -1
    needed = buf.length + extra
    if needed < buf.length:
        buf.failed = True
        return -1
    if needed <= buf.capacity:
        return 0
    capacity = buf.capacity * 2
    if capacity < needed:
        capacity = needed
    grown = <unsigned char*>realloc(buf.data, capacity)
    if grown == NULL:
        buf.failed = True
        return -1
    buf.data = grown
    buf.capacity = capacity
    return 0


cdef inline size_t length_octets(size_t length) noexcept nogil:
    cdef size_t count = 1
    if length < 0x80:
        return 1
    while length:
        count += 1
        length >>= 8
    return count


cdef inline void put_length(unsigned char* out, size_t length, size_t octets) noexcept nogil:
    cdef size_t i
    if octets == 1:
        out[0] = <unsigned char>length
        return
    out[0] = <unsigned char>(0x80 | (octets - 1))
    for i in range(octets - 1, 0, -1):
        out[i] = <unsigned char>(length & 0xff)
        length >>= 8


cdef int derbuf_raw(DerBuf* buf, const unsigned char* data, size_t size) noexcept nogil:
    if derbuf_reserve(buf, size) < 0:
        return -1
    memcpy(buf.data + buf.length, data, size)
    buf.length += size
    return 0


cdef int derbuf_byte(DerBuf* buf, unsigned char value) noexcept nogil:
    if derbuf_reserve(buf, 1) < 0:
        return -1
    buf.data[buf.length] = value
    buf.length += 1
    return 0


cdef int derbuf_begin(DerBuf* buf, unsigned char tag) noexcept nogil:
    if buf.depth >= DER_MAX_OPEN:
        buf.failed = True
    if derbuf_reserve(buf, 2) < 0:
        return -1
    buf.data[buf.length] = tag
    buf.open_at[buf.depth] = buf.length + 1
    buf.depth += 1
    buf.length += 2
    return 0


cdef int derbuf_end(DerBuf* buf) noexcept nogil:
    cdef size_t at
    cdef size_t length
    cdef size_t octets
    if buf.depth == 0:
        buf.failed = True
    if buf.failed:
        return -1
    buf.depth -= 1
    at = buf.open_at[buf.depth]
    length = buf.length - at - 1
    octets = length_octets(length)
    if octets > 1:
        if derbuf_reserve(buf, octets - 1) < 0:
            return -1
        memmove(buf.data + at + octets, buf.data + at + 1, length)
        buf.length += octets - 1
    put_length(buf.data + at, length, octets)
    return 0


cdef int derbuf_primitive(DerBuf* buf, unsigned char tag, const unsigned char* content, size_t size) noexcept nogil:
    cdef size_t octets = length_octets(size)
    if buf.depth >= DER_MAX_OPEN:
        buf.failed = True
    if derbuf_reserve(buf, 1 + octets + size) < 0:
        return -1
    buf.data[buf.length] = tag
    put_length(buf.data + buf.length + 1, size, octets)
    memcpy(buf.data + buf.length + 1 + octets, content, size)
    buf.length += 1 + octets + size
    return 0


cdef int derbuf_unsigned_integer(DerBuf* buf, const unsigned char* magnitude, size_t size) noexcept nogil:
    cdef bint pad
    while size > 1 and magnitude[0] == 0:
        magnitude += 1
        size -= 1
    if size == 0:
        return derbuf_primitive(buf, 0x02, <const unsigned char*>b"\x00", 1)
    pad = (magnitude[0] & 0x80) != 0
    if derbuf_begin(buf, 0x02) < 0:
        return -1
    if pad:
        derbuf_byte(buf, 0)
    derbuf_raw(buf, magnitude, size)
    return derbuf_end(buf)


cdef inline int64_t floor_div(int64_t a, int64_t b) noexcept nogil:
    cdef int64_t q = a // b
    if (a % b != 0) and ((a < 0) != (b < 0)):
        q -= 1
    return q


cdef inline void put_digits(unsigned char* out, int64_t value, int count) noexcept nogil:
    cdef int i
    for i in range(count - 1, -1, -1):
        out[i] = <unsigned char>(0x30 + value % 10)
        value //= 10


cdef bint der_time_in_range(int64_t unix_seconds) noexcept nogil:
    return EARLIEST_TIME <= unix_seconds <= LATEST_TIME


cdef int derbuf_time(DerBuf* buf, int64_t unix_seconds) noexcept nogil:
    # Days to civil date after Howard Hinnant's civil_from_days: gmtime is
    # neither nogil-safe everywhere nor defined for every time_t we accept.
    cdef int64_t days, seconds_of_day, z, era, day_of_era, year_of_era
    cdef int64_t day_of_year, mp, day, month, year
    cdef unsigned char text[15]
    cdef unsigned char* at
    cdef bint utc
    if not der_time_in_range(unix_seconds):
        buf.failed = True
        return -1
    days = floor_div(unix_seconds, 86400)
    seconds_of_day = unix_seconds - days * 86400
    z = days + 719468
    era = floor_div(z, 146097)
    day_of_era = z - era * 146097
    year_of_era = (day_of_era - day_of_era // 1460 + day_of_era // 36524 - day_of_era // 146096) // 365
    year = year_of_era + era * 400
    day_of_year = day_of_era - (365 * year_of_era + year_of_era // 4 - year_of_era // 100)
    mp = (5 * day_of_year + 2) // 153
    day = day_of_year - (153 * mp + 2) // 5 + 1
    month = mp + 3 if mp < 10 else mp - 9
    if month <= 2:
        year += 1
    utc = UTC_TIME_FROM <= unix_seconds < UTC_TIME_UNTIL
    if utc:
        put_digits(text, year % 100, 2)
        at = text + 2
    else:
        put_digits(text, year, 4)
        at = text + 4
    put_digits(at, month, 2)
    put_digits(at + 2, day, 2)
    put_digits(at + 4, seconds_of_day // 3600, 2)
    put_digits(at + 6, (seconds_of_day // 60) % 60, 2)
    put_digits(at + 8, seconds_of_day % 60, 2)
    at[10] = b'Z'
    if utc:
        return derbuf_primitive(buf, 0x17, text, 13)
    return derbuf_primitive(buf, 0x18, text, 15)


cdef bytes derbuf_to_bytes(const DerBuf* buf):
    return (<char*>buf.data)[:buf.length]


def encode_oid(dotted: str) -> bytes:
    """Content octets of an OBJECT IDENTIFIER given in dotted form."""
    parts = dotted.split(".")
    try:
        arcs = [int(part) for part in parts]
    except ValueError:
        raise ValueError(f"OID {dotted!r} is not dotted decimal") from None
    if any(not part.isdigit() for part in parts):
        raise ValueError(f"OID {dotted!r} is not dotted decimal")
    if len(arcs) < 2 or arcs[0] > 2 or (arcs[0] < 2 and arcs[1] >= 40):
        raise ValueError(f"OID {dotted!r} does not start with a valid first pair of arcs")
    out = bytearray()
    for arc in [arcs[0] * 40 + arcs[1]] + arcs[2:]:
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        out.extend(reversed(chunk))
    return bytes(out)


cdef class DerWriter:
    """The growable buffer with back-patched lengths, exposed for tests and
    the fuzz targets."""

    cdef DerBuf buf

    def __cinit__(self, Py_ssize_t initial_capacity=256):
        if initial_capacity < 0:
            raise ValueError("initial_capacity must not be negative")
        if derbuf_init(&self.buf, <size_t>initial_capacity) < 0:
            raise MemoryError()

    def __dealloc__(self):
        derbuf_free(&self.buf)

    cdef check(self):
        if self.buf.failed:
            raise MemoryError("DER buffer could not grow")

    def begin(self, int tag) -> None:
        check_tag(tag)
        if not tag & 0x20:
            raise ValueError(f"tag 0x{tag:02x} is primitive; begin() opens constructed elements")
        if self.buf.depth >= DER_MAX_OPEN:
            raise ValueError(f"more than {DER_MAX_OPEN} nested elements")
        derbuf_begin(&self.buf, <unsigned char>tag)
        self.check()

    def end(self) -> None:
        if self.buf.depth == 0:
            raise ValueError("end() without a matching begin()")
        derbuf_end(&self.buf)
        self.check()

    def primitive(self, int tag, const unsigned char[::1] content) -> None:
        check_tag(tag)
        if self.buf.depth >= DER_MAX_OPEN:
            raise ValueError(f"an element inside {DER_MAX_OPEN} nested elements is too deep")
        derbuf_primitive(&self.buf, <unsigned char>tag, &content[0] if content.shape[0] else NULL,
                         content.shape[0])
        self.check()

    def raw(self, const unsigned char[::1] encoded) -> None:
        if encoded.shape[0]:
            derbuf_raw(&self.buf, &encoded[0], encoded.shape[0])
        self.check()

    def integer(self, const unsigned char[::1] value) -> None:
        if self.buf.depth >= DER_MAX_OPEN:
            raise ValueError(f"an element inside {DER_MAX_OPEN} nested elements is too deep")
        derbuf_unsigned_integer(&self.buf, &value[0] if value.shape[0] else NULL, value.shape[0])
        self.check()

    def oid(self, str dotted) -> None:
        self.primitive(0x06, encode_oid(dotted))

    def utc_or_generalized_time(self, unix_seconds) -> None:
        if not (EARLIEST_TIME <= unix_seconds <= LATEST_TIME):
            raise ValueError(f"time {unix_seconds} is outside years 0000..9999")
        if self.buf.depth >= DER_MAX_OPEN:
            raise ValueError(f"an element inside {DER_MAX_OPEN} nested elements is too deep")
        derbuf_time(&self.buf, <int64_t>unix_seconds)
        self.check()

    def getvalue(self) -> bytes:
        if self.buf.depth:
            raise ValueError(f"{self.buf.depth} element(s) still open")
        return derbuf_to_bytes(&self.buf)

    def __len__(self) -> int:
        return self.buf.length


cdef check_tag(int tag):
    if not 0 <= tag <= 0xFF:
        raise ValueError(f"tag {tag} does not fit one identifier octet")
    if tag & 0x1F == 0x1F:
        raise ValueError(f"tag 0x{tag:02x} needs the high-tag-number form, which is not supported")
