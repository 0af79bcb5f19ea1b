"""Leaf TBSCertificate and Certificate assembly (docs/cert-profile.md table).

Per certificate the work is memcpy of profile templates plus a handful of
length back-patches; the batch entry points convert inputs with the GIL,
run every item's parse, proof of possession and assembly in one nogil
section, and build Python results afterwards.
"""

from libc.stdint cimport int64_t
from libc.stdlib cimport calloc, free
from libc.string cimport memcmp, memcpy

from .asn1 cimport DER_OK, DerCursor, DerTlv, der_cursor, der_next
from .csr cimport (
    DIGEST_SHA256, DIGEST_SHA384, DIGEST_SHA512, KEY_RSA, MAX_CSR_BYTES_DEFAULT, csr_info_from,
    csr_load_verified, digest_nid, digest_of,
)
from .der cimport (
    derbuf_begin, derbuf_end, derbuf_free, derbuf_init, derbuf_primitive, derbuf_raw, derbuf_time,
    derbuf_to_bytes, derbuf_unsigned_integer, der_time_in_range,
)
from .errors cimport FAIL_IDENTITY, FAIL_INTERNAL, FAIL_SIGNATURE, Failure, fail, failure_to_error
from .openssl cimport (
    EC_KEY_free, ECDSA_verify, EVP_PKEY, EVP_PKEY_EC, EVP_PKEY_RSA, EVP_PKEY_free, EVP_PKEY_get1_EC_KEY,
    EVP_PKEY_get1_RSA, EVP_PKEY_get_base_id, ERR_clear_error, RSA_free, RSA_verify, d2i_PUBKEY,
)
from .san cimport check_dns_name, check_ip, check_spiffe_id

from .asn1 import walk_der
from .der import DerWriter
from .errors import NativeError

cdef const unsigned char* VERSION_V3 = b"\xa0\x03\x02\x01\x02"
cdef const unsigned char* EMPTY_SEQUENCE = b"\x30\x00"
cdef const unsigned char* BIT_STRING_NO_UNUSED_BITS = b"\x00"

# Constant per-certificate overhead beyond the variable parts, rounded up so
# that assembling a TBS never reallocates.
cdef enum:
    TBS_FIXED_OVERHEAD = 160
    CERTIFICATE_OVERHEAD = 32


cdef bytes encode_signature_algorithm(str oid, bint null_parameters):
    writer = DerWriter()
    writer.begin(0x30)
    writer.oid(oid)
    if null_parameters:
        writer.primitive(0x05, b"")
    writer.end()
    return writer.getvalue()


# The CA's AlgorithmIdentifier, matched by its exact DER (DER is canonical):
# RSA PKCS#1 v1.5 with NULL parameters, ECDSA without parameters.
CA_SIGNATURE_ALGORITHMS = {
    encode_signature_algorithm("1.2.840.113549.1.1.11", True): ("sha256", DIGEST_SHA256, False),
    encode_signature_algorithm("1.2.840.113549.1.1.12", True): ("sha384", DIGEST_SHA384, False),
    encode_signature_algorithm("1.2.840.113549.1.1.13", True): ("sha512", DIGEST_SHA512, False),
    encode_signature_algorithm("1.2.840.10045.4.3.2", False): ("sha256", DIGEST_SHA256, True),
    encode_signature_algorithm("1.2.840.10045.4.3.3", False): ("sha384", DIGEST_SHA384, True),
    encode_signature_algorithm("1.2.840.10045.4.3.4", False): ("sha512", DIGEST_SHA512, True),
}


cdef bytes encode_extension(str oid, bint critical, bytes value):
    writer = DerWriter()
    writer.begin(0x30)
    writer.oid(oid)
    if critical:
        writer.primitive(0x01, b"\xff")
    writer.primitive(0x04, value)
    writer.end()
    return writer.getvalue()


cdef bytes key_usage_extension(bytes bits):
    writer = DerWriter()
    writer.primitive(0x03, bits)
    return encode_extension("2.5.29.15", True, writer.getvalue())


