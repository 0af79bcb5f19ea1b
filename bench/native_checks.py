"""What Cython's boundscheck/wraparound cost per _native module (#13).

    python -m bench.native_checks DIR [--repeat N]

Builds every fastca._native module twice into DIR (never into the source
tree), as setup.py does (cython, then the C compiler with -O2), once with
boundscheck=False, wraparound=False and once with both True; then times the
native core's workloads with all modules unchecked, all checked, and each
(with --per-module) each module checked alone, each configuration in its
own process, the configurations interleaved over --rounds rounds (the
machine is shared: the best of all samples is what is compared), and prints
the change against the unchecked build. First it lists, per module, how
many lines of the generated C the directives change at all: a module
whose C does not change costs nothing by construction. Results: bench/RESULTS.md,
"Fuzzing the parsers (#13)"; the decision is setup.py's NATIVE_DIRECTIVES.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

from bench.fuzz import REPO, native_modules

VARIANTS = {"off": "False", "on": "True"}

WORKLOADS = r'''
import os, time, json, sys
from pathlib import Path
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from fastca._native.testing import (DerWriter, IssuerProfile, LeafSpec, assemble_batch, check_issued_batch,
    parse_csr, pem_encode, prepare_batch, validate_dns_name, validate_spiffe_id, verify_csr, walk_der)
loaded = sys.modules["fastca._native.csr"].__file__
vectors = Path("tests/vectors/agent-csrs")
pem = (vectors / "ec256-0000.csr.pem").read_bytes()
rsa_pem = (vectors / "rsa2048-0000.csr.pem").read_bytes()
spiffe = (vectors / "ec256-0000.id").read_text().strip()
key = ec.derive_private_key(12345, ec.SECP256R1())
name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "cluster.local")]).public_bytes()
spki = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
profile = IssuerProfile(name, b"k" * 20, bytes.fromhex("300a06082a8648ce3d040302"), spki)
specs = [LeafSpec(pem, spiffe, os.urandom(16), 1764000000, 1764086400) for _ in range(64)]
leaves = prepare_batch(profile, specs)
tbs = [leaf.tbs for leaf in leaves]
sigs = [key.sign(t, ec.ECDSA(hashes.SHA256())) for t in tbs]
certs = assemble_batch(profile, tbs, sigs, False)
csrs = [leaf.csr for leaf in leaves]
der = csrs[0].der
bad = pem.replace(b"MII", b"MIJ", 1)

def writer():
    w = DerWriter()
    for _ in range(20):
        w.begin(0x30); w.oid("1.2.840.10045.4.3.2"); w.integer(b"\x80" * 16); w.primitive(0x04, b"x" * 40); w.end()
    return w.getvalue()

def refused():
    try:
        parse_csr(bad)
    except ValueError:
        pass

work = {
    "parse_csr pem (csr, pem)": (lambda: parse_csr(pem), 2000),
    "parse_csr der (csr)": (lambda: parse_csr(der), 2000),
    "verify_csr rsa (csr)": (lambda: verify_csr(rsa_pem), 300),
    "refusal (errors)": (refused, 2000),
    "walk_der cert (asn1)": (lambda: walk_der(certs[0]), 2000),
    "DerWriter 20 elements (der)": (writer, 500),
    "pem_encode cert (pem)": (lambda: pem_encode(certs[0]), 2000),
    "validators (san)": (lambda: (validate_spiffe_id(spiffe), validate_dns_name("a.b.example.com")), 5000),
    "prepare_batch 64 (tbs)": (lambda: prepare_batch(profile, specs), 10),
    "assemble_batch 64 (tbs)": (lambda: assemble_batch(profile, tbs, sigs, False), 10),
    "check_issued_batch 64 (leafcheck)": (lambda: check_issued_batch(profile, certs, specs, csrs), 20),
}
out = {"loaded": loaded}
for label, (call, count) in work.items():
    samples = []
    for _ in range(REPEAT):
        start = time.perf_counter()
        for _ in range(count):
            call()
        samples.append((time.perf_counter() - start) / count * 1e6)
    out[label] = min(samples)
print(json.dumps(out))
'''


def build(directory: Path) -> None:
    include = sysconfig.get_paths()["include"]
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    cc = os.environ.get("CC", "cc")
    from bench.fuzz import _setup_table

    base = _setup_table()["DIRECTIVES"]
    for variant, value in VARIANTS.items():
        out = directory / variant
        out.mkdir(parents=True, exist_ok=True)
        for name in native_modules():
            so = out / f"{name}{suffix}"
            if so.exists():
                continue
            directives = {**base, "boundscheck": value, "wraparound": value}
            options = [f"-X{k}={v}" for k, v in directives.items()]
            subprocess.run([sys.executable, "-m", "cython", "-3", "-I", "src", *options,
                            f"src/fastca/_native/{name}.pyx", "-o", str(out / f"{name}.c")],
                           cwd=REPO, check=True, capture_output=True)
            subprocess.run([cc, "-shared", "-fPIC", "-O2", "-Wno-deprecated-declarations",
                            "-DOPENSSL_API_COMPAT=0x10100000L", f"-I{include}", str(out / f"{name}.c"),
                            "-lcrypto", "-o", str(so)], check=True)


def code_lines(c_file: Path) -> list[str]:
    """A module's generated C without comments and #line markers."""
    return [line for line in c_file.read_text().splitlines()
            if not re.match(r"\s*(/\*|\*|#line)", line)]


