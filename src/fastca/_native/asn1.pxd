# Strict DER reader over (pointer, length): definite minimal lengths only,
# single-octet tags, nothing read past the buffer, bounded depth, no recursion.

cdef enum:
    DER_DEPTH_LIMIT = 32

cdef enum DerStatus:
    DER_OK = 0
    DER_END                    # walk finished; not an error
    DER_TRUNCATED
    DER_HIGH_TAG
    DER_INDEFINITE_LENGTH
    DER_NONMINIMAL_LENGTH
    DER_LENGTH_TOO_LARGE
    DER_TOO_DEEP
    DER_TRAILING_DATA
    DER_UNEXPECTED_TAG
    DER_CONSTRUCTED_STRING
    DER_BAD_BOOLEAN
    DER_BAD_INTEGER
    DER_BAD_NULL
    DER_BAD_BIT_STRING
    DER_BAD_OID

ctypedef struct DerTlv:
    unsigned char tag
    const unsigned char* start       # the identifier octet
    const unsigned char* content
    size_t content_size
    size_t size                      # header + content

ctypedef struct DerCursor:
    const unsigned char* position
    const unsigned char* end

ctypedef struct Oid:
    unsigned char content[24]
    size_t size

ctypedef struct DerWalk:
    DerCursor levels[DER_DEPTH_LIMIT]
    int depth
    bint seen_top

cdef void der_cursor(DerCursor* cursor, const unsigned char* data, size_t size) noexcept nogil
cdef void der_enter(const DerTlv* tlv, DerCursor* inner) noexcept nogil
cdef bint der_at_end(const DerCursor* cursor) noexcept nogil
cdef int der_next(DerCursor* cursor, DerTlv* tlv) noexcept nogil
cdef int der_expect(DerCursor* cursor, unsigned char tag, DerTlv* tlv) noexcept nogil
cdef int der_check_primitive(const DerTlv* tlv) noexcept nogil
cdef void der_walk_init(DerWalk* walk, const unsigned char* data, size_t size) noexcept nogil
cdef int der_walk_next(DerWalk* walk, DerTlv* tlv, int* level) noexcept nogil
cdef int der_check_tree(const unsigned char* data, size_t size) noexcept nogil
cdef bint der_oid_is(const DerTlv* tlv, const Oid* oid) noexcept nogil
cdef Oid oid_from_dotted(str dotted) except *
cdef str oid_to_dotted(const unsigned char* content, size_t size)
cdef size_t der_oid_text(const unsigned char* content, size_t size, char* out, size_t out_size) noexcept nogil
cdef const char* der_status_text(int status) noexcept nogil
