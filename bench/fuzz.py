"""Fuzzing fastca's parsers of untrusted input with atheris.

    python -m bench fuzz TARGET [--seconds N | --runs N] [--corpus DIR]   # atheris/libFuzzer options after --

Targets:
  h2    the native front end's protocol core (frontend/_grpc.pyx on
        libnghttp2): arbitrary bytes after the client connection preface,
        as a client would send them, into a real Connection with echo
        handlers (unary and streaming) and small limits. Any exception that
        escapes the core, or a call left in a state the core never reaches
        on its own, is a crash.

The harness is tests/frontend/h2_harness.py; the seed corpus and every
crasher found are kept in tests/vectors/fuzz/<target>/, and the normal test
suite replays them (tests/frontend/test_fuzz_corpus.py). The
C parts (nghttp2, the Cython module) are not coverage-instrumented: atheris
steers by the Python side's coverage and otherwise mutates blindly, so the
run's worth is in its count of executions (bench/RESULTS.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable

__all__ = ["TARGETS", "corpus_dir", "h2_one_input", "main"]

REPO = Path(__file__).resolve().parents[1]
_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def corpus_dir(target: str) -> Path:
    return REPO / "tests" / "vectors" / "fuzz" / target


def h2_one_input(data: bytes) -> None:
    from tests.frontend.h2_harness import one_input

    one_input(data)


TARGETS: dict[str, Callable[[bytes], None]] = {"h2": h2_one_input}


def seed_h2(directory: Path) -> None:
    """Write the h2 seed corpus: conversations hyper-h2 makes as clients do."""
    import struct

    import h2.config
    import h2.connection

    def conversation(build: Callable[[Any], None]) -> bytes:
        client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        client.initiate_connection()
        build(client)
        data = client.data_to_send()
        return data[len(_PREFACE):]         # the harness sends the preface; its SETTINGS stay

    def framed(payload: bytes) -> bytes:
        return b"\x00" + struct.pack(">I", len(payload)) + payload

    headers = [(":method", "POST"), (":scheme", "http"), (":path", "/t.S/U"), (":authority", "x"),
               ("content-type", "application/grpc"), ("te", "trailers"), ("grpc-timeout", "5S"),
               ("authorization", "Bearer abc"), ("trace-bin", "AAEC")]
    seeds = {
        "unary": lambda c: (c.send_headers(1, headers), c.send_data(1, framed(b"hello"), end_stream=True)),
        "stream": lambda c: (c.send_headers(1, [(n, "/t.S/S" if n == ":path" else v) for n, v in headers]),
                             c.send_data(1, framed(b"a") + framed(b"b"), end_stream=True)),
        "two-calls-ping": lambda c: (c.send_headers(1, headers), c.send_data(1, framed(b"x"), end_stream=True),
                                     c.ping(b"12345678"), c.send_headers(3, headers),
                                     c.send_data(3, framed(b"y" * 100), end_stream=True)),
        "reset": lambda c: (c.send_headers(1, headers), c.reset_stream(1)),
        "split-message": lambda c: (c.send_headers(1, headers), c.send_data(1, framed(b"z" * 300)[:7]),
                                    c.send_data(1, framed(b"z" * 300)[7:], end_stream=True)),
        "settings-window": lambda c: (c.update_settings({4: 100000}), c.increment_flow_control_window(1000),
                                      c.send_headers(1, headers, end_stream=True)),
        "goaway": lambda c: c.close_connection(),
    }
    directory.mkdir(parents=True, exist_ok=True)
    for name, build in seeds.items():
        (directory / f"seed-{name}.bin").write_bytes(conversation(build))


def _load_instrumented(directory: Path) -> None:
    """Put the coverage- and ASan-instrumented build of the core where
    ``fastca.frontend._grpc`` is imported from, before anything imports it."""
    import importlib.util

    built = next(directory.glob("_grpc*.so"))
    spec = importlib.util.spec_from_file_location("fastca.frontend._grpc", built)
    module = importlib.util.module_from_spec(spec)
    sys.modules["fastca.frontend._grpc"] = module
    spec.loader.exec_module(module)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ours, theirs = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(prog="python -m bench fuzz", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("target", choices=sorted(TARGETS))
    parser.add_argument("--seconds", type=int, help="stop after this long")
    parser.add_argument("--runs", type=int, help="stop after this many executions")
    parser.add_argument("--corpus", type=Path, help="working corpus directory [a copy of the seeds in /tmp]")
    parser.add_argument("--seed-corpus", action="store_true", help="(re)write the seed corpus and stop")
    parser.add_argument("--instrumented", type=Path,
                        help="a directory with _grpc built for coverage and AddressSanitizer (bench/fuzz-build); "
                             "run under LD_PRELOAD of clang's ASan runtime")
    args = parser.parse_args(ours)
    if args.instrumented is not None:
        _load_instrumented(args.instrumented)
    seeds = corpus_dir(args.target)
    if args.seed_corpus:
        seed_h2(seeds)
        return 0
    import shutil
    import tempfile

    import atheris

    work = args.corpus or Path(tempfile.mkdtemp(prefix=f"fastca-fuzz-{args.target}-"))
    work.mkdir(parents=True, exist_ok=True)
    for seed in seeds.glob("*"):
        shutil.copy(seed, work / seed.name)
    crashes = REPO / "bench" / "out" / "fuzz" / args.target
    crashes.mkdir(parents=True, exist_ok=True)
    options = [f"-artifact_prefix={crashes}/", "-print_final_stats=1", "-max_len=16384"]
    if args.seconds:
        options.append(f"-max_total_time={args.seconds}")
    if args.runs:
        options.append(f"-runs={args.runs}")
    with atheris.instrument_imports():
        import fastca.frontend.native  # noqa: F401 - instrumented for coverage
    target = TARGETS[args.target]
    atheris.Setup([sys.argv[0], *options, *theirs, str(work)], target)
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main())