cdef bytes constant_extensions():
    """ExtKeyUsage serverAuth+clientAuth, then BasicConstraints cA FALSE
    (the DER default, so an empty SEQUENCE)."""
    writer = DerWriter()
    writer.begin(0x30)
    writer.oid("1.3.6.1.5.5.7.3.1")
    writer.oid("1.3.6.1.5.5.7.3.2")
    writer.end()
    return (encode_extension("2.5.29.37", False, writer.getvalue())
            + encode_extension("2.5.29.19", True, b"\x30\x00"))


cdef bytes san_prefix():
    writer = DerWriter()
    writer.oid("2.5.29.17")
    writer.primitive(0x01, b"\xff")
    return writer.getvalue()


# digitalSignature + keyEncipherment for RSA keys, digitalSignature for EC.
cdef bytes KEY_USAGE_RSA = key_usage_extension(b"\x05\xa0")
cdef bytes KEY_USAGE_EC = key_usage_extension(b"\x07\x80")
cdef bytes EXTENDED_KEY_USAGE_AND_BASIC_CONSTRAINTS = constant_extensions()
cdef bytes SAN_PREFIX = san_prefix()


cdef inline ByteSpan span_of(bytes value):
    cdef ByteSpan span
    span.data = <const unsigned char*><const char*>value
    span.size = len(value)
    return span


cdef class IssuerProfile:
    """Everything about the signing CA that is the same for every leaf,
    pre-encoded once."""

    def __init__(self, bytes issuer_name not None, bytes authority_key_id not None,
                 bytes signature_algorithm not None, bytes ca_public_key not None, *,
                 bint istio_key_usage=False):
        cdef const unsigned char* key_data = ca_public_key
        cdef EVP_PKEY* public_key
        cdef int key_type
        known = CA_SIGNATURE_ALGORITHMS.get(signature_algorithm)
        if known is None:
            raise ValueError("signature_algorithm must be the DER AlgorithmIdentifier of "
                             "sha256/384/512WithRSAEncryption (NULL parameters) or "
                             "ecdsa-with-SHA256/384/512 (no parameters)")
        try:
            elements = walk_der(issuer_name)
        except NativeError as error:
            raise ValueError(f"issuer_name is not strict DER: {error}") from None
        if elements[0][1] != 0x30:
            raise ValueError("issuer_name is not a DER Name (SEQUENCE)")
        if not authority_key_id:
            raise ValueError("authority_key_id is empty")
        self.hash_name, self.digest, self.ecdsa = known
        # Parsed once per profile through the EVP decoder, then held as a
        # legacy RSA/EC_KEY: verifying with RSA_verify/ECDSA_verify on a
        # one-shot digest skips EVP_DigestVerifyInit's per-call fetches.
        public_key = d2i_PUBKEY(NULL, &key_data, len(ca_public_key))
        if public_key == NULL or key_data != <const unsigned char*>ca_public_key + len(ca_public_key):
            EVP_PKEY_free(public_key)
            ERR_clear_error()
            raise ValueError("ca_public_key is not a DER SubjectPublicKeyInfo")
        key_type = EVP_PKEY_get_base_id(public_key)
        if key_type != (EVP_PKEY_EC if self.ecdsa else EVP_PKEY_RSA):
            EVP_PKEY_free(public_key)
            raise ValueError("ca_public_key does not match the signature algorithm's key type")
        self.release_ca_key()
        if self.ecdsa:
            self.ca_ec_key = EVP_PKEY_get1_EC_KEY(public_key)
        else:
            self.ca_rsa_key = EVP_PKEY_get1_RSA(public_key)
        EVP_PKEY_free(public_key)
        if self.ca_ec_key == NULL and self.ca_rsa_key == NULL:
            ERR_clear_error()
            raise MemoryError()
        self.signature_algorithm = signature_algorithm
        self.issuer_name = issuer_name
        self.authority_key_id = authority_key_id
        self.istio_key_usage = istio_key_usage
        self.signature_and_issuer = signature_algorithm + issuer_name
        writer = DerWriter()
        writer.begin(0x30)
        writer.primitive(0x80, authority_key_id)
        writer.end()
        tail = EXTENDED_KEY_USAGE_AND_BASIC_CONSTRAINTS + encode_extension("2.5.29.35", False, writer.getvalue())
        self.extensions_rsa_key = KEY_USAGE_RSA + tail
        self.extensions_ec_key = (KEY_USAGE_RSA if istio_key_usage else KEY_USAGE_EC) + tail

    cdef void release_ca_key(self):
        RSA_free(self.ca_rsa_key)
        EC_KEY_free(self.ca_ec_key)
        self.ca_rsa_key = NULL
        self.ca_ec_key = NULL

    def __dealloc__(self):
        self.release_ca_key()

    cdef void fill_template(self, TbsTemplate* template):
        template.signature_and_issuer = span_of(self.signature_and_issuer)
        template.extensions_rsa_key = span_of(self.extensions_rsa_key)
        template.extensions_ec_key = span_of(self.extensions_ec_key)
        template.san_prefix = span_of(SAN_PREFIX)

    cdef void fill_ca_key(self, CaKey* ca):
        ca.rsa_key = self.ca_rsa_key
        ca.ec_key = self.ca_ec_key
        ca.digest = self.digest
        ca.ecdsa = self.ecdsa
        ca.signature_algorithm = span_of(self.signature_algorithm)

    def __repr__(self):
        return f"IssuerProfile(hash_name={self.hash_name!r}, ecdsa={bool(self.ecdsa)})"


