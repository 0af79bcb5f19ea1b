"""The benchmark's pure parts: merging, percentiles, medians, ratios, the CI
regression rule, and parsing `openssl speed`. Fast; no servers, no processes."""

from __future__ import annotations

import math
from array import array

import pytest
from cryptography import x509
from bench.loadgen import make_csrs
from bench.probes import parse_openssl_speed
from bench.stats import compute_ratios, median_of_rounds, merge_load, percentile, regressions


def _report(latencies_s: list[float], errors: dict[str, int], cpu_s: float) -> dict:
    return {"latencies": array("d", latencies_s).tobytes(), "errors": errors, "cpu_s": cpu_s}


def test_percentile_is_nearest_rank():
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50
    assert percentile(values, 99) == 99
    assert percentile(values, 100) == 100
    assert percentile([7.0], 99) == 7.0
    assert math.isnan(percentile([], 50))


def test_merge_load_combines_workers_and_shares_of_the_machine():
    merged = merge_load([_report([0.001, 0.003], {"UNAVAILABLE": 1}, 1.0),
                         _report([0.002, 0.004], {"UNAVAILABLE": 2, "RESOURCE_EXHAUSTED": 1}, 3.0)],
                        duration_s=2.0, cpus=2, server_cpu_s=2.0)
    assert merged["ok"] == 4
    assert merged["certs_per_s"] == 2.0
    assert merged["errors"] == {"RESOURCE_EXHAUSTED": 1, "UNAVAILABLE": 3}
    assert merged["latency_ms"]["p50"] == pytest.approx(2.0)
    assert merged["latency_ms"]["max"] == pytest.approx(4.0)
    assert merged["generator_cpu_share"] == pytest.approx(4.0 / 4.0)
    assert merged["server_cpu_share"] == pytest.approx(0.5)
    assert merged["server_cpu_us_per_cert"] == pytest.approx(500_000)
    assert merged["generator_cpu_us_per_call"] == pytest.approx(4.0 / 8 * 1e6)


def test_merge_load_counts_every_certificate_of_a_bulk_call():
    merged = merge_load([_report([0.010, 0.020], {}, 1.0)], duration_s=2.0, cpus=2, server_cpu_s=1.0,
                        certs_per_call=100)
    assert merged["ok"] == 200 and merged["certs_per_s"] == 100.0 and merged["calls_per_s"] == 1.0
    assert merged["server_cpu_us_per_cert"] == pytest.approx(5_000)
    assert merged["generator_cpu_us_per_call"] == pytest.approx(500_000)


def test_bulk_target_packs_distinct_csrs_into_calls():
    from bench.loadgen import BulkTarget

    csrs = make_csrs(250, "ec-p256", distinct_keys=2)
    calls = BulkTarget("127.0.0.1:1", b"", per_call=100).prepare_all(csrs)
    assert len(calls) == 2 and all(len(call.requests) == 100 for call in calls)
    sent = [element.csr for call in calls for element in call.requests]
    assert len(set(sent)) == 200 and all(element.validity_duration == 86400 for call in calls
                                        for element in call.requests)


def test_merge_load_without_server_pid_or_successes():
    merged = merge_load([_report([], {"UNAUTHENTICATED": 5}, 0.5)], duration_s=1.0, cpus=2, server_cpu_s=None)
    assert merged["certs_per_s"] == 0
    assert "server_cpu_s" not in merged
    assert math.isnan(merged["latency_ms"]["p99"])


def test_median_of_rounds_is_elementwise_and_sums_errors():
    rounds = [{"rate": 1.0, "latency": {"p99": 10.0}, "errors": {"X": 1}, "name": "a", "ratio": None},
              {"rate": 3.0, "latency": {"p99": 30.0}, "errors": {}, "name": "a", "ratio": 2.0},
              {"rate": 2.0, "latency": {"p99": math.nan}, "errors": {"X": 2, "Y": 1}, "name": "a", "ratio": 4.0,
               "extra": 5.0}]
    merged = median_of_rounds(rounds)
    assert merged["rate"] == 2.0
    assert merged["latency"]["p99"] == 20.0           # NaN left out
    assert merged["errors"] == {"X": 3, "Y": 1}
    assert merged["name"] == "a"
    assert merged["ratio"] == 3.0                     # the rounds that have a number
    assert merged["extra"] == 5.0


