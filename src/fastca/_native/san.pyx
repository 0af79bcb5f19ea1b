"""SPIFFE ID, DNS name and IP address rules of docs/cert-profile.md."""

from libc.stdio cimport snprintf
from libc.string cimport memcmp

from .errors cimport FAIL_IDENTITY, Failure, fail, failure_to_error

from .errors import E_IDENTITY, NativeError


cdef inline bint is_alnum(unsigned char c) noexcept nogil:
    return (b'a' <= c <= b'z') or (b'A' <= c <= b'Z') or (b'0' <= c <= b'9')


cdef int fail_character(Failure* failure, const char* what, unsigned char c, size_t offset) noexcept nogil:
    snprintf(failure.message, sizeof(failure.message), "%s: character '%c' at offset %zu is not allowed",
             what, c, offset)
    failure.code = FAIL_IDENTITY
    return -1


cdef int check_text(const char* what, const unsigned char* text, size_t size, Failure* failure) noexcept nogil:
    """Printable ASCII only: no NUL, control characters or non-ASCII bytes."""
    cdef size_t i
    for i in range(size):
        if text[i] == 0:
            snprintf(failure.message, sizeof(failure.message), "%s contains NUL at offset %zu", what, i)
            failure.code = FAIL_IDENTITY
            return -1
        if text[i] < 0x20 or text[i] == 0x7F:
            snprintf(failure.message, sizeof(failure.message),
                     "%s contains control character 0x%02x at offset %zu", what, text[i], i)
            failure.code = FAIL_IDENTITY
            return -1
        if text[i] >= 0x80:
            snprintf(failure.message, sizeof(failure.message),
                     "%s contains a non-ASCII byte at offset %zu", what, i)
            failure.code = FAIL_IDENTITY
            return -1
    return 0


cdef int fail_uri_feature(Failure* failure, unsigned char c) noexcept nogil:
    if c == b'%':
        return fail(failure, FAIL_IDENTITY, "SPIFFE ID: percent-encoding is not allowed")
    if c == b'?':
        return fail(failure, FAIL_IDENTITY, "SPIFFE ID: a query is not allowed")
    if c == b'#':
        return fail(failure, FAIL_IDENTITY, "SPIFFE ID: a fragment is not allowed")
    return 0


cdef int check_spiffe_id(const unsigned char* text, size_t size, Failure* failure) noexcept nogil:
    cdef size_t i
    cdef size_t start
    cdef size_t segment
    cdef unsigned char c
    if size == 0:
        return fail(failure, FAIL_IDENTITY, "SPIFFE ID is empty")
    if size > MAX_SPIFFE_ID_BYTES:
        snprintf(failure.message, sizeof(failure.message),
                 "SPIFFE ID is %zu bytes; at most 2048 are allowed", size)
        failure.code = FAIL_IDENTITY
        return -1
    if check_text("SPIFFE ID", text, size, failure) < 0:
        return -1
    if size < 9 or memcmp(text, b"spiffe://", 9) != 0:
        if size >= 9 and text[6] == b':' and text[7] == b'/' and text[8] == b'/':
            for i in range(6):
                if (text[i] | 0x20) != (<const unsigned char*>b"spiffe")[i]:
                    break
            else:
                return fail(failure, FAIL_IDENTITY, "SPIFFE ID: the scheme must be lower-case 'spiffe'")
        return fail(failure, FAIL_IDENTITY, "SPIFFE ID must start with 'spiffe://'")
    i = 9
    start = i
    while i < size and text[i] != b'/':
        c = text[i]
        if not ((b'a' <= c <= b'z') or (b'0' <= c <= b'9') or c == b'.' or c == b'-' or c == b'_'):
            if b'A' <= c <= b'Z':
                return fail(failure, FAIL_IDENTITY, "SPIFFE ID: the trust domain must be lower-case")
            if c == b'@':
                return fail(failure, FAIL_IDENTITY, "SPIFFE ID: userinfo is not allowed")
            if c == b':':
                return fail(failure, FAIL_IDENTITY, "SPIFFE ID: a port is not allowed")
            if fail_uri_feature(failure, c) < 0:
                return -1
            return fail_character(failure, "SPIFFE ID trust domain", c, i)
        i += 1
    if i == start:
        return fail(failure, FAIL_IDENTITY, "SPIFFE ID: the trust domain is empty")
    if i - start > MAX_TRUST_DOMAIN_BYTES:
        return fail(failure, FAIL_IDENTITY, "SPIFFE ID: the trust domain is longer than 255 bytes")
    if i == size:
        return fail(failure, FAIL_IDENTITY, "SPIFFE ID has no path; a workload ID needs one")
    while i < size:
        i += 1                              # past '/'
        segment = i
        while i < size and text[i] != b'/':
            c = text[i]
            if not (is_alnum(c) or c == b'.' or c == b'-' or c == b'_'):
                if fail_uri_feature(failure, c) < 0:
                    return -1
                return fail_character(failure, "SPIFFE ID path", c, i)
            i += 1
        if i == segment:
            if i == size:
                return fail(failure, FAIL_IDENTITY, "SPIFFE ID: a trailing '/' is not allowed")
            return fail(failure, FAIL_IDENTITY, "SPIFFE ID: empty path segment ('//')")
        if text[segment] == b'.' and (i - segment == 1 or (i - segment == 2 and text[segment + 1] == b'.')):
            return fail(failure, FAIL_IDENTITY, "SPIFFE ID: '.' and '..' path segments are not allowed")
    return 0


