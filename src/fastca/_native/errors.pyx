"""NativeError and its stable codes; the one funnel from C failures to Python."""

from libc.string cimport strncpy

E_CSR_ENCODING = "csr.encoding"
E_CSR_MALFORMED = "csr.malformed"
E_CSR_ALGORITHM = "csr.algorithm"
E_CSR_KEY = "csr.key"
E_CSR_SIGNATURE = "csr.signature"
E_IDENTITY = "identity"
E_SIGNATURE = "signature"
E_INTERNAL = "internal"

_CODE_NAMES = {
    FAIL_CSR_ENCODING: E_CSR_ENCODING,
    FAIL_CSR_MALFORMED: E_CSR_MALFORMED,
    FAIL_CSR_ALGORITHM: E_CSR_ALGORITHM,
    FAIL_CSR_KEY: E_CSR_KEY,
    FAIL_CSR_SIGNATURE: E_CSR_SIGNATURE,
    FAIL_IDENTITY: E_IDENTITY,
    FAIL_SIGNATURE: E_SIGNATURE,
    FAIL_INTERNAL: E_INTERNAL,
}


class NativeError(ValueError):
    """A request the native core refuses; ``code`` is one of the E_* strings."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __reduce__(self):
        # The default reduce would call NativeError(message) and lose the code;
        # errors cross process boundaries in the multi-process server.
        return (type(self), (self.code, self.message))

    def __repr__(self) -> str:
        return f"NativeError({self.code!r}, {self.message!r})"


cdef int fail(Failure* failure, int code, const char* message) noexcept nogil:
    failure.code = code
    strncpy(failure.message, message, FAILURE_MESSAGE_SIZE - 1)
    failure.message[FAILURE_MESSAGE_SIZE - 1] = 0
    return -1


cdef object failure_to_error(Failure* failure):
    code = _CODE_NAMES.get(failure.code, E_INTERNAL)
    return NativeError(code, failure.message.decode("ascii", "replace"))
