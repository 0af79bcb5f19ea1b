# DER writer: a growable malloc'd buffer whose constructed elements are
# opened with a one-octet length placeholder and back-patched on close.

from libc.stdint cimport int64_t

cdef enum:
    DER_MAX_OPEN = 32       # same bound as the reader's MAX_DER_DEPTH

ctypedef struct DerBuf:
    unsigned char* data
    size_t length
    size_t capacity
    size_t open_at[DER_MAX_OPEN]   # offset of each open element's length octet
    int depth
    bint failed                    # sticky: allocation failure or misuse

cdef int derbuf_init(DerBuf* buf, size_t capacity) noexcept nogil
cdef void derbuf_free(DerBuf* buf) noexcept nogil
cdef int derbuf_reserve(DerBuf* buf, size_t extra) noexcept nogil
cdef int derbuf_raw(DerBuf* buf, const unsigned char* data, size_t size) noexcept nogil
cdef int derbuf_byte(DerBuf* buf, unsigned char value) noexcept nogil
cdef int derbuf_begin(DerBuf* buf, unsigned char tag) noexcept nogil
cdef int derbuf_end(DerBuf* buf) noexcept nogil
cdef int derbuf_primitive(DerBuf* buf, unsigned char tag, const unsigned char* content, size_t size) noexcept nogil
cdef int derbuf_unsigned_integer(DerBuf* buf, const unsigned char* magnitude, size_t size) noexcept nogil
cdef int derbuf_time(DerBuf* buf, int64_t unix_seconds) noexcept nogil
cdef bint der_time_in_range(int64_t unix_seconds) noexcept nogil
cdef bytes derbuf_to_bytes(const DerBuf* buf)
