# C-level failure record: filled in by nogil code, turned into a NativeError
# once the GIL is held again.

cdef enum FailureCode:
    FAIL_NONE = 0
    FAIL_CSR_ENCODING
    FAIL_CSR_MALFORMED
    FAIL_CSR_ALGORITHM
    FAIL_CSR_KEY
    FAIL_CSR_SIGNATURE
    FAIL_IDENTITY
    FAIL_SIGNATURE
    FAIL_INTERNAL

cdef enum:
    FAILURE_MESSAGE_SIZE = 256

ctypedef struct Failure:
    int code
    char message[FAILURE_MESSAGE_SIZE]

cdef int fail(Failure* failure, int code, const char* message) noexcept nogil
cdef object failure_to_error(Failure* failure)
