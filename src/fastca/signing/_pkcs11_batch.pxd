# The slice of PKCS#11 the batch signer calls, from p11-kit's clean
# pkcs11.h. setup.py builds with CRYPTOKI_GNU so the header uses its
# lower-case names and defines none of the compatibility macros (`value`,
# `count`, `parameter`, ...) that would rename identifiers in Cython's C.

cdef extern from "p11-kit/pkcs11.h" nogil:
    ctypedef unsigned long ck_rv_t
    ctypedef unsigned long ck_session_handle_t
    ctypedef unsigned long ck_object_handle_t
    ctypedef unsigned long ck_mechanism_type_t

    struct ck_mechanism:
        ck_mechanism_type_t mechanism
        void* parameter
        unsigned long parameter_len

    ctypedef ck_rv_t (*CK_C_SignInit)(ck_session_handle_t session, ck_mechanism* mechanism,
                                      ck_object_handle_t key)
    ctypedef ck_rv_t (*CK_C_Sign)(ck_session_handle_t session, unsigned char* data, unsigned long data_len,
                                  unsigned char* signature, unsigned long* signature_len)

    # Only the members used here; the header gives the real layout.
    struct ck_function_list:
        CK_C_SignInit C_SignInit
        CK_C_Sign C_Sign

    ctypedef ck_rv_t (*CK_C_GetFunctionList)(ck_function_list** function_list)

    ck_rv_t CKR_OK
    ck_rv_t CKR_BUFFER_TOO_SMALL
    ck_rv_t CKR_HOST_MEMORY
