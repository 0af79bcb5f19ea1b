"""A batch of C_SignInit + C_Sign calls in one loop, without the GIL.

python-pkcs11 pays per signature for a Python method call, an operation
object, a length-query C_Sign and GIL hand-offs around each C call. Here the
inputs are copied into one C buffer with the GIL, then every item is hashed
(when the host hashes, as for CKM_ECDSA) and signed in a single nogil loop
into a preallocated output buffer, and the Python results are built after.

Login, sessions and key lookup stay in python-pkcs11: this module only takes
the session and key handles it opened. It never initialises or finalises the
module: python-pkcs11 has already called C_Initialize in this process, and
a second C_Initialize (or a C_Finalize) here would pull the module out from
under it. Callers keep the process's PKCS#11 thread rule (pkcs11_context.py):
this function must run on that thread like every other PKCS#11 call.

Errors are raised as the two exceptions below, carrying the raw CK_RV; the
caller (fastca.signing.pkcs11) maps them onto fastca's error tree.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy

from fastca._native.openssl cimport SHA256, SHA384

cdef extern from "<dlfcn.h>" nogil:
    void* dlopen(const char* filename, int flags)
    void* dlsym(void* handle, const char* symbol)
    char* dlerror()
    int RTLD_NOW
    int RTLD_NOLOAD

cdef enum DigestKind:
    DIGEST_NONE = 0
    DIGEST_SHA256 = 32
    DIGEST_SHA384 = 48

cdef enum:
    MAX_DIGEST_SIZE = 64
    # RSA-16384 signatures are 2048 bytes; anything larger is a caller bug.
    MAX_SIGNATURE_SIZE = 4096

_DIGEST_KINDS = {None: DIGEST_NONE, "sha256": DIGEST_SHA256, "sha384": DIGEST_SHA384}


class Pkcs11ModuleNotLoaded(RuntimeError):
    """The module is not loaded (and C_Initialize'd) in this process yet."""

    def __init__(self, module_path: str, reason: str) -> None:
        super().__init__(f"PKCS#11 module {module_path} is not loaded in this process ({reason}); "
                         "open it through python-pkcs11 first")
        self.module_path = module_path


class Pkcs11CallFailed(RuntimeError):
    """A C_SignInit or C_Sign returned something other than CKR_OK."""

    def __init__(self, function: str, ck_rv: int, item_index: int) -> None:
        super().__init__(f"{function} failed with CK_RV 0x{ck_rv:08x} on item {item_index}")
        self.function = function
        self.ck_rv = ck_rv
        self.item_index = item_index


# module path -> address of its CK_FUNCTION_LIST. The dlopen reference taken
# to find it is never dropped, so the module stays mapped and the address
# valid for the life of the process even if python-pkcs11 unloads it (calls
# then fail with CKR_CRYPTOKI_NOT_INITIALIZED, which the caller maps).
_function_lists: dict[str, int] = {}


cdef ck_function_list* function_list_for(str module_path) except NULL:
    cached = _function_lists.get(module_path)
    if cached is not None:
        return <ck_function_list*><size_t>cached
    encoded_path = module_path.encode()
    cdef const char* reason
    cdef void* library = dlopen(encoded_path, RTLD_NOW | RTLD_NOLOAD)
    if library == NULL:
        reason = dlerror()
        raise Pkcs11ModuleNotLoaded(module_path, reason.decode(errors="replace") if reason != NULL
                                    else "dlopen with RTLD_NOLOAD found no such loaded object")
    cdef CK_C_GetFunctionList get_function_list = <CK_C_GetFunctionList>dlsym(library, "C_GetFunctionList")
    if get_function_list == NULL:
        raise Pkcs11ModuleNotLoaded(module_path, "it exports no C_GetFunctionList")
    cdef ck_function_list* functions = NULL
    cdef ck_rv_t rv = get_function_list(&functions)
    if rv != CKR_OK or functions == NULL:
        raise Pkcs11CallFailed("C_GetFunctionList", rv if rv != CKR_OK else CKR_HOST_MEMORY, -1)
    _function_lists[module_path] = <size_t>functions
    return functions


def bind_module(str module_path) -> None:
    """Find and cache the loaded module's function list, so that a signer
    learns at start-up, not at its first batch, that the native path works."""
    function_list_for(module_path)


cdef void finish_abandoned_sign(ck_function_list* functions, ck_session_handle_t session,
                                unsigned char* data, unsigned long size,
                                unsigned long needed) noexcept nogil:
    # CKR_BUFFER_TOO_SMALL is the one C_Sign failure that leaves the operation
    # active: finish it into a scratch buffer of the size the token asked for,
    # or the session's next C_SignInit fails with CKR_OPERATION_ACTIVE.
    cdef unsigned char* scratch = <unsigned char*>malloc(needed if needed > 0 else 1)
    if scratch != NULL:
        functions.C_Sign(session, data, size, scratch, &needed)
        free(scratch)


cdef Py_ssize_t sign_all(ck_function_list* functions, ck_session_handle_t session, ck_mechanism* mechanism,
                         ck_object_handle_t key, DigestKind digest, const unsigned char* inputs,
                         const size_t* input_offsets, Py_ssize_t count, unsigned char* outputs,
                         unsigned long* output_sizes, unsigned long signature_size,
                         ck_rv_t* failed_rv, bint* failed_in_init) noexcept nogil:
    """Sign every item; stop at the first failure (the batch fails as a
    whole, so signing the rest would only waste token time). Returns the
    index of the failed item, or ``count``."""
    cdef unsigned char digest_buffer[MAX_DIGEST_SIZE]
    cdef unsigned char* data
    cdef unsigned long size
    cdef unsigned long written
    cdef ck_rv_t rv
    cdef Py_ssize_t i
    for i in range(count):
        data = <unsigned char*>inputs + input_offsets[i]
        size = input_offsets[i + 1] - input_offsets[i]
        if digest == DIGEST_SHA256:
            SHA256(data, size, digest_buffer)
            data, size = digest_buffer, DIGEST_SHA256
        elif digest == DIGEST_SHA384:
            SHA384(data, size, digest_buffer)
            data, size = digest_buffer, DIGEST_SHA384
        rv = functions.C_SignInit(session, mechanism, key)
        if rv != CKR_OK:
            failed_rv[0], failed_in_init[0] = rv, True
            return i
        written = signature_size
        rv = functions.C_Sign(session, data, size, outputs + i * signature_size, &written)
        if rv != CKR_OK:
            if rv == CKR_BUFFER_TOO_SMALL:
                finish_abandoned_sign(functions, session, data, size, written)
            failed_rv[0], failed_in_init[0] = rv, False
            return i
        output_sizes[i] = written
    return count


def sign_batch(str module_path, unsigned long session_handle, unsigned long key_handle,
               unsigned long mechanism, digest, list items, Py_ssize_t signature_size) -> list:
    cdef ck_function_list* functions = function_list_for(module_path)
    if digest not in _DIGEST_KINDS:
        raise ValueError(f"digest must be one of {sorted(k for k in _DIGEST_KINDS if k)} or None, not {digest!r}")
    cdef DigestKind digest_kind = _DIGEST_KINDS[digest]
    if not 0 < signature_size <= MAX_SIGNATURE_SIZE:
        raise ValueError(f"signature_size {signature_size} is out of range")
    cdef Py_ssize_t count = len(items)
    if count == 0:
        return []

    cdef size_t total = 0
    for item in items:
        if type(item) is not bytes:
            raise TypeError(f"items must be bytes, not {type(item).__name__}")
        total += PyBytes_GET_SIZE(item)

    cdef ck_mechanism mechanism_struct
    mechanism_struct.mechanism = mechanism
    mechanism_struct.parameter = NULL
    mechanism_struct.parameter_len = 0
    cdef unsigned char* inputs = <unsigned char*>malloc(total if total > 0 else 1)
    cdef size_t* input_offsets = <size_t*>malloc((count + 1) * sizeof(size_t))
    cdef unsigned char* outputs = <unsigned char*>malloc(count * signature_size)
    cdef unsigned long* output_sizes = <unsigned long*>malloc(count * sizeof(unsigned long))
    cdef Py_ssize_t i
    cdef Py_ssize_t failed_index
    cdef size_t offset = 0
    cdef ck_rv_t failed_rv = CKR_OK
    cdef bint failed_in_init = False
    try:
        if inputs == NULL or input_offsets == NULL or outputs == NULL or output_sizes == NULL:
            raise MemoryError()
        # Copied under the GIL: the list and its items may change once it is released.
        for i in range(count):
            item = items[i]
            input_offsets[i] = offset
            memcpy(inputs + offset, PyBytes_AS_STRING(item), PyBytes_GET_SIZE(item))
            offset += PyBytes_GET_SIZE(item)
        input_offsets[count] = offset
        with nogil:
            failed_index = sign_all(functions, session_handle, &mechanism_struct, key_handle, digest_kind,
                                    inputs, input_offsets, count, outputs, output_sizes,
                                    <unsigned long>signature_size, &failed_rv, &failed_in_init)
        if failed_index < count:
            raise Pkcs11CallFailed("C_SignInit" if failed_in_init else "C_Sign", failed_rv, failed_index)
        return [PyBytes_FromStringAndSize(<char*>outputs + i * signature_size, output_sizes[i])
                for i in range(count)]
    finally:
        free(inputs)
        free(input_offsets)
        free(outputs)
        free(output_sizes)