cdef class LeafSpec:
    """One leaf to build. Fields are validated by prepare_batch."""

    def __init__(self, bytes csr not None, str spiffe_id not None, bytes serial not None,
                 not_before, not_after, dns_names=(), ip_addresses=()):
        if not isinstance(not_before, int) or not isinstance(not_after, int):
            raise TypeError("not_before and not_after must be int unix seconds")
        self.csr = csr
        self.spiffe_id = spiffe_id
        self.serial = serial
        self.not_before = not_before
        self.not_after = not_after
        self.dns_names = tuple(dns_names)
        for name in self.dns_names:
            if not isinstance(name, str):
                raise TypeError(f"dns_names must be str, not {type(name).__name__}")
        self.ip_addresses = tuple(ip_addresses)
        for address in self.ip_addresses:
            if not isinstance(address, bytes):
                raise TypeError(f"ip_addresses must be bytes, not {type(address).__name__}")

    def __repr__(self):
        return (f"LeafSpec(spiffe_id={self.spiffe_id!r}, dns_names={self.dns_names!r}, "
                f"ip_addresses={self.ip_addresses!r})")


cdef class PreparedLeaf:

    def __repr__(self):
        return f"PreparedLeaf(tbs=<{len(self.tbs)} bytes>, csr={self.csr!r})"


cdef inline bint ascii_lower_equal(ByteSpan a, ByteSpan b) noexcept nogil:
    cdef size_t i
    if a.size != b.size:
        return False
    for i in range(a.size):
        if (a.data[i] | 0x20 if b'A' <= a.data[i] <= b'Z' else a.data[i]) != \
                (b.data[i] | 0x20 if b'A' <= b.data[i] <= b'Z' else b.data[i]):
            return False
    return True


cdef int check_identity(LeafJob* job) noexcept nogil:
    cdef size_t i, j
    if check_spiffe_id(job.spiffe_id, job.spiffe_id_size, &job.failure) < 0:
        return -1
    for i in range(job.dns_name_count):
        if check_dns_name(job.dns_names[i].data, job.dns_names[i].size, False, &job.failure) < 0:
            return -1
        for j in range(i):
            if ascii_lower_equal(job.dns_names[i], job.dns_names[j]):
                return fail(&job.failure, FAIL_IDENTITY, "DNS name listed twice")
    for i in range(job.ip_address_count):
        if check_ip(job.ip_addresses[i].size, &job.failure) < 0:
            return -1
        for j in range(i):
            if (job.ip_addresses[i].size == job.ip_addresses[j].size
                    and memcmp(job.ip_addresses[i].data, job.ip_addresses[j].data, job.ip_addresses[i].size) == 0):
                return fail(&job.failure, FAIL_IDENTITY, "IP address listed twice")
    return 0


