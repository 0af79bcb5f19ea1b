"""PKCS#10 CSR acceptance (docs/cert-profile.md "CSR acceptance").

Proof of possession uses libcrypto's legacy RSA/EC_KEY functions on keys
built from the parsed SPKI: on OpenSSL 3.0, d2i_PUBKEY goes through the
provider decoder chain and costs far more per key than setting the numbers
directly (figures in bench/RESULTS.md). Only the curve groups are shared:
they are constants, expensive to create, and EC_KEY_set_group copies them.
"""

from libc.stdio cimport snprintf
from libc.stdlib cimport free
from libc.string cimport memcmp

from .asn1 cimport (
    DER_OK, DER_TRAILING_DATA, DerCursor, DerTlv, Oid, der_at_end, der_check_tree, der_cursor,
    der_enter, der_expect, der_next, der_oid_is, der_oid_text, der_status_text, oid_from_dotted,
    oid_to_dotted,
)
from .errors cimport (
    FAIL_CSR_ALGORITHM, FAIL_CSR_ENCODING, FAIL_CSR_KEY, FAIL_CSR_MALFORMED, FAIL_CSR_SIGNATURE,
    FAIL_INTERNAL, Failure, fail, failure_to_error,
)
from .openssl cimport (
    BIGNUM, BN_bin2bn, BN_free, EC_GROUP, EC_GROUP_new_by_curve_name, EC_KEY, EC_KEY_free,
    EC_KEY_new, EC_KEY_oct2key, EC_KEY_set_group, ECDSA_verify, ERR_clear_error, NID_sha256,
    NID_sha384, NID_sha512, NID_secp384r1, NID_X9_62_prime256v1, RSA, RSA_free, RSA_new,
    RSA_set0_key, RSA_verify, SHA256, SHA384, SHA512,
)
from .pem cimport pem_unwrap_csr

MAX_CSR_BYTES = MAX_CSR_BYTES_DEFAULT

ctypedef struct SignatureAlgorithm:
    Oid oid
    const char* name
    int digest                  # 0: refused
    bint ecdsa
    const char* refusal

ctypedef struct NamedOid:
    Oid oid
    const char* name

cdef enum:
    SIGNATURE_ALGORITHM_SLOTS = 16
    CURVE_NAME_SLOTS = 8
    MIN_RSA_BITS = 2048
    MAX_RSA_BITS = 8192

cdef const char* WEAK_HASH = "use SHA-256 or stronger"
cdef const char* NOT_SUPPORTED = "use sha256/384/512WithRSAEncryption or ecdsa-with-SHA256/384/512"

cdef SignatureAlgorithm[SIGNATURE_ALGORITHM_SLOTS] SIGNATURE_ALGORITHMS
cdef int SIGNATURE_ALGORITHM_COUNT = 0
cdef NamedOid[CURVE_NAME_SLOTS] CURVE_NAMES
cdef int CURVE_NAME_COUNT = 0


cdef add_signature_algorithm(str dotted, const char* name, int digest, bint ecdsa, const char* refusal):
    global SIGNATURE_ALGORITHM_COUNT
    cdef SignatureAlgorithm* entry = &SIGNATURE_ALGORITHMS[SIGNATURE_ALGORITHM_COUNT]
    entry.oid = oid_from_dotted(dotted)
    entry.name = name
    entry.digest = digest
    entry.ecdsa = ecdsa
    entry.refusal = refusal
    SIGNATURE_ALGORITHM_COUNT += 1


add_signature_algorithm("1.2.840.113549.1.1.11", "sha256WithRSAEncryption", DIGEST_SHA256, False, NULL)
add_signature_algorithm("1.2.840.113549.1.1.12", "sha384WithRSAEncryption", DIGEST_SHA384, False, NULL)
add_signature_algorithm("1.2.840.113549.1.1.13", "sha512WithRSAEncryption", DIGEST_SHA512, False, NULL)
add_signature_algorithm("1.2.840.10045.4.3.2", "ecdsa-with-SHA256", DIGEST_SHA256, True, NULL)
add_signature_algorithm("1.2.840.10045.4.3.3", "ecdsa-with-SHA384", DIGEST_SHA384, True, NULL)
add_signature_algorithm("1.2.840.10045.4.3.4", "ecdsa-with-SHA512", DIGEST_SHA512, True, NULL)
add_signature_algorithm("1.2.840.113549.1.1.2", "md2WithRSAEncryption", 0, False, WEAK_HASH)
add_signature_algorithm("1.2.840.113549.1.1.4", "md5WithRSAEncryption", 0, False, WEAK_HASH)
add_signature_algorithm("1.2.840.113549.1.1.5", "sha1WithRSAEncryption", 0, False, WEAK_HASH)
add_signature_algorithm("1.2.840.113549.1.1.14", "sha224WithRSAEncryption", 0, False, WEAK_HASH)
add_signature_algorithm("1.2.840.10045.4.1", "ecdsa-with-SHA1", 0, True, WEAK_HASH)
add_signature_algorithm("1.2.840.10045.4.3.1", "ecdsa-with-SHA224", 0, True, WEAK_HASH)
add_signature_algorithm("1.2.840.113549.1.1.10", "RSASSA-PSS", 0, False,
                        "use sha256WithRSAEncryption (PKCS#1 v1.5) or ECDSA")
