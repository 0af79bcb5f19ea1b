"""The one place in a process where PKCS#11 is called.

python-pkcs11 initialises modules with ``C_Initialize(NULL)``, so SoftHSM
turns its own locking off, yet python-pkcs11 releases the GIL inside every C
call: two threads in PKCS#11 at once corrupt SoftHSM's heap (measured, see
docs/architecture.md). Rather than trusting every caller to hold a lock, every
PKCS#11 call in the process is confined to a single thread owned by this
context: callers hand it a function and wait for the result. Two signers, a
key generation and a token listing running "at the same time" are simply
queued on that thread, so the crash cannot be written.

The context belongs to the process that created it. PKCS#11 state must not
cross ``fork``: a child gets a fresh context and loads the module itself.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from typing import Any, Callable, TypeVar

import pkcs11
from pkcs11 import exceptions as p11_errors

from fastca.errors import CANotReady, ConfigurationError
from fastca.signing.pkcs11_uri import Pkcs11Uri

__all__ = ["Pkcs11Context", "PinRefused", "SOFTHSM2_CONF_ENV"]

T = TypeVar("T")
SOFTHSM2_CONF_ENV = "SOFTHSM2_CONF"


class PinRefused(ConfigurationError):
    """The token refused the PIN (incorrect or locked). Trying the same PIN
    again can only lock it: whoever catches this must not retry until the
    PIN changes."""


class _OnThread(Executor):
    """The PKCS#11 thread as an Executor (for Signer.home_executor)."""

    def __init__(self, context: Pkcs11Context) -> None:
        self._context = context

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        if kwargs:
            return self._context.submit(lambda: fn(*args, **kwargs))
        return self._context.submit(fn, *args)


