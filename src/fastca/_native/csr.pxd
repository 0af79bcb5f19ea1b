# PKCS#10 CertificationRequest: strict parse, key classification and proof
# of possession, all nogil over spans of one DER buffer.

from .errors cimport Failure

cdef enum:
    MAX_CSR_BYTES_DEFAULT = 65536
    MAX_REQUESTED_EXTENSIONS = 64

cdef enum KeyType:
    KEY_RSA = 1
    KEY_EC = 2

cdef enum Curve:
    CURVE_NONE = 0
    CURVE_P256 = 1
    CURVE_P384 = 2

cdef enum Digest:
    DIGEST_SHA256 = 1
    DIGEST_SHA384 = 2
    DIGEST_SHA512 = 3

ctypedef struct ByteSpan:
    const unsigned char* data
    size_t size

ctypedef struct CsrParsed:
    ByteSpan der
    ByteSpan info
    ByteSpan subject
    ByteSpan spki
    ByteSpan signature             # BIT STRING contents after the unused-bits octet
    ByteSpan extensions            # Extensions SEQUENCE contents; data is NULL when none requested
    ByteSpan rsa_modulus           # magnitude without a leading zero
    ByteSpan rsa_exponent
    ByteSpan ec_point              # 04 || X || Y
    int key_type
    int key_bits
    int curve
    int digest
    bint ecdsa
    const char* signature_algorithm

cdef int csr_unwrap(const unsigned char* data, size_t size, size_t max_size, ByteSpan* der,
                    unsigned char** owned, Failure* failure) noexcept nogil
cdef int csr_parse(ByteSpan der, CsrParsed* csr, Failure* failure) noexcept nogil
cdef int csr_verify_possession(const CsrParsed* csr, Failure* failure) noexcept nogil
cdef int csr_load_verified(const unsigned char* data, size_t size, size_t max_size, CsrParsed* csr,
                           unsigned char** owned, Failure* failure) noexcept nogil
cdef size_t digest_of(int digest, const unsigned char* data, size_t size, unsigned char* out) noexcept nogil
cdef int digest_nid(int digest) noexcept nogil

cdef class CsrInfo:
    cdef readonly bytes der
    cdef readonly bytes info
    cdef readonly bytes subject
    cdef readonly bytes spki
    cdef readonly str key_type
    cdef readonly int key_bits
    cdef readonly object curve
    cdef readonly object rsa_exponent
    cdef readonly str signature_algorithm
    cdef readonly bytes signature
    cdef readonly list uris
    cdef readonly list dns_names
    cdef readonly list ip_addresses
    cdef readonly list emails
    cdef readonly list requested_extensions

cdef CsrInfo csr_info_from(const CsrParsed* csr)