add_signature_algorithm("1.3.101.112", "Ed25519", 0, False, NOT_SUPPORTED)
add_signature_algorithm("1.2.840.10040.4.3", "dsa-with-sha1", 0, False, NOT_SUPPORTED)


cdef add_curve_name(str dotted, const char* name):
    global CURVE_NAME_COUNT
    CURVE_NAMES[CURVE_NAME_COUNT].oid = oid_from_dotted(dotted)
    CURVE_NAMES[CURVE_NAME_COUNT].name = name
    CURVE_NAME_COUNT += 1


add_curve_name("1.3.132.0.35", "secp521r1")
add_curve_name("1.3.132.0.10", "secp256k1")
add_curve_name("1.3.132.0.33", "secp224r1")
add_curve_name("1.2.840.10045.3.1.1", "secp192r1")
add_curve_name("1.3.36.3.3.2.8.1.1.7", "brainpoolP256r1")

cdef Oid OID_RSA_ENCRYPTION = oid_from_dotted("1.2.840.113549.1.1.1")
cdef Oid OID_EC_PUBLIC_KEY = oid_from_dotted("1.2.840.10045.2.1")
cdef Oid OID_ED25519 = oid_from_dotted("1.3.101.112")
cdef Oid OID_P256 = oid_from_dotted("1.2.840.10045.3.1.7")
cdef Oid OID_P384 = oid_from_dotted("1.3.132.0.34")
cdef Oid OID_EXTENSION_REQUEST = oid_from_dotted("1.2.840.113549.1.9.14")
cdef Oid OID_SUBJECT_ALT_NAME = oid_from_dotted("2.5.29.17")

cdef EC_GROUP* P256_GROUP = EC_GROUP_new_by_curve_name(NID_X9_62_prime256v1)
cdef EC_GROUP* P384_GROUP = EC_GROUP_new_by_curve_name(NID_secp384r1)
if P256_GROUP == NULL or P384_GROUP == NULL:
    raise ImportError("libcrypto has no P-256/P-384 support")


# --- failures ---------------------------------------------------------------

cdef int malformed(Failure* failure, const char* what, int status) noexcept nogil:
    snprintf(failure.message, sizeof(failure.message), "CSR is malformed: %s: %s", what,
             der_status_text(status))
    failure.code = FAIL_CSR_MALFORMED
    return -1


cdef int malformed_because(Failure* failure, const char* reason) noexcept nogil:
    snprintf(failure.message, sizeof(failure.message), "CSR is malformed: %s", reason)
    failure.code = FAIL_CSR_MALFORMED
    return -1


cdef int expect(DerCursor* cursor, unsigned char tag, DerTlv* tlv, const char* what,
                Failure* failure) noexcept nogil:
    cdef int status = der_expect(cursor, tag, tlv)
    if status != DER_OK:
        return malformed(failure, what, status)
    return 0


cdef int expect_end(const DerCursor* cursor, const char* what, Failure* failure) noexcept nogil:
    if not der_at_end(cursor):
        return malformed(failure, what, DER_TRAILING_DATA)
    return 0


# --- framing ----------------------------------------------------------------

