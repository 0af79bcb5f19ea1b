# TBSCertificate assembly from per-profile templates, and Certificate
# assembly after the CA signature is verified.

from libc.stdint cimport int64_t

from .csr cimport ByteSpan, CsrInfo, CsrParsed
from .der cimport DerBuf
from .errors cimport Failure
from .openssl cimport EC_KEY, EVP_PKEY, RSA

cdef enum:
    SERIAL_BYTES = 16
    MAX_ECDSA_RAW_BYTES = 132      # r || s for P-521, the largest curve libcrypto signs with

ctypedef struct TbsTemplate:
    ByteSpan signature_and_issuer  # signature AlgorithmIdentifier || issuer Name
    ByteSpan extensions_rsa_key    # KeyUsage, ExtKeyUsage, BasicConstraints, AKI
    ByteSpan extensions_ec_key
    ByteSpan san_prefix            # SAN extnID and critical TRUE

ctypedef struct CaKey:
    RSA* rsa_key                   # exactly one of rsa_key / ec_key is set
    EC_KEY* ec_key
    int digest
    bint ecdsa
    ByteSpan signature_algorithm   # DER AlgorithmIdentifier for the outer Certificate

ctypedef struct LeafJob:
    const unsigned char* csr_data
    size_t csr_size
    const unsigned char* spiffe_id
    size_t spiffe_id_size
    const unsigned char* serial
    int64_t not_before
    int64_t not_after
    ByteSpan* dns_names
    size_t dns_name_count
    ByteSpan* ip_addresses         # 4 or 16 octets each, in network order
    size_t ip_address_count
    CsrParsed csr
    unsigned char* csr_owned
    DerBuf tbs
    Failure failure

ctypedef struct AssembleJob:
    const unsigned char* tbs
    size_t tbs_size
    const unsigned char* signature
    size_t signature_size
    DerBuf der_signature
    DerBuf certificate
    Failure failure

cdef int prepare_leaf(const TbsTemplate* template, LeafJob* job) noexcept nogil
cdef int tbs_build(const TbsTemplate* template, LeafJob* job) noexcept nogil
cdef int ecdsa_signature_der(DerBuf* out, const unsigned char* raw, size_t size) noexcept nogil
cdef int assemble_certificate(const CaKey* ca, bint ecdsa_raw, AssembleJob* job) noexcept nogil

cdef class IssuerProfile:
    cdef readonly bytes signature_algorithm
    cdef readonly bytes issuer_name
    cdef readonly bytes authority_key_id
    cdef readonly bint istio_key_usage
    cdef readonly str hash_name
    cdef int digest
    cdef bint ecdsa
    cdef RSA* ca_rsa_key
    cdef EC_KEY* ca_ec_key
    cdef bytes signature_and_issuer
    cdef bytes extensions_rsa_key
    cdef bytes extensions_ec_key
    cdef void fill_template(self, TbsTemplate* template)
    cdef void fill_ca_key(self, CaKey* ca)
    cdef void release_ca_key(self)

cdef class LeafSpec:
    cdef readonly bytes csr
    cdef readonly str spiffe_id
    cdef readonly bytes serial
    cdef readonly object not_before
    cdef readonly object not_after
    cdef readonly tuple dns_names
    cdef readonly tuple ip_addresses

cdef class PreparedLeaf:
    cdef readonly bytes tbs
    cdef readonly CsrInfo csr
