"""Fuzzing fastca's parsers of untrusted input with atheris.

    python -m bench fuzz TARGET [--seconds N | --runs N] [--corpus DIR]   # atheris/libFuzzer options after --

Targets:
  h2    the native front end's protocol core (frontend/_grpc.pyx on
        libnghttp2): arbitrary bytes after the client connection preface,
        as a client would send them, into a real Connection with echo
        handlers (unary and streaming) and small limits. Any exception that
        escapes the core, or a call left in a state the core never reaches
        on its own, is a crash.
  der   the strict DER reader (walk_der), with a DerWriter round trip.
  pem   the CSR PEM unwrap and pem_encode, against reference codecs.
  san   the SPIFFE ID / DNS name / IP SAN validators, against reference rules.
  csr   the CSR parser and proof of possession, against pyca/cryptography.
  tbs   the TBS assembler: fuzzed LeafSpecs through prepare_batch, signed,
        assembled and read back by pyca/cryptography and check_issued_batch.
  xfcc  the x-forwarded-client-cert parser and authenticator (pure Python).

The harnesses are tests/frontend/h2_harness.py, tests/_native/fuzz_harness.py
(the native-core targets; what each checks is said there) and
tests/authn/xfcc_fuzz_harness.py; the seed corpus and every crasher found
are kept in tests/vectors/fuzz/<target>/, and the normal test suite replays
them (tests/frontend/test_fuzz_corpus.py, tests/_native/test_fuzz_corpus.py,
tests/authn/test_xfcc_fuzz_corpus.py). `--seed-corpus` (re)writes the
generated seeds of a target.

bench/fuzz-build DIR TARGET builds the native modules (and _grpc) with
coverage counters and AddressSanitizer into DIR and runs the target on that
build under atheris' ASan+libFuzzer runtime, so libFuzzer also steers by
the C code's coverage; `python -m bench fuzz TARGET` alone runs on the
in-tree (uninstrumented) build. Counts and times: bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable

__all__ = ["TARGETS", "corpus_dir", "cython_options", "h2_one_input", "main", "native_modules"]

REPO = Path(__file__).resolve().parents[1]
_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def corpus_dir(target: str) -> Path:
    return REPO / "tests" / "vectors" / "fuzz" / target


def h2_one_input(data: bytes) -> None:
    from tests.frontend.h2_harness import one_input

    one_input(data)


def native_target(name: str) -> Callable[[bytes], None]:
    def one_input(data: bytes) -> None:
        from tests._native.fuzz_harness import ONE_INPUT

        ONE_INPUT[name](data)

    one_input.__name__ = f"{name}_one_input"
    return one_input


def xfcc_one_input(data: bytes) -> None:
    from tests.authn.xfcc_fuzz_harness import one_input

    one_input(data)


NATIVE_TARGETS = ("der", "pem", "san", "csr", "tbs")
TARGETS: dict[str, Callable[[bytes], None]] = {
    "h2": h2_one_input, **{name: native_target(name) for name in NATIVE_TARGETS}, "xfcc": xfcc_one_input}
# What atheris instruments for Python coverage, per target.
INSTRUMENTED = {"h2": "fastca.frontend.native", "xfcc": "fastca.authn.xfcc",
                **{name: "tests._native.fuzz_harness" for name in NATIVE_TARGETS}}


def _setup_table() -> dict[str, Any]:
    """The module-level constants of setup.py, evaluated without running it."""
    import ast

    tree = ast.parse((REPO / "setup.py").read_text())
    names: dict[str, Any] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name) \
                and node.targets[0].id.isupper():
            names[node.targets[0].id] = eval(compile(ast.Expression(node.value), "setup.py", "eval"),  # noqa: S307
                                             {"__builtins__": {}}, names)
    return names


def native_modules() -> list[str]:
    return list(_setup_table()["NATIVE_MODULES"])


def cython_options(module: str) -> list[str]:
    """The cython command line's -X options that give one _native module
    the directives setup.py compiles it with (for bench/fuzz-build)."""
    table = _setup_table()
    directives = {**table["DIRECTIVES"], **table["NATIVE_DIRECTIVES"][module]}
    return [f"-X{name}={value}" for name, value in directives.items()]


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
    """Put the coverage- and ASan-instrumented builds where
    ``fastca.frontend._grpc`` and ``fastca._native.*`` are imported from,
    before anything imports them: the package fastca._native is made with
    DIR first on its path, so its submodules (which cimport one another by
    their package names) all load from DIR."""
    import importlib.util

    for built in directory.glob("_grpc*.so"):
        spec = importlib.util.spec_from_file_location("fastca.frontend._grpc", built)
        module = importlib.util.module_from_spec(spec)
        sys.modules["fastca.frontend._grpc"] = module
        spec.loader.exec_module(module)
    missing = [name for name in native_modules() if not any(directory.glob(f"{name}.*.so"))]
    if missing:
        raise SystemExit(f"{directory} lacks the instrumented {', '.join(missing)} (bench/fuzz-build DIR --build-only)")
    import fastca

    source = REPO / "src" / "fastca" / "_native"
    assert "fastca._native" not in sys.modules, "fastca._native was imported before the instrumented build"
    spec = importlib.util.spec_from_file_location("fastca._native", source / "__init__.py",
                                                  submodule_search_locations=[str(directory), str(source)])
    package = importlib.util.module_from_spec(spec)
    sys.modules["fastca._native"] = package
    spec.loader.exec_module(package)
    fastca._native = package
    loaded = sys.modules["fastca._native.csr"].__file__
    assert Path(loaded).absolute().parent == directory.absolute(), f"fastca._native.csr came from {loaded}"


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
                        help="a directory with _grpc and fastca._native built for coverage and AddressSanitizer "
                             "(bench/fuzz-build, which runs this under LD_PRELOAD of atheris' ASan runtime)")
    args = parser.parse_args(ours)
    if args.instrumented is not None:
        _load_instrumented(args.instrumented)
    seeds = corpus_dir(args.target)
    if args.seed_corpus:
        from bench.fuzz_seeds import SEEDERS

        {"h2": seed_h2, **SEEDERS}[args.target](seeds)
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
    import importlib

    # Python coverage of the harness and the code under test only: instrumenting
    # what they import (cryptography, the stdlib) would only slow each run.
    with atheris.instrument_imports(include=[INSTRUMENTED[args.target]]):
        importlib.import_module(INSTRUMENTED[args.target])
    target = TARGETS[args.target]
    atheris.Setup([sys.argv[0], *options, *theirs, str(work)], target)
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main())