cdef int check_dns_name(const unsigned char* text, size_t size, bint allow_wildcard,
                        Failure* failure) noexcept nogil:
    cdef size_t i = 0
    cdef size_t label
    cdef unsigned char c
    if size == 0:
        return fail(failure, FAIL_IDENTITY, "DNS name is empty")
    if size > MAX_DNS_NAME_BYTES:
        snprintf(failure.message, sizeof(failure.message),
                 "DNS name is %zu bytes; at most 253 are allowed", size)
        failure.code = FAIL_IDENTITY
        return -1
    if check_text("DNS name", text, size, failure) < 0:
        return -1
    if size >= 2 and text[0] == b'*' and text[1] == b'.':
        if not allow_wildcard:
            return fail(failure, FAIL_IDENTITY, "DNS name: wildcards are not allowed by policy")
        i = 2
        if i == size:
            return fail(failure, FAIL_IDENTITY, "DNS name: a wildcard needs a domain after '*.'")
    while True:
        label = i
        while i < size and text[i] != b'.':
            c = text[i]
            if not (is_alnum(c) or c == b'-'):
                if c == b'*':
                    return fail(failure, FAIL_IDENTITY,
                                "DNS name: '*' is only allowed as the whole leftmost label ('*.')")
                return fail_character(failure, "DNS name", c, i)
            i += 1
        if i == label:
            if i == size:
                return fail(failure, FAIL_IDENTITY, "DNS name: a trailing '.' is not allowed")
            return fail(failure, FAIL_IDENTITY, "DNS name: empty label")
        if i - label > MAX_DNS_LABEL_BYTES:
            return fail(failure, FAIL_IDENTITY, "DNS name: a label is longer than 63 bytes")
        if text[label] == b'-' or text[i - 1] == b'-':
            return fail(failure, FAIL_IDENTITY, "DNS name: a label starts or ends with '-'")
        if i == size:
            return 0
        i += 1                              # past '.'


cdef int check_ip(size_t size, Failure* failure) noexcept nogil:
    if size != 4 and size != 16:
        snprintf(failure.message, sizeof(failure.message),
                 "IP address is %zu bytes; it must be 4 (IPv4) or 16 (IPv6)", size)
        failure.code = FAIL_IDENTITY
        return -1
    return 0


cdef bytes ascii_identity(value, str what):
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        if not value.isascii():
            raise NativeError(E_IDENTITY, f"{what} contains non-ASCII characters")
        return value.encode("ascii")
    raise TypeError(f"{what} must be str or bytes, not {type(value).__name__}")


def validate_spiffe_id(uri) -> None:
    cdef bytes text = ascii_identity(uri, "SPIFFE ID")
    cdef Failure failure
    if check_spiffe_id(text, len(text), &failure) < 0:
        raise failure_to_error(&failure)


def validate_dns_name(name, bint allow_wildcard=False) -> None:
    cdef bytes text = ascii_identity(name, "DNS name")
    cdef Failure failure
    if check_dns_name(text, len(text), allow_wildcard, &failure) < 0:
        raise failure_to_error(&failure)


def validate_ip(address) -> None:
    cdef Failure failure
    if not isinstance(address, bytes):
        raise TypeError(f"IP address must be bytes, not {type(address).__name__}")
    if check_ip(len(<bytes>address), &failure) < 0:
        raise failure_to_error(&failure)
