"""The post-issuance profile check: every issued certificate is read back by
the strict DER reader (not by the writer that built it) and compared, field
by field, with what was asked and with the profile (docs/cert-profile.md):
SPIRE's "validate every minted certificate". A certificate that fails is
never returned; the failure means a bug or a faulty component, never bad
input, so it is reported as E_INTERNAL.

The whole batch is checked in one nogil section; per certificate it is one
pass over ~40 TLVs, a few memcmp and two time decodings.
"""

from libc.stdint cimport int64_t
from libc.stdlib cimport calloc, free
from libc.string cimport memcmp

from .asn1 cimport (
    DER_OK, DerCursor, DerTlv, der_at_end, der_check_tree, der_cursor, der_enter, der_expect, der_next,
)
from .csr cimport ByteSpan, CsrInfo
from .errors cimport FAIL_INTERNAL, Failure, fail, failure_to_error
from .tbs cimport IssuerProfile, LeafSpec

cdef enum:
    MAX_CHECKED_NAMES = 32

# DER of the fixed extension values and OIDs the profile allows (the OID
# contents, without tag and length).
cdef const unsigned char* OID_KEY_USAGE = b"\x55\x1d\x0f"
cdef const unsigned char* OID_EXT_KEY_USAGE = b"\x55\x1d\x25"
cdef const unsigned char* OID_BASIC_CONSTRAINTS = b"\x55\x1d\x13"
cdef const unsigned char* OID_AUTHORITY_KEY_ID = b"\x55\x1d\x23"
cdef const unsigned char* OID_SUBJECT_ALT_NAME = b"\x55\x1d\x11"
cdef const unsigned char* OID_RSA_ENCRYPTION = b"\x2a\x86\x48\x86\xf7\x0d\x01\x01\x01"
cdef const unsigned char* KU_RSA = b"\x03\x02\x05\xa0"
cdef const unsigned char* KU_EC = b"\x03\x02\x07\x80"
cdef const unsigned char* EKU_SERVER_CLIENT = b"\x30\x14\x06\x08\x2b\x06\x01\x05\x05\x07\x03\x01\x06\x08\x2b\x06\x01\x05\x05\x07\x03\x02"
cdef const unsigned char* EMPTY_SEQUENCE = b"\x30\x00"
cdef const unsigned char* VERSION_V3 = b"\x02\x01\x02"


ctypedef struct Expected:
    ByteSpan certificate
    ByteSpan spki
    ByteSpan spiffe_id
    ByteSpan serial               # the 16 random octets; the profile's bit rule is applied here
    int64_t not_before
    int64_t not_after
    ByteSpan names[MAX_CHECKED_NAMES]   # DNS names, then IP addresses
    size_t dns_count
    size_t ip_count
    Failure failure


ctypedef struct Profile:
    ByteSpan signature_algorithm
    ByteSpan issuer_name
    ByteSpan authority_key_id
    bint istio_key_usage


cdef inline bint span_is(const DerTlv* tlv, ByteSpan span) noexcept nogil:
    return tlv.content_size == span.size and memcmp(tlv.content, span.data, span.size) == 0


cdef inline bint whole_is(const DerTlv* tlv, ByteSpan span) noexcept nogil:
    return tlv.size == span.size and memcmp(tlv.start, span.data, span.size) == 0


cdef inline bint bytes_are(const DerTlv* tlv, const unsigned char* value, size_t size) noexcept nogil:
    return tlv.size == size and memcmp(tlv.start, value, size) == 0


cdef inline bint oid_is(const DerTlv* tlv, const unsigned char* content, size_t size) noexcept nogil:
    return tlv.tag == 0x06 and tlv.content_size == size and memcmp(tlv.content, content, size) == 0


