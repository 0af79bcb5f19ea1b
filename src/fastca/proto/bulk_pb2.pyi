from fastca.proto import istio_ca_pb2 as _istio_ca_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class BulkCertificateRequest(_message.Message):
    __slots__ = ("requests",)
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    requests: _containers.RepeatedCompositeFieldContainer[_istio_ca_pb2.IstioCertificateRequest]
    def __init__(self, requests: _Optional[_Iterable[_Union[_istio_ca_pb2.IstioCertificateRequest, _Mapping]]] = ...) -> None: ...

class BulkCertificateResult(_message.Message):
    __slots__ = ("code", "message", "cert_chain")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    CERT_CHAIN_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    cert_chain: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ..., cert_chain: _Optional[_Iterable[str]] = ...) -> None: ...

class BulkCertificateResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[BulkCertificateResult]
    def __init__(self, results: _Optional[_Iterable[_Union[BulkCertificateResult, _Mapping]]] = ...) -> None: ...