cdef int csr_unwrap(const unsigned char* data, size_t size, size_t max_size, ByteSpan* der,
                    unsigned char** owned, Failure* failure) noexcept nogil:
    """Size cap, PEM/DER framing and a strict-DER check of every TLV."""
    cdef DerCursor cursor
    cdef DerTlv request
    cdef int status
    cdef unsigned char* decoded
    owned[0] = NULL
    if size > max_size:
        snprintf(failure.message, sizeof(failure.message),
                 "CSR is %zu bytes; the limit is %zu", size, max_size)
        failure.code = FAIL_CSR_ENCODING
        return -1
    if pem_unwrap_csr(data, size, &decoded, &der.size, failure) < 0:
        return -1
    if decoded != data:
        owned[0] = decoded
    der.data = decoded
    der_cursor(&cursor, der.data, der.size)
    status = der_next(&cursor, &request)
    if status != DER_OK:
        return malformed(failure, "CertificationRequest", status)
    if request.tag != 0x30:
        return malformed_because(failure, "CertificationRequest is not a SEQUENCE")
    if request.size != der.size:
        return fail(failure, FAIL_CSR_ENCODING, "trailing bytes after the CSR")
    status = der_check_tree(der.data, der.size)
    if status != DER_OK:
        return malformed(failure, "strict DER", status)
    return 0


# --- structure ----------------------------------------------------------------

cdef int check_name(const DerTlv* name, Failure* failure) noexcept nogil:
    cdef DerCursor names, rdn, atv_cursor
    cdef DerTlv set_tlv, atv, part
    der_enter(name, &names)
    while not der_at_end(&names):
        if expect(&names, 0x31, &set_tlv, "subject RDN", failure) < 0:
            return -1
        if set_tlv.content_size == 0:
            return malformed_because(failure, "subject has an empty RDN")
        der_enter(&set_tlv, &rdn)
        while not der_at_end(&rdn):
            if expect(&rdn, 0x30, &atv, "subject attribute", failure) < 0:
                return -1
            der_enter(&atv, &atv_cursor)
            if expect(&atv_cursor, 0x06, &part, "subject attribute type", failure) < 0:
                return -1
            if der_next(&atv_cursor, &part) != DER_OK:
                return malformed_because(failure, "subject attribute has no value")
            if expect_end(&atv_cursor, "subject attribute", failure) < 0:
                return -1
    return 0


cdef int check_ia5(const DerTlv* tlv, Failure* failure) noexcept nogil:
    cdef size_t i
    for i in range(tlv.content_size):
        if tlv.content[i] >= 0x80:
            return malformed_because(failure, "requested SAN is not an IA5String")
    return 0


cdef int check_requested_san(const DerTlv* value, Failure* failure) noexcept nogil:
    cdef DerCursor outer, names
    cdef DerTlv sequence, name
    cdef int status = der_check_tree(value.content, value.content_size)
    if status != DER_OK:
        return malformed(failure, "requested subjectAltName", status)
    der_cursor(&outer, value.content, value.content_size)
    if expect(&outer, 0x30, &sequence, "requested subjectAltName", failure) < 0:
        return -1
    if sequence.content_size == 0:
        return malformed_because(failure, "requested subjectAltName is empty")
    der_enter(&sequence, &names)
    while not der_at_end(&names):
        der_next(&names, &name)
        if name.tag == 0x81 or name.tag == 0x82 or name.tag == 0x86:
            if check_ia5(&name, failure) < 0:
                return -1
        elif name.tag == 0x87:
            if name.content_size != 4 and name.content_size != 16:
                return malformed_because(failure, "requested IP SAN is not 4 or 16 bytes")
        elif name.tag != 0xA0 and name.tag != 0xA3 and name.tag != 0xA4 and name.tag != 0xA5 \
                and name.tag != 0x88:
            return malformed_because(failure, "requested SAN has an unknown GeneralName type")
    return 0


cdef int parse_extension_request(const DerTlv* values, CsrParsed* csr, Failure* failure) noexcept nogil:
    cdef DerCursor value_cursor, extensions, extension_cursor, earlier, previous_cursor
    cdef DerTlv sequence, extension, oid, part, previous, previous_oid
    cdef int count = 0
    der_enter(values, &value_cursor)
    if expect(&value_cursor, 0x30, &sequence, "extensionRequest value", failure) < 0:
        return -1
    if expect_end(&value_cursor, "extensionRequest must have exactly one value", failure) < 0:
        return -1
    if sequence.content_size == 0:
        return malformed_because(failure, "extensionRequest has no extensions")
    csr.extensions.data = sequence.content
    csr.extensions.size = sequence.content_size
    der_enter(&sequence, &extensions)
    while not der_at_end(&extensions):
        count += 1
        if count > MAX_REQUESTED_EXTENSIONS:
            return malformed_because(failure, "more than 64 requested extensions")
        if expect(&extensions, 0x30, &extension, "requested extension", failure) < 0:
            return -1
        der_enter(&extension, &extension_cursor)
        if expect(&extension_cursor, 0x06, &oid, "requested extension OID", failure) < 0:
            return -1
        if der_next(&extension_cursor, &part) != DER_OK:
            return malformed_because(failure, "requested extension has no value")
        if part.tag == 0x01:
            if part.content[0] != 0xFF:
                return malformed_because(failure, "requested extension encodes critical FALSE (DER omits defaults)")
            if der_next(&extension_cursor, &part) != DER_OK:
                return malformed_because(failure, "requested extension has no value")
        if part.tag != 0x04:
            return malformed_because(failure, "requested extension value is not an OCTET STRING")
        if expect_end(&extension_cursor, "requested extension", failure) < 0:
            return -1
        der_cursor(&earlier, sequence.content, <size_t>(extension.start - sequence.content))
        while not der_at_end(&earlier):
            der_next(&earlier, &previous)
            der_enter(&previous, &previous_cursor)
            der_next(&previous_cursor, &previous_oid)
            if previous_oid.content_size == oid.content_size and \
                    memcmp(previous_oid.content, oid.content, oid.content_size) == 0:
                return malformed_because(failure, "an extension is requested twice")
        if der_oid_is(&oid, &OID_SUBJECT_ALT_NAME):
            if check_requested_san(&part, failure) < 0:
                return -1
    return 0


