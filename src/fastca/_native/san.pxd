# Identity validation for the SANs fastca puts into certificates.

from .errors cimport Failure

cdef enum:
    MAX_SPIFFE_ID_BYTES = 2048
    MAX_TRUST_DOMAIN_BYTES = 255
    MAX_DNS_NAME_BYTES = 253
    MAX_DNS_LABEL_BYTES = 63

cdef int check_spiffe_id(const unsigned char* text, size_t size, Failure* failure) noexcept nogil
cdef int check_dns_name(const unsigned char* text, size_t size, bint allow_wildcard,
                        Failure* failure) noexcept nogil
cdef int check_ip(size_t size, Failure* failure) noexcept nogil
