# PEM framing: strict unwrap of one CSR block, and 64-column encoding.

from .errors cimport Failure

cdef int pem_unwrap_csr(const unsigned char* data, size_t size, unsigned char** der,
                        size_t* der_size, Failure* failure) noexcept nogil
cdef size_t base64_decode(const unsigned char* text, size_t size, unsigned char* out) noexcept nogil
cdef size_t pem_encoded_size(size_t der_size, size_t label_size) noexcept nogil
cdef size_t pem_write(const unsigned char* der, size_t der_size, const char* label,
                      size_t label_size, char* out) noexcept nogil
