"""Build hook for the Cython core; everything else is declared in pyproject.toml."""

from Cython.Build import cythonize
from setuptools import Extension, setup

NATIVE_MODULES = ["errors", "der", "asn1", "pem", "san", "csr", "tbs", "leafcheck"]

DIRECTIVES = {"boundscheck": False, "wraparound": False, "cdivision": True, "initializedcheck": False}
# Per module, decided by measurement (bench/RESULTS.md, "Fuzzing the parsers
# (#13)"): Cython's bounds and negative-index checks where they cost nothing
# measurable. They guard memoryview and list indexing only; the pointer
# walks over untrusted bytes are guarded by the fuzz runs under
# AddressSanitizer (bench/fuzz-build reads this table too).
CHECKED = {"boundscheck": True, "wraparound": True}
NATIVE_DIRECTIVES = {
    "errors": CHECKED,
    "der": CHECKED,
    "asn1": CHECKED,
    "pem": CHECKED,
    "san": CHECKED,
    "csr": CHECKED,
    "tbs": CHECKED,
    "leafcheck": CHECKED,
}

extensions = [
    Extension(
        f"fastca._native.{name}",
        [f"src/fastca/_native/{name}.pyx"],
        libraries=["crypto"],
        # csr.pyx builds CSR keys with the legacy RSA/EC_KEY API (measured
        # far cheaper than d2i_PUBKEY on OpenSSL 3; see csr.pyx).
        define_macros=[("OPENSSL_API_COMPAT", "0x10100000L")],
        extra_compile_args=["-O2", "-Wno-deprecated-declarations"],
    )
    for name in NATIVE_MODULES
]

# The PKCS#11 batch signer (fastca.signing.pkcs11's native path). p11-kit's
# header (Debian: libp11-kit-dev) is a clean, complete pkcs11.h; CRYPTOKI_GNU
# selects its lower-case names instead of compatibility macros such as
# `#define value pValue`, which would rewrite identifiers in Cython's C.
extensions.append(
    Extension(
        "fastca.signing._pkcs11_batch",
        ["src/fastca/signing/_pkcs11_batch.pyx"],
        include_dirs=["/usr/include/p11-kit-1"],
        libraries=["crypto"],
        define_macros=[("CRYPTOKI_GNU", "1")],
        extra_compile_args=["-O2"],
    )
)

# The native front end's gRPC-over-HTTP/2 core on libnghttp2 (Debian:
# libnghttp2-dev). It parses what clients send, so its own indexing keeps
# bounds checks on (set in the module).
extensions.append(
    Extension(
        "fastca.frontend._grpc",
        ["src/fastca/frontend/_grpc.pyx"],
        libraries=["nghttp2"],
        extra_compile_args=["-O2"],
    )
)


def native_directives(extension: Extension) -> dict:
    name = extension.name.rpartition(".")[2]
    if extension.name.startswith("fastca._native."):
        return {**DIRECTIVES, **NATIVE_DIRECTIVES[name]}
    return DIRECTIVES


setup(
    ext_modules=[
        module
        for extension in extensions
        for module in cythonize(
            [extension], language_level=3, include_path=["src"], compiler_directives=native_directives(extension)
        )
    ],
)
