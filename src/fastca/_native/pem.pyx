"""PEM unwrap for CSRs (see pem.pxd) and pem_encode."""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.stdlib cimport free, malloc
from libc.string cimport memcmp, memcpy

from .errors cimport FAIL_CSR_ENCODING, Failure, fail

cdef const char* BASE64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
cdef enum:
    NOT_BASE64 = 0xFF
    PEM_LINE = 64
cdef unsigned char[256] BASE64_VALUES
cdef int _i
for _i in range(256):
    BASE64_VALUES[_i] = NOT_BASE64
for _i in range(64):
    BASE64_VALUES[<unsigned char>BASE64_ALPHABET[_i]] = <unsigned char>_i

cdef const char* BEGIN_CSR = b"-----BEGIN CERTIFICATE REQUEST-----"
cdef const char* END_CSR = b"-----END CERTIFICATE REQUEST-----"
cdef const char* BEGIN_NEW_CSR = b"-----BEGIN NEW CERTIFICATE REQUEST-----"
cdef const char* END_NEW_CSR = b"-----END NEW CERTIFICATE REQUEST-----"


cdef inline bint is_space(unsigned char c) noexcept nogil:
    return c == b' ' or c == b'\t' or c == b'\r' or c == b'\n'


cdef inline bint starts_with(const unsigned char* p, const unsigned char* end, const char* text,
                             size_t size) noexcept nogil:
    return <size_t>(end - p) >= size and memcmp(p, text, size) == 0


cdef const unsigned char* find(const unsigned char* p, const unsigned char* end, const char* text,
                               size_t size) noexcept nogil:
    while <size_t>(end - p) >= size:
        if p[0] == <unsigned char>text[0] and memcmp(p, text, size) == 0:
            return p
        p += 1
    return NULL


cdef size_t base64_decode(const unsigned char* text, size_t size, unsigned char* out) noexcept nogil:
    """Strict base64 (whitespace between characters allowed, '=' only as
    final padding, zero unused bits). Returns the decoded size, or
    (size_t)-1 when the text is not canonical base64."""
    cdef size_t i
    cdef size_t written = 0
    cdef unsigned int group = 0
    cdef int count = 0
    cdef int padding = 0
    cdef unsigned char value
    cdef unsigned char c
    for i in range(size):
        c = text[i]
        if is_space(c):
            continue
        if c == b'=':
            padding += 1
            if padding > 2:
                return <size_t>-1
            continue
        if padding:
            return <size_t>-1
        value = BASE64_VALUES[c]
        if value == NOT_BASE64:
            return <size_t>-1
        group = (group << 6) | value
        count += 1
        if count == 4:
            out[written] = <unsigned char>(group >> 16)
            out[written + 1] = <unsigned char>(group >> 8)
            out[written + 2] = <unsigned char>group
            written += 3
            group = 0
            count = 0
    if count == 0:
        return <size_t>-1 if padding else written
    if count == 1 or count + padding != 4:
        return <size_t>-1
    if count == 2:
        if group & 0x0F:
            return <size_t>-1
        out[written] = <unsigned char>(group >> 4)
        return written + 1
    if group & 0x03:
        return <size_t>-1
    out[written] = <unsigned char>(group >> 10)
    out[written + 1] = <unsigned char>(group >> 2)
    return written + 2


