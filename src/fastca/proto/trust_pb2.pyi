from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class TrustBundleRequest(_message.Message):
    __slots__ = ("cert_signer",)
    CERT_SIGNER_FIELD_NUMBER: _ClassVar[int]
    cert_signer: str
    def __init__(self, cert_signer: _Optional[str] = ...) -> None: ...

class TrustBundleResponse(_message.Message):
    __slots__ = ("root_cert", "version")
    ROOT_CERT_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    root_cert: str
    version: str
    def __init__(self, root_cert: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...
