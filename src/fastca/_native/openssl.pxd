# The slice of libcrypto the native core calls. The legacy RSA/EC_KEY
# functions are deliberate: on OpenSSL 3.0 d2i_PUBKEY goes through the
# provider decoder chain, far dearer per key than setting the numbers (csr.pyx).

cdef extern from "openssl/rsa.h" nogil:
    ctypedef struct RSA:
        pass

cdef extern from "openssl/ec.h" nogil:
    ctypedef struct EC_KEY:
        pass

cdef extern from "openssl/evp.h" nogil:
    ctypedef struct EVP_PKEY:
        pass
    ctypedef struct EVP_MD:
        pass
    ctypedef struct EVP_MD_CTX:
        pass
    ctypedef struct EVP_PKEY_CTX:
        pass
    ctypedef struct ENGINE:
        pass
    const EVP_MD* EVP_sha256()
    const EVP_MD* EVP_sha384()
    const EVP_MD* EVP_sha512()
    EVP_MD_CTX* EVP_MD_CTX_new()
    void EVP_MD_CTX_free(EVP_MD_CTX* ctx)
    int EVP_DigestVerifyInit(EVP_MD_CTX* ctx, EVP_PKEY_CTX** pctx, const EVP_MD* md,
                             ENGINE* engine, EVP_PKEY* pkey)
    int EVP_DigestVerify(EVP_MD_CTX* ctx, const unsigned char* signature, size_t signature_size,
                         const unsigned char* data, size_t size)
    void EVP_PKEY_free(EVP_PKEY* pkey)
    int EVP_PKEY_get_base_id(const EVP_PKEY* pkey)
    RSA* EVP_PKEY_get1_RSA(EVP_PKEY* pkey)
    EC_KEY* EVP_PKEY_get1_EC_KEY(EVP_PKEY* pkey)
    int EVP_PKEY_RSA
    int EVP_PKEY_EC

cdef extern from "openssl/x509.h" nogil:
    EVP_PKEY* d2i_PUBKEY(EVP_PKEY** out, const unsigned char** data, long size)

cdef extern from "openssl/err.h" nogil:
    void ERR_clear_error()

cdef extern from "openssl/bn.h" nogil:
    ctypedef struct BIGNUM:
        pass
    ctypedef struct BN_CTX:
        pass
    BIGNUM* BN_bin2bn(const unsigned char* data, int size, BIGNUM* out)
    void BN_free(BIGNUM* value)

cdef extern from "openssl/sha.h" nogil:
    unsigned char* SHA256(const unsigned char* data, size_t size, unsigned char* digest)
    unsigned char* SHA384(const unsigned char* data, size_t size, unsigned char* digest)
    unsigned char* SHA512(const unsigned char* data, size_t size, unsigned char* digest)

cdef extern from "openssl/obj_mac.h" nogil:
    int NID_sha256
    int NID_sha384
    int NID_sha512
    int NID_X9_62_prime256v1
    int NID_secp384r1

cdef extern from "openssl/rsa.h" nogil:
    RSA* RSA_new()
    void RSA_free(RSA* rsa)
    int RSA_set0_key(RSA* rsa, BIGNUM* n, BIGNUM* e, BIGNUM* d)
    int RSA_verify(int nid, const unsigned char* digest, unsigned int digest_size,
                   const unsigned char* signature, unsigned int signature_size, RSA* rsa)

cdef extern from "openssl/ec.h" nogil:
    ctypedef struct EC_GROUP:
        pass
    EC_GROUP* EC_GROUP_new_by_curve_name(int nid)
    EC_KEY* EC_KEY_new()
    void EC_KEY_free(EC_KEY* key)
    int EC_KEY_set_group(EC_KEY* key, const EC_GROUP* group)
    int EC_KEY_oct2key(EC_KEY* key, const unsigned char* data, size_t size, BN_CTX* ctx)

cdef extern from "openssl/ecdsa.h" nogil:
    int ECDSA_verify(int type, const unsigned char* digest, int digest_size,
                     const unsigned char* signature, int signature_size, EC_KEY* key)