def test_ratios_and_missing_references():
    ratios = compute_ratios(800.0, {"softhsm_p256_1proc": 16000.0, "broken": 0.0}, None)
    assert ratios["fastca_vs_softhsm_p256_1proc"] == pytest.approx(0.05)
    assert ratios["fastca_vs_cfssl"] is None
    assert ratios["fastca_vs_broken"] is None


def test_regressions_fail_only_below_the_floor():
    baseline = {"a": 0.10, "b": 0.20, "c": 0.30, "only_in_baseline": 1.0}
    current = {"a": 0.051, "b": 0.099, "c": None}
    assert regressions(current, baseline, floor=0.5) == ["b: 0.099 < 50% of baseline 0.200"]
    assert regressions({"a": 1.0}, {"a": None}, floor=0.5) == []


def test_parse_openssl_speed_machine_readable():
    output = "+DTP:2048:private:rsa:1\n+R2:3705:2048:1.00\n+F2:2:2048:3705.050505:55488.000000\n" \
             "+F4:7:256:46200.000000:14827.000000\n"
    assert parse_openssl_speed(output) == {"openssl_rsa2048_sign": 3705.050505, "openssl_rsa2048_verify": 55488.0,
                                           "openssl_p256_sign": 46200.0, "openssl_p256_verify": 14827.0}


def test_csrs_are_distinct_and_agent_shaped():
    csrs = make_csrs(5, "ec-p256", distinct_keys=2)
    assert len(set(csrs)) == 5
    parsed = x509.load_pem_x509_csr(csrs[3])
    assert parsed.is_signature_valid
    san = parsed.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical
    assert san.value.get_values_for_type(x509.UniformResourceIdentifier)[0].startswith("spiffe://cluster.local/")


def test_memory_summary_per_process_slope_and_limit():
    from bench.stability import memory_summary

    mb = 2**20
    samples = [(0.0, {7: 90 * mb, 8: 40 * mb}), (5.0, {7: 95 * mb}), (60.0, {7: 91 * mb, 8: 40 * mb}),
               (120.0, {7: 92 * mb, 8: 160 * mb})]
    summary = memory_summary(samples, skip_s=1.0)
    first = summary["processes"]["7"]
    assert (first["first_mb"], first["last_mb"], first["max_mb"], first["samples"]) == (95.0, 92.0, 95.0, 3)
    assert first["slope_mb_per_min"] < 0
    assert summary["processes"]["8"]["slope_mb_per_min"] == pytest.approx(120.0)
    assert summary["max_mb"] == 160.0 and summary["within_limit"] is False


def test_fake_apiserver_answers_a_burst_of_new_connections(tmp_path):
    """fastca's reviews expire together, and every worker then asks again over
    new connections at once: the stand-in API server must take them all."""
    import asyncio
    import ssl

    import httpx

    from bench.fake_apiserver import TOKENREVIEW_PATH, FakeApiServer

    async def burst(url: str, context: ssl.SSLContext) -> list[object]:
        async def one(i: int) -> object:
            # A client per call: each review arrives on a connection of its own.
            async with httpx.AsyncClient(base_url=url, verify=context, timeout=3) as client:
                response = await client.post(TOKENREVIEW_PATH, json={"spec": {"token": f"sa.ns.acct.pod{i}"}})
                return response.json()["status"]["user"]["username"]
        return await asyncio.gather(*(one(i) for i in range(96)), return_exceptions=True)

    with FakeApiServer(tmp_path) as api:
        context = ssl.create_default_context(cafile=str(api.ca_file))
        answers = asyncio.run(burst(api.url, context))
    assert answers == ["system:serviceaccount:ns:acct"] * 96
