"""Typed surface of the native PKCS#11 batch signer (private to fastca.signing.pkcs11)."""

class Pkcs11ModuleNotLoaded(RuntimeError):
    module_path: str
    def __init__(self, module_path: str, reason: str) -> None: ...

class Pkcs11CallFailed(RuntimeError):
    function: str       # "C_SignInit" | "C_Sign" | "C_GetFunctionList"
    ck_rv: int          # the CK_RV the module returned
    item_index: int     # the batch item it failed on (-1: not item-specific)
    def __init__(self, function: str, ck_rv: int, item_index: int) -> None: ...

def bind_module(module_path: str) -> None:
    """Resolve and cache the module's CK_FUNCTION_LIST. The module must already be
    loaded and C_Initialize'd in this process (by python-pkcs11)."""

def sign_batch(module_path: str, session_handle: int, key_handle: int, mechanism: int,
               digest: str | None, items: list[bytes], signature_size: int) -> list[bytes]:
    """C_SignInit + C_Sign per item in one GIL-free loop, hashing each item on the
    host first when ``digest`` ("sha256" | "sha384") is given. ``signature_size`` is
    the output buffer per item. Raises Pkcs11CallFailed at the first failing item.
    Must run on the process's PKCS#11 thread."""