cdef int64_t days_from_civil(int64_t y, int64_t m, int64_t d) noexcept nogil:
    # Howard Hinnant's algorithm: days since 1970-01-01 of a proleptic Gregorian date.
    y -= m <= 2
    cdef int64_t era = (y if y >= 0 else y - 399) // 400
    cdef int64_t yoe = y - era * 400
    cdef int64_t doy = (153 * (m + (-3 if m > 2 else 9)) + 2) // 5 + d - 1
    cdef int64_t doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468


cdef int digits(const unsigned char* p, int count, int64_t* out) noexcept nogil:
    cdef int i
    cdef int64_t value = 0
    for i in range(count):
        if p[i] < 48 or p[i] > 57:       # '0'..'9'
            return -1
        value = value * 10 + (p[i] - 48)
    out[0] = value
    return 0


cdef int read_time(const DerTlv* tlv, int64_t* out) noexcept nogil:
    """UTCTime YYMMDDHHMMSSZ for 1950 through 2049, GeneralizedTime
    YYYYMMDDHHMMSSZ outside them (RFC 5280 4.1.2.5; what derbuf_time writes
    for years 0000..9999); anything else fails."""
    cdef const unsigned char* p = tlv.content
    cdef int64_t year, month, day, hour, minute, second
    cdef int offset
    if tlv.tag == 0x17 and tlv.content_size == 13:
        if digits(p, 2, &year) < 0:
            return -1
        year += 2000 if year < 50 else 1900
        offset = 2
    elif tlv.tag == 0x18 and tlv.content_size == 15:
        if digits(p, 4, &year) < 0 or 1950 <= year < 2050:
            return -1
        offset = 4
    else:
        return -1
    if p[tlv.content_size - 1] != 90:    # 'Z'
        return -1
    if (digits(p + offset, 2, &month) < 0 or digits(p + offset + 2, 2, &day) < 0
            or digits(p + offset + 4, 2, &hour) < 0 or digits(p + offset + 6, 2, &minute) < 0
            or digits(p + offset + 8, 2, &second) < 0):
        return -1
    if not (1 <= month <= 12 and 1 <= day <= 31 and hour < 24 and minute < 60 and second < 60):
        return -1
    out[0] = days_from_civil(year, month, day) * 86400 + hour * 3600 + minute * 60 + second
    return 0


cdef int check_names(const DerTlv* value, Expected* e) noexcept nogil:
    """SAN: GeneralNames = the URI, then the DNS names, then the IPs, exactly."""
    cdef DerCursor outer, names
    cdef DerTlv tlv, seq
    cdef size_t i
    der_cursor(&outer, value.content, value.content_size)
    if der_expect(&outer, 0x30, &seq) != DER_OK or not der_at_end(&outer):
        return fail(&e.failure, FAIL_INTERNAL, "issued certificate: SAN is not one GeneralNames")
    der_enter(&seq, &names)
    if der_next(&names, &tlv) != DER_OK or tlv.tag != 0x86 or not span_is(&tlv, e.spiffe_id):
        return fail(&e.failure, FAIL_INTERNAL, "issued certificate: first SAN is not the authorised SPIFFE ID")
    for i in range(e.dns_count):
        if der_next(&names, &tlv) != DER_OK or tlv.tag != 0x82 or not span_is(&tlv, e.names[i]):
            return fail(&e.failure, FAIL_INTERNAL, "issued certificate: DNS SANs differ from the request")
    for i in range(e.ip_count):
        if der_next(&names, &tlv) != DER_OK or tlv.tag != 0x87 or not span_is(&tlv, e.names[e.dns_count + i]):
            return fail(&e.failure, FAIL_INTERNAL, "issued certificate: IP SANs differ from the request")
    if not der_at_end(&names):
        return fail(&e.failure, FAIL_INTERNAL, "issued certificate: SAN carries names nobody asked for")
    return 0


