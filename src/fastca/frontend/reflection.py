"""grpc.reflection.v1alpha.ServerReflection on the native core, so tools
such as grpcurl can list and describe the CA's services on its own port.

A bidirectional stream: each request message gets one response message.
Answered from the protobuf descriptor pool: ``list_services``,
``file_by_filename`` and ``file_containing_symbol`` (with the files they
import); extension queries get NOT_FOUND in the response, as fastca's
messages declare no extensions.
"""

from __future__ import annotations

from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.message import DecodeError
from grpc_reflection.v1alpha import reflection_pb2

from fastca.frontend._grpc import INVALID_ARGUMENT, NOT_FOUND, OK, Call

__all__ = ["REFLECTION_SERVICE", "ServerReflection"]

REFLECTION_SERVICE = "grpc.reflection.v1alpha.ServerReflection"


class ServerReflection:
    streaming = True

    def __init__(self, services: list[str]) -> None:
        self._services = sorted(services)
        self._pool = descriptor_pool.Default()

    def accepts(self, call: Call) -> bool:
        return True

    def start(self, call: Call) -> None:
        pass

    def message(self, call: Call, message: bytes) -> None:
        try:
            request = reflection_pb2.ServerReflectionRequest.FromString(message)
        except DecodeError:
            call.fail(INVALID_ARGUMENT, "the request is not a ServerReflectionRequest message")
            return
        response = reflection_pb2.ServerReflectionResponse(valid_host=request.host, original_request=request)
        kind = request.WhichOneof("message_request")
        try:
            if kind == "list_services":
                response.list_services_response.service.extend(
                    reflection_pb2.ServiceResponse(name=name) for name in self._services)
            elif kind == "file_by_filename":
                self._files(response, self._pool.FindFileByName(request.file_by_filename))
            elif kind == "file_containing_symbol":
                self._files(response, self._pool.FindFileContainingSymbol(request.file_containing_symbol))
            else:
                self._not_found(response, "extensions are not declared by these services")
        except KeyError:
            self._not_found(response, "not found")
        call.send(response.SerializeToString())

    def half_close(self, call: Call) -> None:
        call.finish(OK)

    @staticmethod
    def _not_found(response: reflection_pb2.ServerReflectionResponse, message: str) -> None:
        response.error_response.error_code = NOT_FOUND
        response.error_response.error_message = message

    @staticmethod
    def _files(response: reflection_pb2.ServerReflectionResponse, file: object) -> None:
        seen: set[str] = set()
        order: list[object] = []

        def visit(descriptor: object) -> None:
            name = descriptor.name  # type: ignore[attr-defined]
            if name in seen:
                return
            seen.add(name)
            order.append(descriptor)
            for dependency in descriptor.dependencies:  # type: ignore[attr-defined]
                visit(dependency)

        visit(file)
        for descriptor in order:
            proto = descriptor_pb2.FileDescriptorProto()
            descriptor.CopyToProto(proto)  # type: ignore[attr-defined]
            response.file_descriptor_response.file_descriptor_proto.append(proto.SerializeToString())
