"""An SDS client that speaks as Envoy does (grpcio + xds-protos over the
agent's Unix socket): state-of-the-world and delta streams, ACK/NACK."""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass

import grpc
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.secret.v3 import sds_pb2_grpc
from google.rpc import status_pb2

TYPE_URL = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"


@dataclass
class Received:
    version: str
    nonce: str
    secrets: dict[str, secret_pb2.Secret]
    removed: list[str]


def _unpack(any_message) -> secret_pb2.Secret:
    secret = secret_pb2.Secret()
    any_message.Unpack(secret)
    return secret


class _Stream:
    def __init__(self, socket_path: str, delta: bool) -> None:
        self._channel = grpc.insecure_channel(f"unix:{socket_path}")
        self._requests: queue.Queue = queue.Queue()
        self.responses: queue.Queue = queue.Queue()
        stub = sds_pb2_grpc.SecretDiscoveryServiceStub(self._channel)
        method = stub.DeltaSecrets if delta else stub.StreamSecrets
        self._call = method(iter(self._requests.get, None))
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        try:
            for response in self._call:
                self.responses.put(response)
        except grpc.RpcError as error:
            self.responses.put(error)

    def next(self, timeout: float = 20.0):
        item = self.responses.get(timeout=timeout)
        if isinstance(item, grpc.RpcError):
            raise item
        return item

    def nothing_within(self, seconds: float) -> bool:
        try:
            self.responses.get(timeout=seconds)
        except queue.Empty:
            return True
        return False

    def close(self) -> None:
        self._requests.put(None)
        self._call.cancel()
        self._channel.close()


class SotwStream(_Stream):
    def __init__(self, socket_path: str, names: list[str], node_id: str = "sidecar~10.0.0.1~web.shop~shop.svc") -> None:
        super().__init__(socket_path, delta=False)
        self.names = names
        self.node_id = node_id
        self._send()

    def _send(self, version: str = "", nonce: str = "", error: str | None = None) -> None:
        request = discovery_pb2.DiscoveryRequest(version_info=version, resource_names=self.names, type_url=TYPE_URL,
                                                 response_nonce=nonce)
        request.node.id = self.node_id
        if error is not None:
            request.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
        self._requests.put(request)

    def receive(self, timeout: float = 20.0) -> Received:
        response = self.next(timeout)
        secrets = {s.name: s for s in map(_unpack, response.resources)}
        return Received(response.version_info, response.nonce, secrets, [])

    def ack(self, received: Received) -> None:
        self._send(received.version, received.nonce)

    def nack(self, received: Received, message: str = "rejected by test") -> None:
        self._send("", received.nonce, error=message)


class DeltaStream(_Stream):
    def __init__(self, socket_path: str) -> None:
        super().__init__(socket_path, delta=True)

    def send(self, subscribe=(), unsubscribe=(), nonce: str = "", error: str | None = None) -> None:
        request = discovery_pb2.DeltaDiscoveryRequest(type_url=TYPE_URL, resource_names_subscribe=list(subscribe),
                                                      resource_names_unsubscribe=list(unsubscribe),
                                                      response_nonce=nonce)
        request.node.id = "sidecar~10.0.0.1~web.shop~shop.svc"
        if error is not None:
            request.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
        self._requests.put(request)

    def receive(self, timeout: float = 20.0) -> Received:
        response = self.next(timeout)
        secrets = {r.name: _unpack(r.resource) for r in response.resources}
        return Received(response.system_version_info, response.nonce, secrets, list(response.removed_resources))