cdef int tbs_build(const TbsTemplate* template, LeafJob* job) noexcept nogil:
    cdef DerBuf* out = &job.tbs
    cdef unsigned char serial[SERIAL_BYTES]
    cdef size_t i
    cdef size_t capacity = (TBS_FIXED_OVERHEAD + template.signature_and_issuer.size
                            + template.extensions_rsa_key.size + job.csr.spki.size
                            + job.spiffe_id_size)
    cdef ByteSpan extensions = (template.extensions_rsa_key if job.csr.key_type == KEY_RSA
                                else template.extensions_ec_key)
    for i in range(job.dns_name_count):
        capacity += job.dns_names[i].size + 4
    capacity += job.ip_address_count * 20
    if derbuf_init(out, capacity) < 0:
        return fail(&job.failure, FAIL_INTERNAL, "out of memory assembling the TBS")
    # Positive with a fixed 16-octet length: high bit clear, next bit set.
    memcpy(serial, job.serial, SERIAL_BYTES)
    serial[0] = (serial[0] & 0x7F) | 0x40
    derbuf_begin(out, 0x30)
    derbuf_raw(out, VERSION_V3, 5)
    derbuf_primitive(out, 0x02, serial, SERIAL_BYTES)
    derbuf_raw(out, template.signature_and_issuer.data, template.signature_and_issuer.size)
    derbuf_begin(out, 0x30)
    derbuf_time(out, job.not_before)
    derbuf_time(out, job.not_after)
    derbuf_end(out)
    derbuf_raw(out, EMPTY_SEQUENCE, 2)
    derbuf_raw(out, job.csr.spki.data, job.csr.spki.size)
    derbuf_begin(out, 0xA3)
    derbuf_begin(out, 0x30)
    derbuf_raw(out, extensions.data, extensions.size)
    derbuf_begin(out, 0x30)
    derbuf_raw(out, template.san_prefix.data, template.san_prefix.size)
    derbuf_begin(out, 0x04)
    derbuf_begin(out, 0x30)
    derbuf_primitive(out, 0x86, job.spiffe_id, job.spiffe_id_size)
    for i in range(job.dns_name_count):
        derbuf_primitive(out, 0x82, job.dns_names[i].data, job.dns_names[i].size)
    for i in range(job.ip_address_count):
        derbuf_primitive(out, 0x87, job.ip_addresses[i].data, job.ip_addresses[i].size)
    derbuf_end(out)
    derbuf_end(out)
    derbuf_end(out)
    derbuf_end(out)
    derbuf_end(out)
    derbuf_end(out)
    if out.failed:
        return fail(&job.failure, FAIL_INTERNAL, "out of memory assembling the TBS")
    return 0


cdef int prepare_leaf(const TbsTemplate* template, LeafJob* job) noexcept nogil:
    """Identity first (before any DER is built), then the CSR, then the TBS."""
    if job.failure.code:
        return -1
    if check_identity(job) < 0:
        return -1
    if job.not_after <= job.not_before:
        return fail(&job.failure, FAIL_INTERNAL, "not_after must be later than not_before")
    if not der_time_in_range(job.not_before) or not der_time_in_range(job.not_after):
        return fail(&job.failure, FAIL_INTERNAL, "validity is outside the years 0000..9999")
    if csr_load_verified(job.csr_data, job.csr_size, MAX_CSR_BYTES_DEFAULT, &job.csr,
                         &job.csr_owned, &job.failure) < 0:
        return -1
    return tbs_build(template, job)


cdef int64_t unix_seconds(value, Failure* failure):
    """Python int to int64; out-of-range values fail the item, not the batch."""
    if -(1 << 63) <= value < (1 << 63):
        return value
    fail(failure, FAIL_INTERNAL, "validity is outside the years 0000..9999")
    return 0


