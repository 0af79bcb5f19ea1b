"""/metrics as Prometheus scrapes it: fastca_*, Istio's citadel_* and gRPC names."""

from __future__ import annotations

import datetime as dt
import re
import threading
import urllib.request

import pytest

from fastca.observability.metrics import SIGN_ERROR_KINDS, Metrics

UTC = dt.timezone.utc


def scrape(port: int, accept: str | None = None) -> str:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics")
    if accept:
        request.add_header("Accept", accept)
    with urllib.request.urlopen(request, timeout=5) as response:
        assert response.status == 200
        return response.read().decode()


def value(text: str, series: str) -> float | None:
    """The value of one exact series line (name plus label set as rendered)."""
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        name, _, rest = line.rpartition(" ")
        if name == series:
            return float(rest)
    return None


@pytest.fixture
def served():
    metrics = Metrics()
    server, thread = metrics.start_http_server("127.0.0.1", 0)
    assert thread.is_alive()
    yield metrics, server.server_address[1]
    metrics.stop()
    metrics.stop()
    assert not thread.is_alive()


def test_istio_names_move_exactly(served) -> None:
    metrics, port = served
    before = scrape(port)
    assert value(before, "citadel_server_csr_count") == 0
    for _ in range(3):
        metrics.csr_received()
    metrics.issued(2)
    metrics.sign_error("CSR_ERROR")
    metrics.authentication_failed("token_invalid")
    metrics.set_ca_expiry("default", dt.datetime(2035, 1, 1, tzinfo=UTC), dt.datetime(2030, 1, 1, tzinfo=UTC))
    text = scrape(port)
    assert re.search(r"^citadel_server_csr_count 3(\.0)?$", text, re.M)
    assert value(text, "citadel_server_success_cert_issuance_count") == 2
    assert value(text, "citadel_server_authentication_failure_count") == 1
    assert value(text, 'citadel_server_csr_sign_err_count{error="CSR_ERROR"}') == 1
    for kind in set(SIGN_ERROR_KINDS) - {"CSR_ERROR"}:
        assert value(text, f'citadel_server_csr_sign_err_count{{error="{kind}"}}') == 0
    assert value(text, "citadel_server_root_cert_expiry_timestamp") == dt.datetime(2035, 1, 1, tzinfo=UTC).timestamp()
    assert value(text, "citadel_server_cert_chain_expiry_timestamp") == dt.datetime(2030, 1, 1,
                                                                                   tzinfo=UTC).timestamp()
    assert not re.search(r"citadel_\w*_total", text)
    assert "_created" not in text
    for name in ("citadel_server_csr_count", "citadel_server_csr_sign_err_count"):
        assert f"# TYPE {name} untyped" in text


def test_openmetrics_negotiation_keeps_names(served) -> None:
    metrics, port = served
    metrics.csr_received()
    text = scrape(port, "application/openmetrics-text; version=1.0.0")
    assert value(text, "citadel_server_csr_count") == 1
    assert not re.search(r"citadel_\w*_total", text) and text.rstrip().endswith("# EOF")


def test_grpc_and_fastca_series(served) -> None:
    metrics, port = served
    service, method = "istio.v1.auth.IstioCertificateService", "CreateCertificate"
    metrics.request_finished(service, method, "OK", 0.0004)
    metrics.request_finished(service, method, "OK", 0.002)
    metrics.request_finished(service, method, "UNAVAILABLE", 0.5)
    metrics.observe_issuance(0.0003)
    metrics.observe_batch(17)
    metrics.observe_hsm_sign("default", 0.004)
    metrics.set_queue_depth(42)
    metrics.observe_audit_commit(0.001)
    metrics.audit_committed(10, 0.002)
    metrics.authentication_failed("no_credential")
    metrics.set_ca_expiry("other-signer", dt.datetime(2031, 1, 1, tzinfo=UTC), dt.datetime(2029, 1, 1, tzinfo=UTC))
    text = scrape(port)
    labels = f'grpc_code="OK",grpc_method="{method}",grpc_service="{service}",grpc_type="unary"'
    assert value(text, f"grpc_server_handled_total{{{labels}}}") == 2
    assert value(text, f"grpc_server_handled_total{{{labels.replace('OK', 'UNAVAILABLE')}}}") == 1
    hist = f'grpc_method="{method}",grpc_service="{service}",grpc_type="unary"'
    assert value(text, f"grpc_server_handling_seconds_count{{{hist}}}") == 3
    assert value(text, f'grpc_server_handling_seconds_bucket{{{hist},le="0.0005"}}') == 1
    assert value(text, 'fastca_requests_total{code="OK",method="CreateCertificate"}') == 2
    assert value(text, 'fastca_issuance_seconds_bucket{le="0.0001"}') == 0
    assert value(text, 'fastca_issuance_seconds_bucket{le="0.0005"}') == 1
    assert value(text, "fastca_batch_size_sum") == 17
    assert value(text, 'fastca_hsm_sign_seconds_count{signer="default"}') == 1
    assert value(text, "fastca_queue_depth") == 42
    assert value(text, "fastca_audit_commit_seconds_count") == 2
    assert value(text, 'fastca_authentication_failures_total{reason="no_credential"}') == 1
    assert value(text, 'fastca_ca_expiry_timestamp_seconds{kind="root",signer="other-signer"}') == \
        dt.datetime(2031, 1, 1, tzinfo=UTC).timestamp()
    # Only the default signer's expiry feeds Istio's gauges.
    assert "citadel_server_root_cert_expiry_timestamp" not in text


def test_label_values_cannot_carry_secrets_or_explode() -> None:
    metrics = Metrics()
    jwt = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl"
    metrics.authentication_failed(f"bad token {jwt}")
    metrics.authentication_failed("spiffe://cluster.local/ns/a/sa/b?pin-value=1234")
    metrics.request_finished("svc", "x" * 500, "OK", 0.1)
    text = metrics.render().decode()
    assert jwt not in text and "1234" not in text and "x" * 100 not in text
    assert value(text, 'fastca_authentication_failures_total{reason="other"}') == 2
    with pytest.raises(ValueError):
        metrics.sign_error("SOMETHING_ELSE")


def test_instances_are_independent() -> None:
    a, b = Metrics(), Metrics()
    a.csr_received()
    assert value(a.render().decode(), "citadel_server_csr_count") == 1
    assert value(b.render().decode(), "citadel_server_csr_count") == 0


def test_thread_safe_counts() -> None:
    metrics = Metrics()

    def work() -> None:
        for _ in range(5000):
            metrics.csr_received()
            metrics.issued()

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    text = metrics.render().decode()
    assert value(text, "citadel_server_csr_count") == 20000
    assert value(text, "citadel_server_success_cert_issuance_count") == 20000