cdef int check_extensions(const DerTlv* wrapper, const Profile* profile, bint rsa_key, Expected* e) noexcept nogil:
    cdef DerCursor outer, list_, ext
    cdef DerTlv seq, item, oid, tlv, value
    cdef bint critical
    cdef unsigned int seen = 0
    cdef unsigned int bit
    cdef DerCursor aki
    cdef DerTlv aki_seq, key_id
    der_cursor(&outer, wrapper.content, wrapper.content_size)
    if der_expect(&outer, 0x30, &seq) != DER_OK or not der_at_end(&outer):
        return fail(&e.failure, FAIL_INTERNAL, "issued certificate: extensions are not one SEQUENCE")
    der_enter(&seq, &list_)
    while not der_at_end(&list_):
        if der_expect(&list_, 0x30, &item) != DER_OK:
            return fail(&e.failure, FAIL_INTERNAL, "issued certificate: an extension is not a SEQUENCE")
        der_enter(&item, &ext)
        if der_expect(&ext, 0x06, &oid) != DER_OK or der_next(&ext, &tlv) != DER_OK:
            return fail(&e.failure, FAIL_INTERNAL, "issued certificate: malformed extension")
        critical = False
        if tlv.tag == 0x01:
            # DER: the default FALSE is never encoded.
            if tlv.content_size != 1 or tlv.content[0] != 0xFF:
                return fail(&e.failure, FAIL_INTERNAL, "issued certificate: critical FALSE encoded")
            critical = True
            if der_next(&ext, &tlv) != DER_OK:
                return fail(&e.failure, FAIL_INTERNAL, "issued certificate: extension without a value")
        if tlv.tag != 0x04 or not der_at_end(&ext):
            return fail(&e.failure, FAIL_INTERNAL, "issued certificate: malformed extension value")
        value = tlv
        if oid_is(&oid, OID_KEY_USAGE, 3):
            bit = 1
            if not critical or not (bytes_are_content(&value, KU_RSA if (rsa_key or profile.istio_key_usage)
                                                      else KU_EC, 4)):
                return fail(&e.failure, FAIL_INTERNAL, "issued certificate: KeyUsage is not the profile's")
        elif oid_is(&oid, OID_EXT_KEY_USAGE, 3):
            bit = 2
            if critical or not bytes_are_content(&value, EKU_SERVER_CLIENT, 22):
                return fail(&e.failure, FAIL_INTERNAL, "issued certificate: ExtKeyUsage is not serverAuth+clientAuth")
        elif oid_is(&oid, OID_BASIC_CONSTRAINTS, 3):
            bit = 4
            if not critical or not bytes_are_content(&value, EMPTY_SEQUENCE, 2):
                return fail(&e.failure, FAIL_INTERNAL, "issued certificate: BasicConstraints is not critical CA:FALSE")
        elif oid_is(&oid, OID_AUTHORITY_KEY_ID, 3):
            bit = 8
            der_cursor(&aki, value.content, value.content_size)
            if (critical or der_expect(&aki, 0x30, &aki_seq) != DER_OK or not der_at_end(&aki)):
                return fail(&e.failure, FAIL_INTERNAL, "issued certificate: malformed AuthorityKeyIdentifier")
            der_enter(&aki_seq, &aki)
            if (der_expect(&aki, 0x80, &key_id) != DER_OK or not der_at_end(&aki)
                    or not span_is(&key_id, profile.authority_key_id)):
                return fail(&e.failure, FAIL_INTERNAL, "issued certificate: AKI is not the CA's key identifier")
        elif oid_is(&oid, OID_SUBJECT_ALT_NAME, 3):
            bit = 16
            if not critical:
                return fail(&e.failure, FAIL_INTERNAL, "issued certificate: SAN is not critical (subject is empty)")
            if check_names(&value, e) < 0:
                return -1
        else:
            return fail(&e.failure, FAIL_INTERNAL, "issued certificate: carries an extension outside the profile")
        if seen & bit:
            return fail(&e.failure, FAIL_INTERNAL, "issued certificate: an extension appears twice")
        seen |= bit
    if seen != 31:
        return fail(&e.failure, FAIL_INTERNAL, "issued certificate: a profile extension is missing")
    return 0


