"""Structured logs: JSON lines on stderr, one request id per RPC, secrets redacted.

    configure_logging("info")                 # once at start (idempotent)
    log = get_logger("fastca.frontend")
    with bind_request(new_request_id(), peer, "CreateCertificate"):
        log.info("issued", serial="4a3f…", batch=12)
    -> {"event": "issued", "serial": "4a3f…", "batch": 12, "request_id": "9f2c…",
        "peer": "ipv4:10.0.0.7:51234", "method": "CreateCertificate",
        "level": "info", "logger": "fastca.frontend", "timestamp": "2025-…Z"}

The redaction processor runs last before rendering, on every event (ours and
the standard library's): values under keys that name a secret (token,
authorization, pin, password, secret, private_key, key_pem, …) are replaced
by ``[REDACTED]``, and in any other string a bearer token, a JWT-shaped
value (three base64url segments) or a PEM private key block is masked.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime as dt
import itertools
import json
import logging
import random
import re
import sys
import threading
from typing import Any, Iterator, MutableMapping

import structlog

__all__ = ["configure_logging", "get_logger", "log_many", "new_request_id", "bind_request", "enter_request",
           "leave_request", "current_request_id", "redact", "REDACTED"]

REDACTED = "[REDACTED]"

# (request_id, peer, method) of the RPC being served, if any.
_request: contextvars.ContextVar[tuple[str, str, str] | None] = contextvars.ContextVar("fastca_request",
                                                                                       default=None)

# Key names: split into words (snake, kebab, dots, camelCase) and look for these.
_SECRET_WORDS = frozenset({"token", "tokens", "authorization", "bearer", "jwt", "pin", "pins", "password",
                           "passwords", "passwd", "passphrase", "secret", "secrets", "cookie", "apikey",
                           "privatekey", "keypem"})
_SECRET_PAIRS = frozenset({("private", "key"), ("key", "pem"), ("api", "key"), ("so", "pin"),
                           ("pin", "value")})
_WORD_SPLIT = re.compile(r"[^A-Za-z0-9]+|(?<=[a-z0-9])(?=[A-Z])")

_PEM_PRIVATE_KEY = re.compile(r"-----BEGIN ([A-Z0-9 ]*)PRIVATE KEY-----.*?(?:-----END \1PRIVATE KEY-----|\Z)",
                              re.DOTALL)
_BEARER = re.compile(r"(?i)\b(bearer)\s+[A-Za-z0-9\-._~+/]+=*")
_JWT = re.compile(r"\beyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*"
                  r"|\b[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}\b")
_KEY_CACHE: dict[str, bool] = {}


def _is_secret_key(key: str) -> bool:
    cached = _KEY_CACHE.get(key)
    if cached is not None:
        return cached
    words = [w.lower() for w in _WORD_SPLIT.split(key) if w]
    secret = (any(w in _SECRET_WORDS for w in words)
              or any(pair in _SECRET_PAIRS for pair in itertools.pairwise(words))
              or "privatekey" in key.lower().replace("_", "").replace("-", ""))
    if len(_KEY_CACHE) < 4096:
        _KEY_CACHE[key] = secret
    return secret


def _redact_text(text: str) -> str:
    if "PRIVATE KEY" in text:
        text = _PEM_PRIVATE_KEY.sub("[REDACTED PRIVATE KEY]", text)
    if "earer" in text or "EARER" in text:
        text = _BEARER.sub(lambda m: f"{m.group(1)} {REDACTED}", text)
    if text.count(".") >= 2:
        text = _JWT.sub(REDACTED, text)
    return text


def redact(value: Any, _depth: int = 0) -> Any:
    """``value`` with secrets masked: dict keys naming a secret, and secret-looking text."""
    if isinstance(value, str):
        return _redact_text(value)
    if _depth > 8:
        return value
    if isinstance(value, dict):
        return {k: (REDACTED if isinstance(k, str) and _is_secret_key(k) and v is not None
                    else redact(v, _depth + 1)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v, _depth + 1) for v in value)
    if isinstance(value, (bytes, bytearray)):
        return "[REDACTED PRIVATE KEY]" if b"PRIVATE KEY" in value else value
    return value


def _redact_processor(logger: Any, method: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key, value in list(event_dict.items()):
        if _is_secret_key(key) and value is not None:
            event_dict[key] = REDACTED
        elif isinstance(value, (str, dict, list, tuple, bytes, bytearray)):
            event_dict[key] = redact(value)
    return event_dict


_FIRST = ("timestamp", "level", "logger", "event", "request_id")


def _order(logger: Any, method: str, event_dict: MutableMapping[str, Any]) -> dict[str, Any]:
    ordered = {key: event_dict.pop(key) for key in _FIRST if key in event_dict}
    ordered.update(event_dict)
    return ordered


def _add_logger_name(logger: Any, method: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    name = event_dict.pop("_logger_name", None)
    if name is not None:
        event_dict.setdefault("logger", name)
    record = event_dict.get("_record")
    if record is not None:                                  # from the standard library
        event_dict.setdefault("logger", record.name)
    return event_dict


class _Stderr:
    """A structlog logger writing whole lines to the *current* sys.stderr
    (so pytest's capture and redirections see them)."""

    _lock = threading.Lock()

    def msg(self, message: str) -> None:
        with self._lock:
            stream = sys.stderr
            stream.write(message + "\n")
            stream.flush()

    def write_lines(self, lines: list[str]) -> None:
        with self._lock:
            stream = sys.stderr
            stream.write("\n".join(lines) + "\n")
            stream.flush()

    log = debug = info = warn = warning = error = critical = exception = fatal = msg


def _stderr_factory(*args: Any) -> _Stderr:
    return _Stderr()


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The standard library's records, through the same processors, to the current sys.stderr."""

    def __init__(self) -> None:
        super().__init__()

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


_configured_handler: logging.Handler | None = None
_config_lock = threading.Lock()
_configured: tuple[int, bool] | None = None    # (level, json) once configure_logging ran


def configure_logging(level: str = "info", json: bool = True) -> None:
    """Set up structlog and the standard library's root logger. Calling it
    again replaces the previous setup (no duplicate handlers)."""
    global _configured_handler, _configured
    numeric = logging.getLevelName(level.upper()) if isinstance(level, str) else int(level)
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}")
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        _merge_request,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _add_logger_name,
    ]
    renderer: Any = (structlog.processors.JSONRenderer(sort_keys=False) if json
                     else structlog.dev.ConsoleRenderer(colors=False))
    tail: list[Any] = [structlog.processors.StackInfoRenderer(), structlog.processors.format_exc_info,
                       _redact_processor, _order, renderer]
    with _config_lock:
        structlog.configure(
            processors=[*shared, *tail],
            wrapper_class=structlog.make_filtering_bound_logger(numeric),
            context_class=dict,
            logger_factory=_stderr_factory,
            cache_logger_on_first_use=False,
        )
        formatter = structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.ExtraAdder()],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *tail],
        )
        handler = _StderrHandler()
        handler.setFormatter(formatter)
        root = logging.getLogger()
        if _configured_handler is not None:
            root.removeHandler(_configured_handler)
        root.addHandler(handler)
        root.setLevel(numeric)
        # httpx logs every request at info: a line per TokenReview would
        # bury the CA's own events. Shown at debug.
        logging.getLogger("httpx").setLevel(numeric if numeric <= logging.DEBUG else logging.WARNING)
        _configured_handler = handler
        _configured = (numeric, json)