class Pkcs11Context:
    _instance: Pkcs11Context | None = None
    _instance_lock = threading.Lock()

    def __init__(self) -> None:
        self._pid = os.getpid()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pkcs11")
        self._as_executor = _OnThread(self)     # one object: signers on this thread compare equal
        self._thread_ident: int | None = None
        # Confined to the PKCS#11 thread:
        self._libraries: dict[str, tuple[Any, str | None]] = {}
        self._sessions: dict[tuple[str, str], Any] = {}
        # Bumped by each re-initialisation of a module: a handle opened in an
        # older generation belongs to a session that no longer exists.
        self._generations: dict[str, int] = {}

    @classmethod
    def for_this_process(cls) -> Pkcs11Context:
        with cls._instance_lock:
            if cls._instance is None or cls._instance._pid != os.getpid():
                cls._instance = cls()
            return cls._instance

    # -- running work on the PKCS#11 thread ------------------------------------

    def submit(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        if os.getpid() != self._pid:
            raise CANotReady("PKCS#11 context used across fork; open the signer in the child process")
        return self._executor.submit(self._on_thread, fn, *args)

    @property
    def executor(self) -> Executor:
        """This context's thread as an Executor: what runs there may call
        PKCS#11 (through ``run``) without a hand-off."""
        return self._as_executor

    def run(self, fn: Callable[..., T], *args: Any) -> T:
        if threading.get_ident() == self._thread_ident:
            return fn(*args)
        return self.submit(fn, *args).result()

    def _on_thread(self, fn: Callable[..., T], *args: Any) -> T:
        self._thread_ident = threading.get_ident()
        return fn(*args)

    def _check_thread(self) -> None:
        if threading.get_ident() != self._thread_ident:
            raise RuntimeError("PKCS#11 touched outside the PKCS#11 thread")

    # -- helpers for functions running on the thread ---------------------------

    def library(self, module_path: str, softhsm_conf: str | None = None) -> Any:
        """The loaded module. ``softhsm_conf`` is where SoftHSM reads its
        token directory; the module reads it once, at C_Initialize."""
        self._check_thread()
        loaded = self._libraries.get(module_path)
        if loaded is not None:
            library, conf = loaded
            if softhsm_conf is not None and conf != softhsm_conf:
                raise ConfigurationError(
                    f"PKCS#11 module {module_path} is already loaded with another SoftHSM "
                    f"configuration ({conf}); one process serves one SoftHSM configuration")
            return library
        if softhsm_conf is not None:
            os.environ[SOFTHSM2_CONF_ENV] = softhsm_conf
        if not os.path.exists(module_path):
            raise ConfigurationError(f"PKCS#11 module {module_path} does not exist")
        try:
            library = pkcs11.lib(module_path)
        except p11_errors.PKCS11Error as exc:
            raise CANotReady(f"cannot initialise PKCS#11 module {module_path}: {type(exc).__name__}") from None
        self._libraries[module_path] = (library, softhsm_conf or os.environ.get(SOFTHSM2_CONF_ENV))
        return library

    def token(self, uri: Pkcs11Uri, softhsm_conf: str | None = None, module_default: str | None = None) -> Any:
        library = self.library(uri.resolved_module_path(module_default), softhsm_conf)
        query: dict[str, str] = {}
        if uri.token is not None:
            query["token_label"] = uri.token
        if uri.serial is not None:
            query["token_serial"] = uri.serial.encode()
        try:
            return library.get_token(**query)
        except p11_errors.NoSuchToken:
            raise CANotReady(f"no PKCS#11 token matches {uri}") from None
        except p11_errors.MultipleTokensReturned:
            raise ConfigurationError(f"more than one PKCS#11 token matches {uri}; add token= or serial=") from None
        except p11_errors.PKCS11Error as exc:
            raise CANotReady(f"cannot list the PKCS#11 tokens for {uri}: {type(exc).__name__}") from None

    def session(self, uri: Pkcs11Uri, softhsm_conf: str | None = None, module_default: str | None = None) -> Any:
        """A logged-in session on the URI's token, opened once and never
        closed: closing a session logs out every session of the application,
        and a second C_Login fails with UserAlreadyLoggedIn."""
        module_path = uri.resolved_module_path(module_default)
        token = self.token(uri, softhsm_conf, module_default)
        key = (module_path, f"{token.label}/{token.serial!r}")
        session = self._sessions.get(key)
        if session is not None:
            return session
        pin = uri.read_pin()
        try:
            session = token.open(rw=True, user_pin=pin)
        except p11_errors.PinIncorrect:
            # One attempt only: a retry loop would lock the PIN on a real HSM.
            raise PinRefused(f"PKCS#11 login to token {token.label!r} failed: PIN incorrect") from None
        except p11_errors.PinLocked:
            raise PinRefused(f"PKCS#11 token {token.label!r}: PIN locked") from None
        except p11_errors.UserAlreadyLoggedIn:
            session = token.open(rw=True)
        except p11_errors.PKCS11Error as exc:
            raise CANotReady(f"cannot open a session on token {token.label!r}: {type(exc).__name__}") from None
        finally:
            pin = None
        self._sessions[key] = session
        return session

    def generation(self, module_path: str) -> int:
        """How many times ``module_path`` has been re-initialised in this process."""
        return self._generations.get(module_path, 0)

    def reinitialize(self, module_path: str) -> None:
        """C_Finalize then C_Initialize the module: how a PKCS#11 application
        gets a token that went away (a network HSM restarted, a token
        directory restored) back. Every session of the module in this process
        ends with it, login included, so every signer on it must reopen:
        ``generation`` tells them."""
        self._check_thread()
        loaded = self._libraries.get(module_path)
        if loaded is None:
            return
        library = loaded[0]
        self._sessions = {key: session for key, session in self._sessions.items() if key[0] != module_path}
        self._generations[module_path] = self.generation(module_path) + 1
        try:
            library.finalize()
        except p11_errors.PKCS11Error:
            pass   # a device that failed may fail this too; the module is finalised for us all the same
        try:
            library.initialize()
        except p11_errors.PKCS11Error as exc:
            raise CANotReady(f"cannot re-initialise PKCS#11 module {module_path}: {type(exc).__name__}") from None
