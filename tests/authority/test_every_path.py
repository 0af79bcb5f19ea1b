"""Every path that produces a certificate goes through the one Authority and
its audit record: a real `fastca serve` answering the Istio RPC and the bulk
RPC, its own serving certificate, `fastca issue` on the same state, and the
health probes. Afterwards the audit log holds exactly the certificates that
left, each with the path it came from, and none of the probes'."""

from __future__ import annotations

import json
import socket
import ssl
import time

import grpc
from cryptography import x509
from google.protobuf import struct_pb2

from fastca.audit.sqlite_log import AuditReader
from fastca.proto import bulk_pb2, bulk_pb2_grpc, istio_ca_pb2
from tests.conftest import AGENT_CSRS, agent_csrs, run_fastca
from tests.frontend.agent_client import AgentClient
from tests.frontend.conftest import (apiserver, init_state, service_account_token, start_server,  # noqa: F401
                                     tokenreview_config, write_config)


def _serial(pem: str) -> str:
    return f"{x509.load_pem_x509_certificate(pem.encode()).serial_number:x}"


def _serving_serial(port: int, root: bytes) -> str:
    context = ssl.create_default_context(cadata=root.decode())
    context.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            return f"{x509.load_der_x509_certificate(tls.getpeercert(binary_form=True)).serial_number:x}"


def test_the_audit_log_holds_exactly_what_left_by_every_path(tmp_path, apiserver):
    state = init_state(tmp_path / "state")
    write_config(state, {"authn": {"tokenreview": [tokenreview_config(apiserver, tmp_path / "api-token")]}})
    server = start_server(state)
    left: dict[str, str] = {}
    try:
        port = server.ports["grpc"]
        left[_serving_serial(port, server.root_pem)] = "self"

        client = AgentClient(f"localhost:{port}", server.root_pem, token=service_account_token("paths", "istio"))
        for csr in agent_csrs()[:3]:
            left[_serial(client.create_certificate(csr.pem)[0])] = "k8s-tokenreview"

        metadata = struct_pb2.Struct()
        metadata.update({"CertSigner": ""})
        requests = [istio_ca_pb2.IstioCertificateRequest(csr=c.pem.decode(), validity_duration=3600, metadata=metadata)
                    for c in agent_csrs()[3:6]]
        requests.append(istio_ca_pb2.IstioCertificateRequest(csr="not a CSR", metadata=metadata))
        with grpc.secure_channel(f"localhost:{port}", grpc.ssl_channel_credentials(server.root_pem)) as channel:
            response = bulk_pb2_grpc.BulkCertificateServiceStub(channel).CreateCertificates(
                bulk_pb2.BulkCertificateRequest(requests=requests),
                metadata=[("authorization", f"Bearer {service_account_token('paths', 'bulk')}")], timeout=60)
        assert [r.code for r in response.results] == [0, 0, 0, grpc.StatusCode.INVALID_ARGUMENT.value[0]]
        for result in response.results[:3]:
            left[_serial(result.cert_chain[0])] = "k8s-tokenreview"

        issued = json.loads(run_fastca("issue", "--state", str(state), "--csr", str(AGENT_CSRS / "ec256-0002.csr.pem"),
                                       "--identity", "spiffe://cluster.local/ns/ops/sa/by-hand", "--json").stdout)
        left[issued["serial"]] = "cli"

        # The server probed its signer at start (and probes every 10 s): those certificates are thrown away.
        deadline = time.monotonic() + 5
        while not any(e.get("event") == "serving" for e in server.log_events()):
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        assert server.stop() == 0
    reader = AuditReader(state / "audit.db")
    try:
        recorded = {r.serial: r.credential_type for r in reader.list(limit=1000)}
    finally:
        reader.close()
    assert recorded == left
