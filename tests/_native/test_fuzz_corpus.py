"""The fuzz corpora of the native core, replayed (bench/fuzz.py finds new
inputs; what it keeps, and every crasher, lands in tests/vectors/fuzz/<target>/).
A NativeError is an accepted refusal; anything else raised fails the test."""

from __future__ import annotations

from pathlib import Path

import pytest

from fastca._native.testing import PreparedLeaf, prepare_batch, verify_csr
from tests._native import fuzz_harness

FUZZ = Path(__file__).resolve().parents[1] / "vectors" / "fuzz"
CORPUS = [path for target in sorted(fuzz_harness.ONE_INPUT) for path in sorted((FUZZ / target).glob("*"))]


@pytest.mark.parametrize("target", sorted(fuzz_harness.ONE_INPUT))
def test_each_corpus_is_there(target):
    assert len(list((FUZZ / target).glob("*"))) >= 5


@pytest.mark.parametrize("path", CORPUS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_each_input_is_survived(path):
    fuzz_harness.ONE_INPUT[path.parent.name](path.read_bytes())


def test_the_csr_seeds_reach_the_verifying_paths():
    """The seeds are real requests: the raw ones verify as they are, and the
    re-signing mode turns a CertificationRequestInfo into one that verifies."""
    raw = (FUZZ / "csr" / "seed-ec256-0000.bin").read_bytes()
    assert verify_csr(raw[1:]).key_type == "ec"
    info = (FUZZ / "csr" / "seed-resign2-multi-rdn.bin").read_bytes()
    key, digest, oid = fuzz_harness.fixed_keys()[info[0]]
    from cryptography.hazmat.primitives.asymmetric import ec

    csr = verify_csr(fuzz_harness.signed_request(info[1:], oid, key.sign(info[1:], ec.ECDSA(digest))))
    assert csr.dns_names == ["a.example"] and csr.emails == ["a@b"] and len(csr.ip_addresses) == 2


def test_the_tbs_seeds_reach_the_certificate_checks():
    csrs, cas = fuzz_harness.tbs_fixtures()
    for name in ("p256-ec", "rsa-ca-rsa", "p384-ca-raw", "istio-ku", "edges", "utc-switch"):
        draw = fuzz_harness.Draw((FUZZ / "tbs" / f"seed-{name}.bin").read_bytes())
        choice = draw.byte()
        spec, drawn = fuzz_harness.draw_spec(draw, csrs)
        profile = cas[fuzz_harness.CA_KEYS[choice % 3]][5][bool(choice & 0x10)]
        assert drawn["valid"] and isinstance(prepare_batch(profile, [spec])[0], PreparedLeaf), name


def test_a_mismatch_is_a_finding():
    """The harness does raise on a disagreement (here: a reference that
    disagrees with the validator), so a quiet run means agreement."""
    original = fuzz_harness.reference_spiffe_id
    fuzz_harness.reference_spiffe_id = lambda text: False
    try:
        with pytest.raises(fuzz_harness.Mismatch):
            fuzz_harness.san_one_input(b"\x00spiffe://td/a")
    finally:
        fuzz_harness.reference_spiffe_id = original