def prepare_batch(IssuerProfile profile not None, specs) -> list:
    """Per spec: verify_csr + identity validation + TBS assembly. The heavy
    parts run without the GIL."""
    cdef TbsTemplate template
    cdef LeafJob* jobs = NULL
    cdef LeafJob* job
    cdef ByteSpan* dns_spans = NULL
    cdef Py_ssize_t count, index, dns_total, dns_at
    cdef LeafSpec spec
    cdef PreparedLeaf prepared
    cdef bytes encoded
    specs = list(specs)
    for item in specs:
        if not isinstance(item, LeafSpec):
            raise TypeError(f"prepare_batch takes LeafSpec items, not {type(item).__name__}")
    count = len(specs)
    if count == 0:
        return []
    dns_total = sum(len((<LeafSpec>item).dns_names) + len((<LeafSpec>item).ip_addresses) for item in specs)
    keep_alive = []
    results = []
    profile.fill_template(&template)
    try:
        jobs = <LeafJob*>calloc(count, sizeof(LeafJob))
        dns_spans = <ByteSpan*>calloc(dns_total + 1, sizeof(ByteSpan))
        if jobs == NULL or dns_spans == NULL:
            raise MemoryError()
        dns_at = 0
        for index in range(count):
            spec = specs[index]
            job = &jobs[index]
            job.csr_data = <const unsigned char*><const char*>spec.csr
            job.csr_size = len(spec.csr)
            if len(spec.serial) != SERIAL_BYTES:
                fail(&job.failure, FAIL_INTERNAL, "serial must be 16 random bytes")
                continue
            job.serial = <const unsigned char*><const char*>spec.serial
            job.not_before = unix_seconds(spec.not_before, &job.failure)
            job.not_after = unix_seconds(spec.not_after, &job.failure)
            if not spec.spiffe_id.isascii():
                fail(&job.failure, FAIL_IDENTITY, "SPIFFE ID contains non-ASCII characters")
                continue
            encoded = spec.spiffe_id.encode("ascii")
            keep_alive.append(encoded)
            job.spiffe_id = <const unsigned char*><const char*>encoded
            job.spiffe_id_size = len(encoded)
            job.dns_names = dns_spans + dns_at
            for name in spec.dns_names:
                if not name.isascii():
                    fail(&job.failure, FAIL_IDENTITY, "DNS name contains non-ASCII characters")
                    break
                encoded = name.encode("ascii")
                keep_alive.append(encoded)
                dns_spans[dns_at] = span_of(encoded)
                dns_at += 1
                job.dns_name_count += 1
            # IP addresses follow the DNS names in the same span array.
            job.ip_addresses = dns_spans + dns_at
            for address in spec.ip_addresses:
                keep_alive.append(address)
                dns_spans[dns_at] = span_of(address)
                dns_at += 1
                job.ip_address_count += 1
        with nogil:
            for index in range(count):
                prepare_leaf(&template, &jobs[index])
        for index in range(count):
            job = &jobs[index]
            if job.failure.code:
                results.append(failure_to_error(&job.failure))
                continue
            prepared = PreparedLeaf.__new__(PreparedLeaf)
            prepared.tbs = derbuf_to_bytes(&job.tbs)
            prepared.csr = csr_info_from(&job.csr)
            results.append(prepared)
        return results
    finally:
        if jobs != NULL:
            for index in range(count):
                derbuf_free(&jobs[index].tbs)
                free(jobs[index].csr_owned)
        free(jobs)
        free(dns_spans)


cdef int ecdsa_signature_der(DerBuf* out, const unsigned char* raw, size_t size) noexcept nogil:
    """Ecdsa-Sig-Value ::= SEQUENCE { r INTEGER, s INTEGER } from r || s."""
    cdef size_t half = size // 2
    derbuf_begin(out, 0x30)
    derbuf_unsigned_integer(out, raw, half)
    derbuf_unsigned_integer(out, raw + half, half)
    derbuf_end(out)
    return -1 if out.failed else 0


