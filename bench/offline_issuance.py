"""Offline issuance rate: fastca's engine vs pyca CertificateBuilder, same run.

No RPC: CSR bytes in, certificate DER out, one core (one process, one
thread). Each round measures every contender back to back, so machine noise
hits them alike; the report gives medians over rounds and the ratios.

    python -m bench offline [--rounds 5] [--count 2000] [--json out.json]

Contenders (all with RSA-2048 agent CSRs unless named):
  fastca/software-p256   the Authority's batch stages (bench/engine.py), in-memory P-256 CA key,
                         batches of --batch
  fastca/softhsm-p256    the same, P-256 CA key in a SoftHSM token
  pyca/p256              load CSR, verify it, CertificateBuilder(...).sign()
  pyca/p256+check        the same, then the CA signature verified (what fastca always does)
  raw: rsa2048-verify, p256-sign, p256-verify (cryptography) to price the crypto operations
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

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding
from cryptography.x509.oid import ExtendedKeyUsageOID

from bench.engine import Engine
from fastca.ca import hsm, softhsm
from fastca.signing.pkcs11 import Pkcs11Signer
from fastca.signing.pkcs11_uri import Pkcs11Uri
from fastca.signing.software import SoftwareSigner

IDENTITY = "spiffe://cluster.local/ns/bench/sa/workload"


def make_csrs(count: int) -> list[bytes]:
    """Distinct RSA-2048 CSRs shaped like Istio agent CSRs (made before timing)."""
    from cryptography.hazmat.primitives.asymmetric import rsa

    keys = [rsa.generate_private_key(65537, 2048) for _ in range(min(count, 64))]
    out = []
    for i in range(count):
        builder = (x509.CertificateSigningRequestBuilder()
                   .subject_name(x509.Name([]))
                   .add_extension(x509.SubjectAlternativeName(
                       [x509.UniformResourceIdentifier(f"spiffe://cluster.local/ns/n{i}/sa/s")]), critical=True))
        out.append(builder.sign(keys[i % len(keys)], hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
    return out


def fastca_rate(engine: Engine, csrs: list[bytes], batch: int) -> float:
    start = time.perf_counter()
    for i in range(0, len(csrs), batch):
        engine.issue_batch(csrs[i:i + batch])
    return len(csrs) / (time.perf_counter() - start)


def pyca_rate(key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, csrs: list[bytes],
              check_signature: bool = False) -> float:
    ca_public = key.public_key()
    ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    start = time.perf_counter()
    for pem in csrs:
        csr = x509.load_pem_x509_csr(pem)
        if not csr.is_signature_valid:
            raise RuntimeError("bad CSR")
        now = dt.datetime.now(dt.timezone.utc)
        cert = (x509.CertificateBuilder()
         .subject_name(x509.Name([])).issuer_name(ca_cert.subject).public_key(csr.public_key())
         .serial_number(int.from_bytes(os.urandom(16), "big") >> 1)
         .not_valid_before(now - dt.timedelta(minutes=2)).not_valid_after(now + dt.timedelta(hours=24))
         .add_extension(x509.KeyUsage(True, False, True, False, False, False, False, False, False), critical=True)
         .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                        critical=False)
         .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
         .add_extension(x509.AuthorityKeyIdentifier(ski, None, None), critical=False)
         .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(IDENTITY)]), critical=True)
         .sign(key, hashes.SHA256()))
        if check_signature:
            ca_public.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(hashes.SHA256()))
    return len(csrs) / (time.perf_counter() - start)


def raw_rates(csrs: list[bytes], key: ec.EllipticCurvePrivateKey) -> dict[str, float]:
    parsed = [x509.load_pem_x509_csr(c) for c in csrs[:500]]
    start = time.perf_counter()
    for csr in parsed:
        csr.public_key().verify(csr.signature, csr.tbs_certrequest_bytes, padding.PKCS1v15(), hashes.SHA256())
    verify = len(parsed) / (time.perf_counter() - start)
    data = [os.urandom(600) for _ in range(2000)]
    algorithm = ec.ECDSA(hashes.SHA256())
    start = time.perf_counter()
    signatures = [key.sign(item, algorithm) for item in data]
    sign = len(data) / (time.perf_counter() - start)
    public = key.public_key()
    start = time.perf_counter()
    for item, signature in zip(data, signatures):
        public.verify(signature, item, algorithm)
    check = len(data) / (time.perf_counter() - start)
    return {"raw/rsa2048-verify": verify, "raw/p256-sign": sign, "raw/p256-verify": check}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    csrs = make_csrs(args.count)
    key = ec.generate_private_key(ec.SECP256R1())
    software_issuer = Engine(SoftwareSigner(key))
    root = software_issuer.root

    workdir = Path(tempfile.mkdtemp(prefix="fastca-bench-"))
    conf = softhsm.write_softhsm_conf(workdir)
    pin = softhsm.new_pin()
    softhsm.write_secret_file(workdir / "pin", pin)
    softhsm.init_token(conf, "bench", softhsm.new_pin(), pin)
    uri = Pkcs11Uri(token="bench", object="ca", type="private", module_path=softhsm.find_softhsm_module(),
                    pin_source=f"file:{workdir / 'pin'}")
    hsm.generate_key(uri, "ec-p256", str(conf))
    token_issuer = Engine(Pkcs11Signer(uri, softhsm_conf=str(conf)))

    rounds: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        measured = {
            "fastca/software-p256": fastca_rate(software_issuer, csrs, args.batch),
            "fastca/softhsm-p256": fastca_rate(token_issuer, csrs, args.batch),
            "pyca/p256": pyca_rate(key, root, csrs),
            "pyca/p256+check": pyca_rate(key, root, csrs, check_signature=True),
            **raw_rates(csrs, key),
        }
        for name, rate in measured.items():
            rounds.setdefault(name, []).append(rate)

    medians = {name: statistics.median(values) for name, values in rounds.items()}
    two_ops_us = 1e6 / medians["raw/rsa2048-verify"] + 1e6 / medians["raw/p256-sign"]
    three_ops_us = two_ops_us + 1e6 / medians["raw/p256-verify"]
    fastca_us = 1e6 / medians["fastca/software-p256"]
    report = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "rounds": args.rounds, "count": args.count, "batch": args.batch,
        "rates_per_s": {k: round(v, 1) for k, v in medians.items()},
        "all_rounds": {k: [round(x, 1) for x in v] for k, v in rounds.items()},
        "ratio_fastca_software_vs_pyca": round(medians["fastca/software-p256"] / medians["pyca/p256"], 2),
        "ratio_fastca_software_vs_pyca_checked": round(
            medians["fastca/software-p256"] / medians["pyca/p256+check"], 2),
        "ratio_fastca_softhsm_vs_pyca": round(medians["fastca/softhsm-p256"] / medians["pyca/p256"], 2),
        "us_per_cert_fastca_software": round(fastca_us, 1),
        "us_csr_verify_plus_sign": round(two_ops_us, 1),
        "us_overhead_beyond_csr_verify_and_sign": round(fastca_us - two_ops_us, 1),
        "us_overhead_beyond_all_three_crypto_ops": round(fastca_us - three_ops_us, 1),
    }
    width = max(map(len, medians))
    print(f"offline issuance, 1 core, {args.count} RSA-2048 CSRs, batch {args.batch}, median of {args.rounds} rounds")
    for name, rate in medians.items():
        print(f"  {name:<{width}}  {rate:10.0f} /s   {1e6 / rate:7.1f} us")
    for key_name in ("ratio_fastca_software_vs_pyca", "ratio_fastca_software_vs_pyca_checked",
                     "ratio_fastca_softhsm_vs_pyca", "us_csr_verify_plus_sign",
                     "us_overhead_beyond_csr_verify_and_sign", "us_overhead_beyond_all_three_crypto_ops"):
        print(f"  {key_name}: {report[key_name]}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