def get_logger(name: str) -> Any:
    """A structlog logger whose events carry ``logger=name``; safe to create
    at import time, before configure_logging."""
    # Lazy (follows later configure_logging calls). "logger" is structlog's
    # own keyword, so the name travels as _logger_name and is renamed.
    return structlog.get_logger(_logger_name=name)


def log_many(logger_name: str, level: str, event: str, entries: list[dict[str, Any]]) -> None:
    """Many events of one kind, such as a batch's "certificate issued" lines:
    each entry becomes one line, exactly as ``get_logger(logger_name).<level>(
    event, **entry)`` would print it (same keys, same order, same redaction),
    but they share one timestamp and one write. Per-certificate lines go
    through here so that logging them costs microseconds, not a structlog
    pipeline and a flush each."""
    if not entries:
        return
    configured = _configured
    numeric = logging.getLevelName(level.upper())
    if configured is None or not configured[1]:
        logger = get_logger(logger_name)
        for entry in entries:
            getattr(logger, level)(event, **entry)
        return
    if numeric < configured[0]:
        return
    timestamp = _timestamp_now()
    lines = []
    for entry in entries:
        event_dict: dict[str, Any] = {"timestamp": timestamp, "level": level, "logger": logger_name,
                                      "event": event, **entry}
        lines.append(_json_line(_order(None, level, _redact_processor(None, level, event_dict))))
    _Stderr().write_lines(lines)


def _timestamp_now() -> str:
    # structlog's TimeStamper(fmt="iso", utc=True) format.
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None).isoformat() + "Z"


def _json_line(event_dict: dict[str, Any]) -> str:
    return json.dumps(event_dict, default=repr)


def new_request_id() -> str:
    """A short random id (16 hex digits) for one RPC."""
    # Unique, not secret: it names a request in logs and the audit log. The
    # random module (reseeded in every forked child) saves a getrandom
    # system call per RPC.
    return f"{random.getrandbits(64):016x}"


def current_request_id() -> str | None:
    """The request id bound in this context, if any."""
    bound = _request.get()
    return bound[0] if bound is not None else None


@contextlib.contextmanager
def bind_request(request_id: str, peer: str, method: str) -> Iterator[str]:
    """Within the block, every log event carries request_id, peer and method
    (contextvars: per asyncio task and per thread)."""
    token = enter_request(request_id, peer, method)
    try:
        yield request_id
    finally:
        leave_request(token)


def enter_request(request_id: str, peer: str, method: str) -> contextvars.Token[tuple[str, str, str] | None]:
    """bind_request's two halves, for a caller that is itself a context
    manager on the hot path: ``token = enter_request(...)``, later
    ``leave_request(token)`` in the same context."""
    return _request.set((request_id, peer, method))


def leave_request(token: contextvars.Token[tuple[str, str, str] | None]) -> None:
    _request.reset(token)


def _merge_request(logger: Any, method: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    # One contextvar for the three request fields: binding them costs one
    # set and one reset per RPC, where structlog's bound_contextvars costs
    # a variable per key (this runs on every RPC of the hot path).
    bound = _request.get()
    if bound is not None:
        request_id, peer, rpc_method = bound
        event_dict.setdefault("request_id", request_id)
        event_dict.setdefault("peer", peer)
        event_dict.setdefault("method", rpc_method)
    return event_dict
