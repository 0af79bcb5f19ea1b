"""`python -m bench COMMAND [options]`: the benchmark's one entry point."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "run": ("bench.run", "the Istio path (and bulk) against the raw limits and peers"),
    "stability": ("bench.stability", "overload at 3x the peak, or a soak at 80%"),
    "vs-istiod": ("bench.vs_istiod", "fastca against an istiod-shaped Go CA (bench/goca), token and client cert"),
    "replicas": ("bench.replicas", "two fastca serve replicas against one (p11-kit HSM, PostgreSQL audit log)"),
    "monitoring-cost": ("bench.monitoring_cost", "the issuance monitor's cost on the hot path: on against off, same run"),
    "front-end-floor": ("bench.front_end_floor", "per-call server CPU of the front ends"),
    "offline": ("bench.offline_issuance", "the issuance engine without RPC, against pyca"),
    "pkcs11-batch": ("bench.pkcs11_batch", "the PKCS#11 signing paths"),
    "fuzz": ("bench.fuzz", "atheris on the parsers of untrusted input (corpus in tests/vectors/fuzz)"),
    "ci-check": ("bench.ci_check", "the short run CI makes, judged against bench/ci-baseline.json"),
}


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: python -m bench COMMAND [options]   (COMMAND --help for its options)\n")
        for name, (_, what) in COMMANDS.items():
            print(f"  {name:<16} {what}")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    result = module.main(argv[1:])
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