cdef inline bint bytes_are_content(const DerTlv* tlv, const unsigned char* value, size_t size) noexcept nogil:
    return tlv.content_size == size and memcmp(tlv.content, value, size) == 0


cdef bint spki_is_rsa(ByteSpan spki) noexcept nogil:
    cdef DerCursor cursor, inner, alg
    cdef DerTlv seq, algorithm, oid
    der_cursor(&cursor, spki.data, spki.size)
    if der_expect(&cursor, 0x30, &seq) != DER_OK:
        return False
    der_enter(&seq, &inner)
    if der_expect(&inner, 0x30, &algorithm) != DER_OK:
        return False
    der_enter(&algorithm, &alg)
    return der_expect(&alg, 0x06, &oid) == DER_OK and oid_is(&oid, OID_RSA_ENCRYPTION, 9)


cdef int check_certificate(const Profile* profile, Expected* e) noexcept nogil:
    cdef DerCursor top, cert, tbs, validity
    cdef DerTlv whole, tbs_tlv, tlv, times
    cdef int64_t when
    cdef unsigned char first
    if der_check_tree(e.certificate.data, e.certificate.size) != DER_OK:
        return fail(&e.failure, FAIL_INTERNAL, "issued certificate is not strict DER")
    der_cursor(&top, e.certificate.data, e.certificate.size)
    if der_expect(&top, 0x30, &whole) != DER_OK or not der_at_end(&top):
        return fail(&e.failure, FAIL_INTERNAL, "issued certificate is not one SEQUENCE")
    der_enter(&whole, &cert)
    if der_expect(&cert, 0x30, &tbs_tlv) != DER_OK:
        return fail(&e.failure, FAIL_INTERNAL, "issued certificate has no TBSCertificate")
    if der_next(&cert, &tlv) != DER_OK or not whole_is(&tlv, profile.signature_algorithm):
        return fail(&e.failure, FAIL_INTERNAL, "issued certificate: signatureAlgorithm is not the CA's")
    if (der_expect(&cert, 0x03, &tlv) != DER_OK or tlv.content_size < 2 or tlv.content[0] != 0
            or not der_at_end(&cert)):
        return fail(&e.failure, FAIL_INTERNAL, "issued certificate: malformed signature value")
    der_enter(&tbs_tlv, &tbs)
    if der_expect(&tbs, 0xA0, &tlv) != DER_OK or not bytes_are_content(&tlv, VERSION_V3, 3):
        return fail(&e.failure, FAIL_INTERNAL, "issued certificate is not v3")
    if der_expect(&tbs, 0x02, &tlv) != DER_OK or tlv.content_size != 16:
        return fail(&e.failure, FAIL_INTERNAL, "issued certificate: serial is not 16 octets")
    first = (e.serial.data[0] & 0x7F) | 0x40
    if tlv.content[0] != first or memcmp(tlv.content + 1, e.serial.data + 1, 15) != 0:
        return fail(&e.failure, FAIL_INTERNAL, "issued certificate: serial differs from the one drawn")
    if der_next(&tbs, &tlv) != DER_OK or not whole_is(&tlv, profile.signature_algorithm):
        return fail(&e.failure, FAIL_INTERNAL, "issued certificate: TBS signature algorithm is not the CA's")
    if der_next(&tbs, &tlv) != DER_OK or not whole_is(&tlv, profile.issuer_name):
        return fail(&e.failure, FAIL_INTERNAL, "issued certificate: issuer is not the CA's subject")
    if der_expect(&tbs, 0x30, &times) != DER_OK:
        return fail(&e.failure, FAIL_INTERNAL, "issued certificate: malformed validity")
    der_enter(&times, &validity)
    if der_next(&validity, &tlv) != DER_OK or read_time(&tlv, &when) < 0 or when != e.not_before:
        return fail(&e.failure, FAIL_INTERNAL, "issued certificate: notBefore differs from the window")
    if (der_next(&validity, &tlv) != DER_OK or read_time(&tlv, &when) < 0 or when != e.not_after
            or not der_at_end(&validity)):
        return fail(&e.failure, FAIL_INTERNAL, "issued certificate: notAfter differs from the window")
    if der_next(&tbs, &tlv) != DER_OK or not bytes_are(&tlv, EMPTY_SEQUENCE, 2):
        return fail(&e.failure, FAIL_INTERNAL, "issued certificate: subject is not empty")
    if der_next(&tbs, &tlv) != DER_OK or not whole_is(&tlv, e.spki):
        return fail(&e.failure, FAIL_INTERNAL, "issued certificate: public key is not the CSR's")
    if der_expect(&tbs, 0xA3, &tlv) != DER_OK or not der_at_end(&tbs):
        return fail(&e.failure, FAIL_INTERNAL, "issued certificate: extensions missing or followed by more")
    return check_extensions(&tlv, profile, spki_is_rsa(e.spki), e)