cdef int parse_attributes(const DerTlv* attributes, CsrParsed* csr, Failure* failure) noexcept nogil:
    cdef DerCursor cursor, attribute_cursor
    cdef DerTlv attribute, oid, values
    csr.extensions.data = NULL
    csr.extensions.size = 0
    der_enter(attributes, &cursor)
    while not der_at_end(&cursor):
        if expect(&cursor, 0x30, &attribute, "attribute", failure) < 0:
            return -1
        der_enter(&attribute, &attribute_cursor)
        if expect(&attribute_cursor, 0x06, &oid, "attribute type", failure) < 0:
            return -1
        if expect(&attribute_cursor, 0x31, &values, "attribute values", failure) < 0:
            return -1
        if expect_end(&attribute_cursor, "attribute", failure) < 0:
            return -1
        if values.content_size == 0:
            return malformed_because(failure, "attribute has no values")
        if der_oid_is(&oid, &OID_EXTENSION_REQUEST):
            if csr.extensions.data != NULL:
                return malformed_because(failure, "more than one extensionRequest attribute")
            if parse_extension_request(&values, csr, failure) < 0:
                return -1
    return 0


cdef int parse_signature_algorithm(const DerTlv* algorithm, CsrParsed* csr, Failure* failure) noexcept nogil:
    cdef DerCursor cursor
    cdef DerTlv oid, parameters
    cdef bint has_parameters
    cdef int i
    cdef const SignatureAlgorithm* known = NULL
    cdef char dotted[96]
    der_enter(algorithm, &cursor)
    if expect(&cursor, 0x06, &oid, "signature algorithm", failure) < 0:
        return -1
    has_parameters = der_next(&cursor, &parameters) == DER_OK
    if expect_end(&cursor, "signature algorithm", failure) < 0:
        return -1
    for i in range(SIGNATURE_ALGORITHM_COUNT):
        if der_oid_is(&oid, &SIGNATURE_ALGORITHMS[i].oid):
            known = &SIGNATURE_ALGORITHMS[i]
            break
    if known == NULL:
        der_oid_text(oid.content, oid.content_size, dotted, sizeof(dotted))
        snprintf(failure.message, sizeof(failure.message),
                 "CSR signature algorithm %s is not allowed; %s", dotted, NOT_SUPPORTED)
        failure.code = FAIL_CSR_ALGORITHM
        return -1
    if known.digest == 0:
        snprintf(failure.message, sizeof(failure.message),
                 "CSR signature algorithm %s is not allowed; %s", known.name, known.refusal)
        failure.code = FAIL_CSR_ALGORITHM
        return -1
    if has_parameters and (known.ecdsa or parameters.tag != 0x05):
        snprintf(failure.message, sizeof(failure.message), "CSR signature algorithm %s has %s",
                 known.name, "parameters (ECDSA takes none)" if known.ecdsa else "parameters other than NULL")
        failure.code = FAIL_CSR_ALGORITHM
        return -1
    csr.signature_algorithm = known.name
    csr.digest = known.digest
    csr.ecdsa = known.ecdsa
    return 0