cdef int assemble_certificate(const CaKey* ca, bint ecdsa_raw, AssembleJob* job) noexcept nogil:
    cdef const unsigned char* signature = job.signature
    cdef size_t signature_size = job.signature_size
    cdef DerCursor cursor
    cdef DerTlv tbs
    cdef unsigned char digest[64]
    cdef size_t digest_size
    cdef int verified
    cdef DerBuf* out = &job.certificate
    if ecdsa_raw:
        if not ca.ecdsa:
            return fail(&job.failure, FAIL_SIGNATURE, "raw ECDSA signature given for an RSA CA")
        if signature_size == 0 or signature_size % 2 or signature_size > MAX_ECDSA_RAW_BYTES:
            return fail(&job.failure, FAIL_SIGNATURE, "raw ECDSA signature is not r || s of equal halves")
        if derbuf_init(&job.der_signature, signature_size + 16) < 0 or \
                ecdsa_signature_der(&job.der_signature, signature, signature_size) < 0:
            return fail(&job.failure, FAIL_INTERNAL, "out of memory encoding the ECDSA signature")
        signature = job.der_signature.data
        signature_size = job.der_signature.length
    der_cursor(&cursor, job.tbs, job.tbs_size)
    if der_next(&cursor, &tbs) != DER_OK or tbs.tag != 0x30 or tbs.size != job.tbs_size:
        return fail(&job.failure, FAIL_INTERNAL, "TBS is not one DER SEQUENCE")
    digest_size = digest_of(ca.digest, job.tbs, job.tbs_size, digest)
    if ca.ecdsa:
        verified = ECDSA_verify(0, digest, <int>digest_size, signature, <int>signature_size, ca.ec_key)
    else:
        verified = RSA_verify(digest_nid(ca.digest), digest, <unsigned int>digest_size, signature,
                              <unsigned int>signature_size, ca.rsa_key)
    if verified != 1:
        ERR_clear_error()
        return fail(&job.failure, FAIL_SIGNATURE, "CA signature did not verify")
    if derbuf_init(out, job.tbs_size + ca.signature_algorithm.size + signature_size
                   + CERTIFICATE_OVERHEAD) < 0:
        return fail(&job.failure, FAIL_INTERNAL, "out of memory assembling the certificate")
    derbuf_begin(out, 0x30)
    derbuf_raw(out, job.tbs, job.tbs_size)
    derbuf_raw(out, ca.signature_algorithm.data, ca.signature_algorithm.size)
    derbuf_begin(out, 0x03)
    derbuf_raw(out, BIT_STRING_NO_UNUSED_BITS, 1)
    derbuf_raw(out, signature, signature_size)
    derbuf_end(out)
    derbuf_end(out)
    if out.failed:
        return fail(&job.failure, FAIL_INTERNAL, "out of memory assembling the certificate")
    return 0


def assemble_batch(IssuerProfile profile not None, tbs, signatures, bint ecdsa_raw) -> list:
    """Per item: signature (raw r||s converted to DER when ecdsa_raw) checked
    with the CA public key over the TBS, then Certificate DER built."""
    cdef CaKey ca
    cdef AssembleJob* jobs = NULL
    cdef AssembleJob* job
    cdef Py_ssize_t count, index
    tbs = list(tbs)
    signatures = list(signatures)
    if len(tbs) != len(signatures):
        raise ValueError(f"{len(tbs)} TBS but {len(signatures)} signatures")
    for item in tbs + signatures:
        if not isinstance(item, bytes):
            raise TypeError(f"TBS and signatures must be bytes, not {type(item).__name__}")
    count = len(tbs)
    if count == 0:
        return []
    profile.fill_ca_key(&ca)
    results = []
    try:
        jobs = <AssembleJob*>calloc(count, sizeof(AssembleJob))
        if jobs == NULL:
            raise MemoryError()
        for index in range(count):
            jobs[index].tbs = <const unsigned char*><const char*>tbs[index]
            jobs[index].tbs_size = len(tbs[index])
            jobs[index].signature = <const unsigned char*><const char*>signatures[index]
            jobs[index].signature_size = len(signatures[index])
        with nogil:
            for index in range(count):
                assemble_certificate(&ca, ecdsa_raw, &jobs[index])
        for index in range(count):
            job = &jobs[index]
            if job.failure.code:
                results.append(failure_to_error(&job.failure))
            else:
                results.append(derbuf_to_bytes(&job.certificate))
        return results
    finally:
        if jobs != NULL:
            for index in range(count):
                derbuf_free(&jobs[index].der_signature)
                derbuf_free(&jobs[index].certificate)
        free(jobs)


def ecdsa_raw_to_der(bytes raw not None) -> bytes:
    """r || s (equal big-endian halves) to a DER Ecdsa-Sig-Value."""
    cdef DerBuf out
    if len(raw) == 0 or len(raw) % 2:
        raise NativeError("signature", "raw ECDSA signature is not r || s of equal halves")
    if derbuf_init(&out, len(raw) + 16) < 0:
        raise MemoryError()
    try:
        if ecdsa_signature_der(&out, <const unsigned char*><const char*>raw, len(raw)) < 0:
            raise MemoryError()
        return derbuf_to_bytes(&out)
    finally:
        derbuf_free(&out)
