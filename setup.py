"""Build hook for the Cython core; everything else is declared in pyproject.toml."""

from Cython.Build import cythonize
from setuptools import Extension, setup

NATIVE_MODULES = ["der", "asn1", "san", "csr", "tbs"]

extensions = [
    Extension(
        f"fastca._native.{name}",
        [f"src/fastca/_native/{name}.pyx"],
        libraries=["crypto"],
        extra_compile_args=["-O2"],
    )
    for name in NATIVE_MODULES
]

setup(
    ext_modules=cythonize(
        extensions,
        language_level=3,
        compiler_directives={
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "initializedcheck": False,
        },
    ),
)
