"""`fastca bench`: the benchmark of bench/run.py, from a source checkout.

The benchmark lives in the repository's bench/ directory, not in the
installed package (it needs cfssl, a load generator and throwaway CAs, none
of which belong in a CA's wheel); this command finds it next to src/ and
hands it every argument, so `fastca bench --help` is bench/run.py's help.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from fastca.errors import ConfigurationError

__all__ = ["bench", "register"]

BENCH_DIR = Path(__file__).resolve().parents[3] / "bench"


def bench(ctx: typer.Context) -> None:
    """Benchmark the Istio path against the raw limits and cfssl (bench/run.py; --help for its options)."""
    if not (BENCH_DIR / "run.py").is_file():
        raise ConfigurationError(f"fastca bench needs a source checkout: no {BENCH_DIR / 'run.py'}")
    # bench/ modules import each other by name; spawned load workers inherit sys.path.
    sys.path.insert(0, str(BENCH_DIR))
    import run  # type: ignore[import-not-found]

    raise typer.Exit(run.main(list(ctx.args)))


def register(app: typer.Typer) -> None:
    """Add `bench` to the fastca CLI. Unknown options and --help pass through to bench/run.py."""
    app.command("bench", add_help_option=False,
                context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(bench)
