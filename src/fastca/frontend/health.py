"""grpc.health.v1.Health on the native core: Check (unary) and Watch
(server-streaming), with the statuses the server's probe sets.

The services known are "" (the whole server) and the CA's own service
names; another name is NOT_FOUND on Check and SERVICE_UNKNOWN on Watch, as
grpc's health protocol says. A Watch gets the current status at once and
every change after; at shutdown watchers get NOT_SERVING, then the stream
ends with UNAVAILABLE.
"""

from __future__ import annotations

from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2

from fastca.frontend._grpc import INVALID_ARGUMENT, NOT_FOUND, UNAVAILABLE, Call

__all__ = ["HEALTH_SERVICE", "HealthState", "HealthCheck", "HealthWatch"]

HEALTH_SERVICE = "grpc.health.v1.Health"
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


class HealthState:
    """Status per service name, and the Watch calls to tell of changes."""

    def __init__(self, services: list[str]) -> None:
        self._status = {name: _NOT_SERVING for name in ["", *services]}
        self._watchers: dict[Call, str] = {}

    def get(self, service: str) -> int | None:
        return self._status.get(service)

    def set_all(self, serving: bool) -> None:
        status = _SERVING if serving else _NOT_SERVING
        changed = [name for name, old in self._status.items() if old != status]
        for name in changed:
            self._status[name] = status
        if changed:
            for call, service in list(self._watchers.items()):
                if service in changed:
                    call.send(_response(status))

    def watch(self, call: Call, service: str) -> None:
        self._watchers[call] = service
        call.on_cancel = lambda: self._watchers.pop(call, None)
        call.send(_response(self._status.get(service, _UNKNOWN)))

    def shutdown(self) -> None:
        self.set_all(False)
        watchers, self._watchers = self._watchers, {}
        for call in watchers:
            call.finish(UNAVAILABLE, "server shutting down")


def _response(status: int) -> bytes:
    return health_pb2.HealthCheckResponse(status=status).SerializeToString()


def _service_of(call: Call, message: bytes) -> str | None:
    try:
        return health_pb2.HealthCheckRequest.FromString(message).service
    except DecodeError:
        call.fail(INVALID_ARGUMENT, "the request is not a HealthCheckRequest message")
        return None


class HealthCheck:
    streaming = False

    def __init__(self, state: HealthState) -> None:
        self._state = state

    def accepts(self, call: Call) -> bool:
        return True

    def handle(self, call: Call) -> None:
        service = _service_of(call, call.message)
        if service is None:
            return
        status = self._state.get(service)
        if status is None:
            call.fail(NOT_FOUND, f"unknown service {service[:200]!r}")
        else:
            call.respond(_response(status))


class HealthWatch:
    streaming = True

    def __init__(self, state: HealthState) -> None:
        self._state = state

    def accepts(self, call: Call) -> bool:
        return True

    def start(self, call: Call) -> None:
        pass

    def message(self, call: Call, message: bytes) -> None:
        if call.context is not None:
            return                          # one request per Watch; further ones change nothing
        service = _service_of(call, message)
        if service is not None:
            call.context = service
            self._state.watch(call, service)

    def half_close(self, call: Call) -> None:
        if call.context is None:
            call.fail(INVALID_ARGUMENT, "Watch needs one HealthCheckRequest")
        # Otherwise the stream stays open: the client watches until it cancels.
