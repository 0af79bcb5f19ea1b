"""docs/cert-profile.md as executable checks on a certificate's DER.

Written against asn1crypto's view of the bytes (not fastca's parser, not
cryptography's): a third reading of what was issued.
"""

from __future__ import annotations

import re

from asn1crypto import x509 as asn1_x509

KU_RSA = bytes.fromhex("030205a0")
KU_EC = bytes.fromhex("03020780")
ECDSA_OIDS = {"1.2.840.10045.4.3.2", "1.2.840.10045.4.3.3", "1.2.840.10045.4.3.4"}


def check_workload_certificate(der: bytes, *, issuer_subject_der: bytes, issuer_ski: bytes, identity: str,
                               spki_der: bytes, rsa_key: bool, istio_key_usage: bool = False) -> None:
    cert = asn1_x509.Certificate.load(der)
    assert cert.dump(force=True) == der, "not DER: re-encoding changes the bytes"
    tbs = cert["tbs_certificate"]
    assert tbs["version"].native == "v3"

    serial_tlv = tbs["serial_number"].dump()
    content = serial_tlv[2:]
    assert serial_tlv[0] == 0x02 and 1 <= len(content) <= 20
    assert content[0] & 0x80 == 0, "serial must be positive"
    assert not (content[0] == 0 and len(content) > 1 and content[1] & 0x80 == 0), "non-minimal serial"
    assert tbs["serial_number"].native.bit_length() >= 64

    assert tbs["signature"].dump() == cert["signature_algorithm"].dump()
    alg = cert["signature_algorithm"]
    if alg["algorithm"].dotted in ECDSA_OIDS:
        assert alg.dump()[-1:] != b"\x00" and len(alg.contents) == len(alg["algorithm"].dump()), \
            "ECDSA AlgorithmIdentifier must have no parameters"
    else:
        assert alg["parameters"].dump() == b"\x05\x00", "RSA PKCS#1 v1.5 needs NULL parameters"

    assert tbs["issuer"].dump() == issuer_subject_der, "issuer must be byte-identical to the signer's subject"
    assert tbs["subject"].dump() == b"\x30\x00", "subject must be empty"
    assert tbs["subject_public_key_info"].dump() == spki_der

    for field in ("not_before", "not_after"):
        time = tbs["validity"][field]
        raw = time.chosen.contents.decode()
        year = time.native.year
        if year < 2050:
            assert time.name == "utc_time" and re.fullmatch(r"\d{12}Z", raw), raw
        else:
            assert time.name == "general_time" and re.fullmatch(r"\d{14}Z", raw), raw

    extensions = tbs["extensions"]
    names = [e["extn_id"].dotted for e in extensions]
    assert len(names) == len(set(names)), "duplicate extensions"
    by_oid = {e["extn_id"].dotted: e for e in extensions}
    for ext in extensions:
        # Extension ::= SEQUENCE { extnID, critical BOOLEAN DEFAULT FALSE, extnValue }:
        # a present BOOLEAN must be TRUE (DER omits a DEFAULT value).
        after_oid = ext.contents[len(ext["extn_id"].dump()):]
        if after_oid[0] == 0x01:
            assert after_oid[:3] == b"\x01\x01\xff", "critical FALSE encoded explicitly"

    ku = by_oid["2.5.29.15"]
    assert ku["critical"].native is True
    expected_ku = KU_RSA if (rsa_key or istio_key_usage) else KU_EC
    assert ku["extn_value"].contents == expected_ku

    eku = by_oid["2.5.29.37"]
    assert eku["critical"].native is False
    assert eku["extn_value"].parsed.native == ["server_auth", "client_auth"]

    bc = by_oid["2.5.29.19"]
    assert bc["critical"].native is True
    assert bc["extn_value"].contents == b"\x30\x00", "BasicConstraints must be an empty SEQUENCE"

    aki = by_oid["2.5.29.35"]
    assert aki["extn_value"].parsed["key_identifier"].native == issuer_ski

    san = by_oid["2.5.29.17"]
    assert san["critical"].native is True
    assert san["extn_value"].parsed.native == [identity]
    assert san["extn_value"].parsed[0].name == "uniform_resource_identifier"

    assert "2.5.29.14" not in by_oid, "no SKI on leaves (as istiod)"
    assert set(by_oid) == {"2.5.29.15", "2.5.29.37", "2.5.29.19", "2.5.29.35", "2.5.29.17"}
