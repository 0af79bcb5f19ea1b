"""fastca's benchmark: load generators that behave like agents, peers built
the way other CAs are, raw-limit probes, and the report.

Run from a source checkout, with the project's venv (bench is not part of
the installed product):

    .venv/bin/python -m bench run [--help]          # the Istio path against the raw limits and peers
    .venv/bin/python -m bench stability overload|soak
    .venv/bin/python -m bench front-end-floor
    .venv/bin/python -m bench offline | pkcs11-batch
    .venv/bin/python -m bench ci-check              # what CI runs

bench/README.md lists the targets; bench/RESULTS.md holds the results.
"""