cdef int parse_rsa_key(const DerTlv* key_bits, CsrParsed* csr, Failure* failure) noexcept nogil:
    cdef DerCursor outer, cursor
    cdef DerTlv sequence, modulus, exponent
    cdef const unsigned char* magnitude
    cdef size_t size
    cdef unsigned char top
    cdef int bits
    cdef int status = der_check_tree(key_bits.content + 1, key_bits.content_size - 1)
    if status != DER_OK:
        return malformed(failure, "RSAPublicKey", status)
    der_cursor(&outer, key_bits.content + 1, key_bits.content_size - 1)
    if expect(&outer, 0x30, &sequence, "RSAPublicKey", failure) < 0:
        return -1
    der_enter(&sequence, &cursor)
    if expect(&cursor, 0x02, &modulus, "RSA modulus", failure) < 0:
        return -1
    if expect(&cursor, 0x02, &exponent, "RSA public exponent", failure) < 0:
        return -1
    if expect_end(&cursor, "RSAPublicKey", failure) < 0:
        return -1
    if modulus.content[0] & 0x80 or exponent.content[0] & 0x80:
        return fail(failure, FAIL_CSR_KEY, "RSA key has a negative modulus or exponent")
    magnitude = modulus.content
    size = modulus.content_size
    if magnitude[0] == 0:
        magnitude += 1
        size -= 1
    if size == 0:
        return fail(failure, FAIL_CSR_KEY, "RSA modulus is zero")
    bits = <int>(size * 8) if size <= 4096 else MAX_RSA_BITS + 1
    top = magnitude[0]
    while not (top & 0x80):
        top <<= 1
        bits -= 1
    if bits < MIN_RSA_BITS or bits > MAX_RSA_BITS:
        snprintf(failure.message, sizeof(failure.message),
                 "RSA key is %d bits; allowed are 2048 to 8192", bits)
        failure.code = FAIL_CSR_KEY
        return -1
    if exponent.content_size != 3 or exponent.content[0] != 0x01 or exponent.content[1] != 0x00 \
            or exponent.content[2] != 0x01:
        return fail(failure, FAIL_CSR_KEY, "RSA public exponent must be 65537")
    csr.key_type = KEY_RSA
    csr.key_bits = bits
    csr.curve = CURVE_NONE
    csr.rsa_modulus.data = magnitude
    csr.rsa_modulus.size = size
    csr.rsa_exponent.data = exponent.content
    csr.rsa_exponent.size = exponent.content_size
    return 0


cdef int parse_ec_key(const DerTlv* parameters, bint has_parameters, const DerTlv* key_bits,
                      CsrParsed* csr, Failure* failure) noexcept nogil:
    cdef int i
    cdef char dotted[96]
    cdef const char* name = NULL
    cdef size_t coordinate
    if not has_parameters or parameters.tag == 0x05:
        return fail(failure, FAIL_CSR_KEY, "EC key does not name its curve")
    if parameters.tag == 0x30:
        return fail(failure, FAIL_CSR_KEY, "EC key has explicit curve parameters; only named P-256/P-384 are allowed")
    if parameters.tag != 0x06:
        return fail(failure, FAIL_CSR_KEY, "EC key parameters are not a named curve")
    if der_oid_is(parameters, &OID_P256):
        csr.curve = CURVE_P256
        csr.key_bits = 256
        coordinate = 32
    elif der_oid_is(parameters, &OID_P384):
        csr.curve = CURVE_P384
        csr.key_bits = 384
        coordinate = 48
    else:
        for i in range(CURVE_NAME_COUNT):
            if der_oid_is(parameters, &CURVE_NAMES[i].oid):
                name = CURVE_NAMES[i].name
        if name == NULL:
            der_oid_text(parameters.content, parameters.content_size, dotted, sizeof(dotted))
            name = dotted
        snprintf(failure.message, sizeof(failure.message),
                 "EC curve %s is not allowed; use P-256 or P-384", name)
        failure.code = FAIL_CSR_KEY
        return -1
    if key_bits.content_size < 2 or key_bits.content[1] != 0x04:
        return fail(failure, FAIL_CSR_KEY, "EC point must be uncompressed (04 || X || Y)")
    if key_bits.content_size != 2 + 2 * coordinate:
        return fail(failure, FAIL_CSR_KEY, "EC point has the wrong length for its curve")
    csr.key_type = KEY_EC
    csr.ec_point.data = key_bits.content + 1
    csr.ec_point.size = key_bits.content_size - 1
    return 0


