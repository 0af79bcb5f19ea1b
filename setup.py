"""Build hook for the Cython core; everything else is declared in pyproject.toml."""

from Cython.Build import cythonize
from setuptools import Extension, setup

NATIVE_MODULES = ["errors", "der", "asn1", "pem", "san", "csr", "tbs"]

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

setup(
    ext_modules=cythonize(
        extensions,
        language_level=3,
        include_path=["src"],
        compiler_directives={
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "initializedcheck": False,
        },
    ),
)
