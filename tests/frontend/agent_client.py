"""An Istio-agent-style client: what pilot-agent sends, byte for byte where it
matters (docs/istio-contract.md): TLS with the mesh root, server name from
CA_ADDR, `authorization: Bearer`, `clusterid`, the CSR as PEM text,
validity_duration and a metadata Struct with CertSigner."""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from google.protobuf import struct_pb2

from fastca.proto import istio_ca_pb2, istio_ca_pb2_grpc


@dataclass
class AgentClient:
    address: str                      # "localhost:PORT"
    root_pem: bytes | None            # None: plaintext (:15010)
    token: str | None = None
    cluster_id: str = "Kubernetes"
    client_key_pem: bytes | None = None
    client_cert_pem: bytes | None = None
    extra_headers: tuple[tuple[str, str], ...] = ()

    def channel(self) -> grpc.Channel:
        if self.root_pem is None:
            return grpc.insecure_channel(self.address)
        credentials = grpc.ssl_channel_credentials(self.root_pem, self.client_key_pem, self.client_cert_pem)
        return grpc.secure_channel(self.address, credentials)

    def create_certificate(self, csr_pem: bytes | str, *, ttl: int = 86400, cert_signer: str | None = "",
                           impersonate: str | None = None, metadata: struct_pb2.Struct | None = None,
                           timeout: float = 30.0) -> list[str]:
        if metadata is None:
            metadata = struct_pb2.Struct()
            if cert_signer is not None:
                metadata.update({"CertSigner": cert_signer})
            if impersonate is not None:
                metadata.update({"ImpersonatedIdentity": impersonate})
        request = istio_ca_pb2.IstioCertificateRequest(
            csr=csr_pem.decode() if isinstance(csr_pem, bytes) else csr_pem, validity_duration=ttl,
            metadata=metadata)
        headers = [("clusterid", self.cluster_id), *self.extra_headers]
        if self.token is not None:
            headers.append(("authorization", f"Bearer {self.token}"))
        with self.channel() as channel:
            response = istio_ca_pb2_grpc.IstioCertificateServiceStub(channel).CreateCertificate(
                request, metadata=headers, timeout=timeout)
        return list(response.cert_chain)