cdef int parse_spki(const DerTlv* spki, CsrParsed* csr, Failure* failure) noexcept nogil:
    cdef DerCursor cursor, algorithm_cursor
    cdef DerTlv algorithm, oid, parameters, key_bits
    cdef bint has_parameters
    cdef char dotted[96]
    der_enter(spki, &cursor)
    if expect(&cursor, 0x30, &algorithm, "public key algorithm", failure) < 0:
        return -1
    if expect(&cursor, 0x03, &key_bits, "public key", failure) < 0:
        return -1
    if expect_end(&cursor, "SubjectPublicKeyInfo", failure) < 0:
        return -1
    if key_bits.content[0] != 0:
        return malformed_because(failure, "public key BIT STRING has unused bits")
    der_enter(&algorithm, &algorithm_cursor)
    if expect(&algorithm_cursor, 0x06, &oid, "public key algorithm", failure) < 0:
        return -1
    has_parameters = der_next(&algorithm_cursor, &parameters) == DER_OK
    if expect_end(&algorithm_cursor, "public key algorithm", failure) < 0:
        return -1
    if der_oid_is(&oid, &OID_RSA_ENCRYPTION):
        if not has_parameters or parameters.tag != 0x05:
            return fail(failure, FAIL_CSR_KEY, "rsaEncryption key parameters must be NULL")
        return parse_rsa_key(&key_bits, csr, failure)
    if der_oid_is(&oid, &OID_EC_PUBLIC_KEY):
        return parse_ec_key(&parameters, has_parameters, &key_bits, csr, failure)
    if der_oid_is(&oid, &OID_ED25519):
        return fail(failure, FAIL_CSR_KEY, "Ed25519 keys are not allowed; use RSA or EC P-256/P-384")
    der_oid_text(oid.content, oid.content_size, dotted, sizeof(dotted))
    snprintf(failure.message, sizeof(failure.message),
             "public key algorithm %s is not allowed; use RSA or EC P-256/P-384", dotted)
    failure.code = FAIL_CSR_KEY
    return -1


cdef int csr_parse(ByteSpan der, CsrParsed* csr, Failure* failure) noexcept nogil:
    """Strict structure, then signature algorithm, then key. Expects der to
    have passed csr_unwrap."""
    cdef DerCursor top, request, info
    cdef DerTlv request_tlv, info_tlv, algorithm, signature, version, subject, spki, attributes
    csr.der = der
    der_cursor(&top, der.data, der.size)
    der_next(&top, &request_tlv)
    der_enter(&request_tlv, &request)
    if expect(&request, 0x30, &info_tlv, "CertificationRequestInfo", failure) < 0:
        return -1
    if expect(&request, 0x30, &algorithm, "signatureAlgorithm", failure) < 0:
        return -1
    if expect(&request, 0x03, &signature, "signature", failure) < 0:
        return -1
    if expect_end(&request, "CertificationRequest", failure) < 0:
        return -1
    if signature.content[0] != 0:
        return malformed_because(failure, "signature BIT STRING has unused bits")
    der_enter(&info_tlv, &info)
    if expect(&info, 0x02, &version, "version", failure) < 0:
        return -1
    if version.content_size != 1 or version.content[0] != 0:
        return malformed_because(failure, "version must be 0 (v1)")
    if expect(&info, 0x30, &subject, "subject", failure) < 0:
        return -1
    if expect(&info, 0x30, &spki, "subjectPublicKeyInfo", failure) < 0:
        return -1
    if expect(&info, 0xA0, &attributes, "attributes", failure) < 0:
        return -1
    if expect_end(&info, "CertificationRequestInfo", failure) < 0:
        return -1
    if check_name(&subject, failure) < 0:
        return -1
    if parse_attributes(&attributes, csr, failure) < 0:
        return -1
    if parse_signature_algorithm(&algorithm, csr, failure) < 0:
        return -1
    if parse_spki(&spki, csr, failure) < 0:
        return -1
    if csr.ecdsa != (csr.key_type == KEY_EC):
        snprintf(failure.message, sizeof(failure.message),
                 "CSR signature algorithm %s does not match its %s key", csr.signature_algorithm,
                 "EC" if csr.key_type == KEY_EC else "RSA")
        failure.code = FAIL_CSR_ALGORITHM
        return -1
    csr.info.data = info_tlv.start
    csr.info.size = info_tlv.size
    csr.subject.data = subject.start
    csr.subject.size = subject.size
    csr.spki.data = spki.start
    csr.spki.size = spki.size
    csr.signature.data = signature.content + 1
    csr.signature.size = signature.content_size - 1
    return 0


# --- proof of possession ------------------------------------------------------

cdef size_t digest_of(int digest, const unsigned char* data, size_t size, unsigned char* out) noexcept nogil:
    if digest == DIGEST_SHA256:
        SHA256(data, size, out)
        return 32
    if digest == DIGEST_SHA384:
        SHA384(data, size, out)
        return 48
    SHA512(data, size, out)
    return 64


