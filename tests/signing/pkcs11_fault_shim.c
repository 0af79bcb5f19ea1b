/* A PKCS#11 module that forwards to a real one (SoftHSM) and injects the
 * faults a real token never produces on demand: the tests' way to see what
 * fastca does with CK_RVs SoftHSM does not return, with a C_Sign that takes
 * seconds, and with a corrupted signature. Test support only; built by the
 * tests with gcc.
 *
 *   FASTCA_SHIM_MODULE   the real module (default: SoftHSM's)
 *   FASTCA_SHIM_CONTROL  a file read before each C_Sign/C_SignInit:
 *                        "SEQ FAIL_COUNT CK_RV DELAY_MS CORRUPT"; when SEQ
 *                        changes, the next FAIL_COUNT C_Sign calls return
 *                        CK_RV (hex or decimal), every C_Sign sleeps
 *                        DELAY_MS first, CORRUPT=1 flips a signature byte
 *   FASTCA_SHIM_LOG      a file that gets one line per C_Login
 *                        ("login RV") and per C_Initialize ("initialize RV")
 */
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <p11-kit/pkcs11.h>

static CK_FUNCTION_LIST *real;
static CK_FUNCTION_LIST shim;

static unsigned long seen_seq = (unsigned long)-1;
static unsigned long failures_left;
static CK_RV fail_rv;
static unsigned long delay_ms;
static int corrupt;

static void read_control(void)
{
    const char *path = getenv("FASTCA_SHIM_CONTROL");
    unsigned long seq, count, rv, delay;
    int flip;
    FILE *file;

    if (path == NULL || (file = fopen(path, "r")) == NULL)
        return;
    if (fscanf(file, "%lu %lu %li %lu %d", &seq, &count, (long *)&rv, &delay, &flip) == 5) {
        if (seq != seen_seq) {
            seen_seq = seq;
            failures_left = count;
        }
        fail_rv = rv;
        delay_ms = delay;
        corrupt = flip;
    }
    fclose(file);
}

static void log_call(const char *what, CK_RV rv)
{
    const char *path = getenv("FASTCA_SHIM_LOG");
    FILE *file;

    if (path == NULL || (file = fopen(path, "a")) == NULL)
        return;
    fprintf(file, "%s 0x%lx\n", what, (unsigned long)rv);
    fclose(file);
}

static CK_RV shim_initialize(CK_VOID_PTR args)
{
    CK_RV rv = real->C_Initialize(args);
    log_call("initialize", rv);
    return rv;
}

static CK_RV shim_login(CK_SESSION_HANDLE session, CK_USER_TYPE user, CK_UTF8CHAR_PTR pin, CK_ULONG pin_len)
{
    CK_RV rv = real->C_Login(session, user, pin, pin_len);
    log_call("login", rv);
    return rv;
}

static CK_RV shim_sign(CK_SESSION_HANDLE session, CK_BYTE_PTR data, CK_ULONG data_len,
                       CK_BYTE_PTR signature, CK_ULONG_PTR signature_len)
{
    CK_RV rv;

    read_control();
    if (delay_ms > 0) {
        struct timespec pause = { (time_t)(delay_ms / 1000), (long)(delay_ms % 1000) * 1000000L };
        nanosleep(&pause, NULL);
    }
    if (failures_left > 0 && signature != NULL) {
        failures_left--;
        /* A failed C_Sign ends the operation, as the standard says: finish
         * the real one so the next C_SignInit is not CKR_OPERATION_ACTIVE. */
        real->C_Sign(session, data, data_len, signature, signature_len);
        return fail_rv;
    }
    rv = real->C_Sign(session, data, data_len, signature, signature_len);
    if (rv == CKR_OK && corrupt && signature != NULL && *signature_len > 8)
        signature[*signature_len / 2] ^= 0x5a;
    return rv;
}

CK_RV C_GetFunctionList(CK_FUNCTION_LIST_PTR_PTR list)
{
    const char *path;
    void *handle;
    CK_C_GetFunctionList get;

    if (list == NULL)
        return CKR_ARGUMENTS_BAD;
    if (real == NULL) {
        path = getenv("FASTCA_SHIM_MODULE");
        handle = dlopen(path != NULL ? path : "/usr/lib/softhsm/libsofthsm2.so", RTLD_NOW | RTLD_LOCAL);
        if (handle == NULL)
            return CKR_GENERAL_ERROR;
        get = (CK_C_GetFunctionList)dlsym(handle, "C_GetFunctionList");
        if (get == NULL || get(&real) != CKR_OK)
            return CKR_GENERAL_ERROR;
        memcpy(&shim, real, sizeof shim);
        shim.C_Initialize = shim_initialize;
        shim.C_Login = shim_login;
        shim.C_Sign = shim_sign;
    }
    *list = &shim;
    return CKR_OK;
}