cdef int pem_unwrap_csr(const unsigned char* data, size_t size, unsigned char** der,
                        size_t* der_size, Failure* failure) noexcept nogil:
    """DER passes through (der points into data); one PEM block is decoded
    into a malloc'd buffer that the caller frees."""
    cdef const unsigned char* p = data
    cdef const unsigned char* end = data + size
    cdef const unsigned char* body
    cdef const unsigned char* body_end
    cdef const char* end_line
    cdef size_t end_size
    cdef unsigned char* decoded
    cdef size_t decoded_size
    der[0] = NULL
    der_size[0] = 0
    if size == 0:
        return fail(failure, FAIL_CSR_ENCODING, "CSR is empty")
    if data[0] == 0x30:
        der[0] = <unsigned char*>data
        der_size[0] = size
        return 0
    while p < end and is_space(p[0]):
        p += 1
    if p == end:
        return fail(failure, FAIL_CSR_ENCODING, "CSR is empty")
    if starts_with(p, end, BEGIN_CSR, 35):
        body = p + 35
        end_line = END_CSR
        end_size = 33
    elif starts_with(p, end, BEGIN_NEW_CSR, 39):
        body = p + 39
        end_line = END_NEW_CSR
        end_size = 37
    elif starts_with(p, end, b"-----BEGIN ", 11):
        return fail(failure, FAIL_CSR_ENCODING, "PEM block is not a CERTIFICATE REQUEST")
    else:
        return fail(failure, FAIL_CSR_ENCODING, "CSR is neither PEM nor DER")
    if body == end or (body[0] != b'\n' and body[0] != b'\r'):
        return fail(failure, FAIL_CSR_ENCODING, "PEM BEGIN line is not followed by a line break")
    body_end = find(body, end, end_line, end_size)
    if body_end == NULL:
        return fail(failure, FAIL_CSR_ENCODING, "PEM block has no matching END line")
    p = body_end + end_size
    while p < end and is_space(p[0]):
        p += 1
    if p != end:
        if find(p, end, b"-----BEGIN", 10) != NULL:
            return fail(failure, FAIL_CSR_ENCODING, "more than one PEM block")
        return fail(failure, FAIL_CSR_ENCODING, "data after the PEM block")
    decoded = <unsigned char*>malloc(<size_t>(body_end - body) * 3 // 4 + 3)
    if decoded == NULL:
        return fail(failure, FAIL_CSR_ENCODING, "out of memory decoding PEM")
    decoded_size = base64_decode(body, <size_t>(body_end - body), decoded)
    if decoded_size == <size_t>-1:
        free(decoded)
        return fail(failure, FAIL_CSR_ENCODING, "PEM body is not valid base64 (headers are not allowed)")
    if decoded_size == 0:
        free(decoded)
        return fail(failure, FAIL_CSR_ENCODING, "PEM block is empty")
    der[0] = decoded
    der_size[0] = decoded_size
    return 0


cdef size_t pem_encoded_size(size_t der_size, size_t label_size) noexcept nogil:
    cdef size_t text = (der_size + 2) // 3 * 4
    cdef size_t lines = (text + PEM_LINE - 1) // PEM_LINE
    # "-----BEGIN " label "-----\n" + body + "-----END " label "-----\n"
    return 11 + label_size + 6 + text + lines + 9 + label_size + 6


cdef size_t pem_write(const unsigned char* der, size_t der_size, const char* label,
                      size_t label_size, char* out) noexcept nogil:
    cdef size_t at = 0
    cdef size_t i = 0
    cdef size_t column = 0
    cdef unsigned int group
    cdef size_t left
    memcpy(out, b"-----BEGIN ", 11)
    memcpy(out + 11, label, label_size)
    memcpy(out + 11 + label_size, b"-----\n", 6)
    at = 17 + label_size
    while i < der_size:
        left = der_size - i
        group = der[i] << 16
        if left > 1:
            group |= der[i + 1] << 8
        if left > 2:
            group |= der[i + 2]
        out[at] = BASE64_ALPHABET[(group >> 18) & 0x3F]
        out[at + 1] = BASE64_ALPHABET[(group >> 12) & 0x3F]
        out[at + 2] = BASE64_ALPHABET[(group >> 6) & 0x3F] if left > 1 else b'='
        out[at + 3] = BASE64_ALPHABET[group & 0x3F] if left > 2 else b'='
        at += 4
        i += 3
        column += 4
        if column == PEM_LINE or i >= der_size:
            out[at] = b'\n'
            at += 1
            column = 0
    memcpy(out + at, b"-----END ", 9)
    memcpy(out + at + 9, label, label_size)
    memcpy(out + at + 9 + label_size, b"-----\n", 6)
    return at + 15 + label_size


def pem_encode(const unsigned char[::1] der, str label="CERTIFICATE") -> str:
    """``-----BEGIN {label}-----``, 64-column base64 lines, ``-----END {label}-----``, newline-terminated."""
    if not label or not all(c.isascii() and (c.isupper() or c.isdigit() or c == " ") for c in label) \
            or label != label.strip():
        raise ValueError(f"PEM label {label!r} must be upper-case ASCII words")
    if der.shape[0] == 0:
        raise ValueError("nothing to PEM-encode")
    label_bytes = label.encode("ascii")
    cdef size_t size = pem_encoded_size(der.shape[0], len(label_bytes))
    out = PyBytes_FromStringAndSize(NULL, size)
    cdef char* text = PyBytes_AS_STRING(out)
    cdef const char* label_text = label_bytes
    cdef size_t label_size = len(label_bytes)
    with nogil:
        pem_write(&der[0], der.shape[0], label_text, label_size, text)
    return out.decode("ascii")