cdef int digest_nid(int digest) noexcept nogil:
    if digest == DIGEST_SHA256:
        return NID_sha256
    if digest == DIGEST_SHA384:
        return NID_sha384
    return NID_sha512


# verify_rsa / verify_ec: 1 verified, 0 not verified, -1 failure recorded.

cdef int verify_rsa(const CsrParsed* csr, const unsigned char* digest, size_t digest_size,
                    Failure* failure) noexcept nogil:
    cdef RSA* rsa
    cdef BIGNUM* modulus
    cdef BIGNUM* exponent
    cdef int verified
    if csr.signature.size != csr.rsa_modulus.size:
        return fail(failure, FAIL_CSR_SIGNATURE, "CSR signature length does not match the RSA key size")
    rsa = RSA_new()
    modulus = BN_bin2bn(csr.rsa_modulus.data, <int>csr.rsa_modulus.size, NULL)
    exponent = BN_bin2bn(csr.rsa_exponent.data, <int>csr.rsa_exponent.size, NULL)
    if rsa == NULL or modulus == NULL or exponent == NULL or RSA_set0_key(rsa, modulus, exponent, NULL) != 1:
        BN_free(modulus)
        BN_free(exponent)
        RSA_free(rsa)
        return fail(failure, FAIL_INTERNAL, "out of memory building the CSR's RSA key")
    verified = RSA_verify(digest_nid(csr.digest), digest, <unsigned int>digest_size,
                          csr.signature.data, <unsigned int>csr.signature.size, rsa)
    RSA_free(rsa)
    return verified == 1


cdef int verify_ec(const CsrParsed* csr, const unsigned char* digest, size_t digest_size,
                   Failure* failure) noexcept nogil:
    cdef EC_KEY* key = EC_KEY_new()
    cdef int verified
    if key == NULL or EC_KEY_set_group(key, P256_GROUP if csr.curve == CURVE_P256 else P384_GROUP) != 1:
        EC_KEY_free(key)
        return fail(failure, FAIL_INTERNAL, "out of memory building the CSR's EC key")
    # oct2point checks that the point satisfies the curve equation; the
    # groups have cofactor 1, so that is the whole public-key check.
    if EC_KEY_oct2key(key, csr.ec_point.data, csr.ec_point.size, NULL) != 1:
        EC_KEY_free(key)
        ERR_clear_error()
        return fail(failure, FAIL_CSR_KEY, "EC public key is not a point on its curve")
    verified = ECDSA_verify(0, digest, <int>digest_size, csr.signature.data, <int>csr.signature.size, key)
    EC_KEY_free(key)
    return verified == 1      # -1 (an unparsable signature) is a failed proof too


cdef int csr_verify_possession(const CsrParsed* csr, Failure* failure) noexcept nogil:
    cdef unsigned char digest[64]
    cdef size_t digest_size = digest_of(csr.digest, csr.info.data, csr.info.size, digest)
    cdef int verified
    if csr.key_type == KEY_RSA:
        verified = verify_rsa(csr, digest, digest_size, failure)
    else:
        verified = verify_ec(csr, digest, digest_size, failure)
    if verified < 0:
        return -1
    if verified == 1:
        return 0
    ERR_clear_error()
    return fail(failure, FAIL_CSR_SIGNATURE,
                "CSR signature does not verify with its own public key (no proof of possession)")


cdef int csr_load_verified(const unsigned char* data, size_t size, size_t max_size, CsrParsed* csr,
                           unsigned char** owned, Failure* failure) noexcept nogil:
    cdef ByteSpan der
    if csr_unwrap(data, size, max_size, &der, owned, failure) < 0:
        return -1
    if csr_parse(der, csr, failure) < 0:
        return -1
    return csr_verify_possession(csr, failure)


# --- Python face ----------------------------------------------------------------

cdef class CsrInfo:
    """What a CSR says about itself. Nothing in it is trusted for issuance
    except ``spki``, and only after ``verify_csr``."""

    def __repr__(self):
        return (f"CsrInfo(key_type={self.key_type!r}, key_bits={self.key_bits}, "
                f"signature_algorithm={self.signature_algorithm!r}, uris={self.uris!r})")


cdef inline bytes span_bytes(ByteSpan span):
    return (<const char*>span.data)[:span.size]


