"""The fuzz corpus of the protocol core, replayed (bench/fuzz.py finds new
inputs; what it keeps, and every crasher, lands in tests/vectors/fuzz/h2)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.frontend.h2_harness import PREFACE, one_input

CORPUS = Path(__file__).resolve().parents[1] / "vectors" / "fuzz" / "h2"


def test_the_corpus_is_there():
    assert len(list(CORPUS.glob("*"))) >= 7


@pytest.mark.parametrize("path", sorted(CORPUS.glob("*")), ids=lambda p: p.name)
def test_each_input_is_survived(path):
    one_input(path.read_bytes())


def test_the_harness_reaches_the_handlers():
    """The seeds are real conversations: a unary seed gets an answer, so the
    replay exercises the core, not only its preface check."""
    from tests.frontend import h2_harness

    seen = []
    original = h2_harness._Unary.handle
    h2_harness._Unary.handle = lambda self, call: (seen.append(call.message), original(self, call))
    try:
        one_input((CORPUS / "seed-unary.bin").read_bytes())
    finally:
        h2_harness._Unary.handle = original
    assert seen == [b"hello"] and PREFACE.startswith(b"PRI")
