"""The XFCC parser's fuzz corpus, replayed (bench/fuzz.py xfcc; what it
keeps, and every crasher, lands in tests/vectors/fuzz/xfcc/)."""

from __future__ import annotations

from pathlib import Path

from fastca.authn.xfcc import parse_xfcc
from tests.authn.xfcc_fuzz_harness import Mismatch, one_input, write_xfcc

CORPUS = sorted((Path(__file__).resolve().parents[1] / "vectors" / "fuzz" / "xfcc").glob("*"))


def test_every_input_of_the_corpus_is_survived():
    assert len(CORPUS) >= 5
    failures = []
    for path in CORPUS:
        try:
            one_input(path.read_bytes())
        except Exception as error:      # noqa: BLE001 - every finding is listed, not only the first
            failures.append(f"{path.name}: {error!r}")
    assert not failures, failures


def test_the_round_trip_is_checked():
    elements = parse_xfcc((CORPUS[0].parent / "seed-quoted.bin").read_text())
    assert parse_xfcc(write_xfcc(elements)) == elements
    assert issubclass(Mismatch, AssertionError)