cdef collect_requested_extensions(const CsrParsed* csr, CsrInfo info):
    """Lists of requested SANs and extension OIDs; the structure was
    validated by csr_parse, so this walk does not re-check it."""
    cdef DerCursor extensions, extension, names_outer, names
    cdef DerTlv extension_tlv, oid, part, sequence, name
    if csr.extensions.data == NULL:
        return
    der_cursor(&extensions, csr.extensions.data, csr.extensions.size)
    while not der_at_end(&extensions):
        der_next(&extensions, &extension_tlv)
        der_enter(&extension_tlv, &extension)
        der_next(&extension, &oid)
        der_next(&extension, &part)
        if part.tag == 0x01:
            der_next(&extension, &part)
        info.requested_extensions.append(oid_to_dotted(oid.content, oid.content_size))
        if not der_oid_is(&oid, &OID_SUBJECT_ALT_NAME):
            continue
        der_cursor(&names_outer, part.content, part.content_size)
        der_next(&names_outer, &sequence)
        der_enter(&sequence, &names)
        while not der_at_end(&names):
            der_next(&names, &name)
            value = (<const char*>name.content)[:name.content_size]
            if name.tag == 0x86:
                info.uris.append(value.decode("ascii"))
            elif name.tag == 0x82:
                info.dns_names.append(value.decode("ascii"))
            elif name.tag == 0x81:
                info.emails.append(value.decode("ascii"))
            elif name.tag == 0x87:
                info.ip_addresses.append(value)


cdef CsrInfo csr_info_from(const CsrParsed* csr):
    cdef CsrInfo info = CsrInfo.__new__(CsrInfo)
    info.der = span_bytes(csr.der)
    info.info = span_bytes(csr.info)
    info.subject = span_bytes(csr.subject)
    info.spki = span_bytes(csr.spki)
    info.key_bits = csr.key_bits
    if csr.key_type == KEY_RSA:
        info.key_type = "rsa"
        info.curve = None
        info.rsa_exponent = int.from_bytes(span_bytes(csr.rsa_exponent), "big")
    else:
        info.key_type = "ec"
        info.curve = "secp256r1" if csr.curve == CURVE_P256 else "secp384r1"
        info.rsa_exponent = None
    info.signature_algorithm = csr.signature_algorithm.decode("ascii")
    info.signature = span_bytes(csr.signature)
    info.uris = []
    info.dns_names = []
    info.ip_addresses = []
    info.emails = []
    info.requested_extensions = []
    collect_requested_extensions(csr, info)
    return info


def load_csr_der(bytes data not None, Py_ssize_t max_size=MAX_CSR_BYTES_DEFAULT) -> bytes:
    """PEM (exactly one CERTIFICATE REQUEST block, nothing else but
    whitespace) or DER in; strict DER of one CertificationRequest out."""
    cdef ByteSpan der
    cdef unsigned char* owned = NULL
    cdef Failure failure
    cdef int status
    cdef const unsigned char* text = data
    cdef size_t size = len(data)
    if max_size < 0:
        raise ValueError("max_size must not be negative")
    with nogil:
        status = csr_unwrap(text, size, <size_t>max_size, &der, &owned, &failure)
    try:
        if status < 0:
            raise failure_to_error(&failure)
        if owned == NULL:
            return data
        return span_bytes(der)
    finally:
        free(owned)


cdef CsrInfo load(bytes data, Py_ssize_t max_size, bint verify):
    cdef ByteSpan der
    cdef CsrParsed csr
    cdef unsigned char* owned = NULL
    cdef Failure failure
    cdef int status
    cdef const unsigned char* text = data
    cdef size_t size = len(data)
    if max_size < 0:
        raise ValueError("max_size must not be negative")
    with nogil:
        status = csr_unwrap(text, size, <size_t>max_size, &der, &owned, &failure)
        if status == 0:
            status = csr_parse(der, &csr, &failure)
        if status == 0 and verify:
            status = csr_verify_possession(&csr, &failure)
    try:
        if status < 0:
            raise failure_to_error(&failure)
        return csr_info_from(&csr)
    finally:
        free(owned)


def parse_csr(bytes data not None, Py_ssize_t max_size=MAX_CSR_BYTES_DEFAULT) -> CsrInfo:
    """Strict parse + key classification; does not verify the signature."""
    return load(data, max_size, False)


def verify_csr(bytes data not None, Py_ssize_t max_size=MAX_CSR_BYTES_DEFAULT) -> CsrInfo:
    """parse_csr + proof of possession (the self-signature verified with the
    CSR's own key; point on the curve checked)."""
    return load(data, max_size, True)
