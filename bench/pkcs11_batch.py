"""PKCS#11 signing path: python-pkcs11 per call vs the native batch loop.

Signatures per second on a SoftHSM2 token made in a temporary directory, for
a P-256 key (host SHA-256 + CKM_ECDSA) and an RSA-2048 key
(CKM_SHA256_RSA_PKCS), batches of 1, 16 and 256, one process:

  python   Pkcs11Signer(native_batch=False): key.sign per item (python-pkcs11)
  native   Pkcs11Signer(native_batch=True): the native batch loop

Each is measured two ways:
  signer     Pkcs11Signer.sign_many from this thread: what the issuer pays,
             including the hop to the PKCS#11 thread per batch; also as
             process CPU time per signature (all threads, SoftHSM included),
             which other load on the machine disturbs less than wall time
  on-thread  the same batches signed from inside the PKCS#11 thread: the
             signing loop alone

Every round measures every cell, python and native of a cell back to back
(alternating which goes first), so machine noise hits them alike. The report
gives medians over rounds, and the median of each round's native/python
ratio (robust to drift between rounds). The raw SoftHSM rate itself is
bench/probes.py's (run by `python -m bench run`).

    python -m bench pkcs11-batch [--rounds 7] [--p256-items 4096] [--rsa-items 512] [--json out.json]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from fastca.ca import hsm, softhsm
from fastca.signing.pkcs11 import Pkcs11Signer
from fastca.signing.pkcs11_uri import Pkcs11Uri

BATCH_SIZES = (1, 16, 256)
MODES = {"python": False, "native": True}
ITEM_BYTES = 600  # about a leaf TBSCertificate


def make_token() -> tuple[Pkcs11Uri, str]:
    workdir = Path(tempfile.mkdtemp(prefix="fastca-pkcs11-bench-"))
    conf = softhsm.write_softhsm_conf(workdir)
    pin = softhsm.new_pin()
    softhsm.write_secret_file(workdir / "pin", pin)
    softhsm.init_token(conf, "bench", softhsm.new_pin(), pin)
    uri = Pkcs11Uri(token="bench", module_path=softhsm.find_softhsm_module(), pin_source=f"file:{workdir / 'pin'}")
    return uri, str(conf)


def signer_rate(signer: Pkcs11Signer, items: list[bytes], batch: int) -> tuple[float, float]:
    """(signatures/s, process CPU µs per signature)."""
    start, cpu_start = time.perf_counter(), time.process_time()
    for i in range(0, len(items), batch):
        signer.sign_many(items[i:i + batch])
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    return len(items) / elapsed, 1e6 * cpu / len(items)


def on_thread_rate(signer: Pkcs11Signer, items: list[bytes], batch: int) -> float:
    """sign_many called on the signer's own thread (its home executor): no
    hop per batch, the signing loop alone."""
    batches = [items[i:i + batch] for i in range(0, len(items), batch)]

    def loop() -> float:
        start = time.perf_counter()
        for chunk in batches:
            signer.sign_many(chunk)
        return len(items) / (time.perf_counter() - start)

    return signer.home_executor.submit(loop).result()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--p256-items", type=int, default=4096, help="signatures per cell and round")
    parser.add_argument("--rsa-items", type=int, default=512, help="signatures per cell and round")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    base_uri, conf = make_token()
    keys = {"p256": ("ec-p256", args.p256_items), "rsa2048": ("rsa-2048", args.rsa_items)}
    signers: dict[tuple[str, str], Pkcs11Signer] = {}
    items: dict[str, list[bytes]] = {}
    for key_name, (key_type, count) in keys.items():
        uri = base_uri.with_object(key_name, "private")
        hsm.generate_key(uri, key_type, conf)
        for mode, native in MODES.items():
            signers[key_name, mode] = Pkcs11Signer(uri, softhsm_conf=conf, native_batch=native)
        items[key_name] = [os.urandom(ITEM_BYTES) for _ in range(count)]
        for signer in (signers[key_name, m] for m in MODES):  # warm up: first calls pay for lazy setup
            signer.sign_many(items[key_name][:64])

    cells = [(key_name, batch, how) for key_name in keys for batch in BATCH_SIZES for how in ("signer", "on-thread")]
    rounds: dict[str, list[float]] = {}
    ratios: dict[str, list[float]] = {}
    for round_index in range(args.rounds):
        order = list(MODES) if round_index % 2 == 0 else list(reversed(MODES))
        for key_name, batch, how in cells:
            rate: dict[str, float] = {}
            for mode in order:
                if how == "signer":
                    rate[mode], cpu_us = signer_rate(signers[key_name, mode], items[key_name], batch)
                    rounds.setdefault(f"{key_name}/batch{batch}/{mode}/cpu-us", []).append(cpu_us)
                else:
                    rate[mode] = on_thread_rate(signers[key_name, mode], items[key_name], batch)
            for mode in MODES:
                rounds.setdefault(f"{key_name}/batch{batch}/{mode}/{how}", []).append(rate[mode])
            ratios.setdefault(f"{key_name}/batch{batch}/{how}", []).append(rate["native"] / rate["python"])

    medians = {name: statistics.median(values) for name, values in rounds.items()}
    ratio_medians = {name: statistics.median(values) for name, values in ratios.items()}
    report = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "rounds": args.rounds,
        "items": {key_name: count for key_name, (_, count) in keys.items()},
        "medians": {k: round(v, 1) for k, v in medians.items()},  # signatures/s, or µs for */cpu-us
        "native_over_python": {k: round(v, 3) for k, v in ratio_medians.items()},
        "all_rounds": {k: [round(x, 1) for x in v] for k, v in rounds.items()},
    }
    print(f"PKCS#11 signing on SoftHSM, one process, median of {args.rounds} rounds, signatures/s")
    print(f"{'key':<8} {'batch':>5}  {'python signer':>13} {'native signer':>13} {'ratio':>6}"
          f"  {'python CPU µs':>13} {'native CPU µs':>13}"
          f"  {'python on-thread':>16} {'native on-thread':>16} {'ratio':>6}")
    for key_name in keys:
        for batch in BATCH_SIZES:
            row = {(mode, how): medians[f"{key_name}/batch{batch}/{mode}/{how}"]
                   for mode in MODES for how in ("signer", "on-thread")}
            print(f"{key_name:<8} {batch:>5}  {row['python', 'signer']:>13.0f} {row['native', 'signer']:>13.0f} "
                  f"{ratio_medians[f'{key_name}/batch{batch}/signer']:>6.2f}"
                  f"  {medians[f'{key_name}/batch{batch}/python/cpu-us']:>13.1f}"
                  f" {medians[f'{key_name}/batch{batch}/native/cpu-us']:>13.1f}"
                  f"  {row['python', 'on-thread']:>16.0f} {row['native', 'on-thread']:>16.0f} "
                  f"{ratio_medians[f'{key_name}/batch{batch}/on-thread']:>6.2f}")
    print("ratio = median over rounds of native/python measured back to back")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