def changed_lines(directory: Path, module: str) -> int:
    import difflib

    diff = difflib.unified_diff(code_lines(directory / "off" / f"{module}.c"),
                                code_lines(directory / "on" / f"{module}.c"), n=0, lineterm="")
    return sum(1 for line in diff if line[:1] in "+-" and not line.startswith(("+++", "---")))


def configuration(directory: Path, checked: set[str]) -> Path:
    """A directory of links: each module from on/ if checked, else off/."""
    label = "+".join(sorted(checked)) or "none"
    out = directory / "config" / label
    out.mkdir(parents=True, exist_ok=True)
    for so in (directory / "off").glob("*.so"):
        name = so.name.split(".")[0]
        link = out / so.name
        if link.is_symlink():
            link.unlink()
        link.symlink_to((directory / ("on" if name in checked else "off") / so.name).resolve())
    return out


def measure(build_dir: Path, repeat: int) -> dict:
    code = ("import sys; from pathlib import Path; from bench.fuzz import _load_instrumented; "
            f"_load_instrumented(Path({str(build_dir)!r})); REPEAT = {repeat}\n" + WORKLOADS)
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, capture_output=True, text=True)
    return json.loads(result.stdout.splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.native_checks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory", type=Path)
    parser.add_argument("--repeat", type=int, default=5, help="samples per workload and process")
    parser.add_argument("--rounds", type=int, default=5, help="processes per configuration, interleaved")
    parser.add_argument("--per-module", action="store_true", help="also each module checked alone")
    args = parser.parse_args(argv)
    directory = args.directory.resolve()
    build(directory)
    modules = native_modules()
    print("lines of generated C the directives change:", {m: changed_lines(directory, m) for m in modules})
    # "none again" is the unchecked build once more: the spread between the
    # two unchecked columns is the noise the checked column is judged against.
    configs = {"none": set(), "all": set(modules), "none again": set()}
    if args.per_module:
        configs.update({m: {m} for m in modules if changed_lines(directory, m)})
    results: dict[str, dict[str, float]] = {label: {} for label in configs}
    for _ in range(args.rounds):
        for label, checked in configs.items():
            for workload, value in measure(configuration(directory, checked), args.repeat).items():
                if workload != "loaded":
                    results[label][workload] = min(value, results[label].get(workload, value))
    alone_modules = [m for m in configs if m not in ("none", "all", "none again")]
    print(f"{'workload (best of all samples)':<36}{'unchecked us':>13}{'checked us':>12}{'change':>9}"
          f"{'A/A':>9}  module alone")
    for workload, base in results["none"].items():
        checked = results["all"][workload]
        again = results["none again"][workload]
        alone = [f"{m} {100 * (results[m][workload] / base - 1):+.1f}%" for m in alone_modules
                 if f"({m}" in workload or f", {m})" in workload]
        print(f"{workload:<36}{base:>13.2f}{checked:>12.2f}{100 * (checked / base - 1):>+8.1f}%"
              f"{100 * (again / base - 1):>+8.1f}%  {'  '.join(alone)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