cdef inline ByteSpan span_of(bytes value):
    cdef ByteSpan span
    span.data = <const unsigned char*><const char*>value
    span.size = len(value)
    return span


def check_issued_batch(IssuerProfile profile not None, certificates, specs, csrs) -> list:
    """Per certificate: None if it is exactly what ``spec`` asked for (with the
    verified CSR's key) under the profile, else NativeError(E_INTERNAL)."""
    cdef Profile p
    cdef Expected* expected = NULL
    cdef Expected* e
    cdef Py_ssize_t count, index
    cdef LeafSpec spec
    cdef CsrInfo csr
    cdef bytes encoded
    certificates = list(certificates)
    specs = list(specs)
    csrs = list(csrs)
    count = len(certificates)
    if len(specs) != count or len(csrs) != count:
        raise ValueError("check_issued_batch needs one spec and one CSR per certificate")
    if count == 0:
        return []
    keep_alive = []
    p.signature_algorithm = span_of(profile.signature_algorithm)
    p.issuer_name = span_of(profile.issuer_name)
    p.authority_key_id = span_of(profile.authority_key_id)
    p.istio_key_usage = profile.istio_key_usage
    try:
        expected = <Expected*>calloc(count, sizeof(Expected))
        if expected == NULL:
            raise MemoryError()
        for index in range(count):
            e = &expected[index]
            certificate = certificates[index]
            spec = specs[index]
            csr = csrs[index]
            if not isinstance(certificate, bytes):
                raise TypeError("certificates must be bytes")
            if len(spec.serial) != 16:
                fail(&e.failure, FAIL_INTERNAL, "serial must be 16 random bytes")
                continue
            if len(spec.dns_names) + len(spec.ip_addresses) > MAX_CHECKED_NAMES:
                fail(&e.failure, FAIL_INTERNAL, "too many names to check")
                continue
            e.certificate = span_of(certificate)
            e.spki = span_of(csr.spki)
            encoded = spec.spiffe_id.encode("ascii", "replace")
            keep_alive.append(encoded)
            e.spiffe_id = span_of(encoded)
            e.serial = span_of(spec.serial)
            e.not_before = spec.not_before
            e.not_after = spec.not_after
            for name in spec.dns_names:
                encoded = name.encode("ascii", "replace")
                keep_alive.append(encoded)
                e.names[e.dns_count] = span_of(encoded)
                e.dns_count += 1
            for address in spec.ip_addresses:
                e.names[e.dns_count + e.ip_count] = span_of(address)
                e.ip_count += 1
        with nogil:
            for index in range(count):
                if not expected[index].failure.code:
                    check_certificate(&p, &expected[index])
        return [failure_to_error(&expected[index].failure) if expected[index].failure.code else None
                for index in range(count)]
    finally:
        free(expected)
