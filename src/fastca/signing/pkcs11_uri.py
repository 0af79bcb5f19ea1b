"""RFC 7512 PKCS#11 URIs, with the PIN kept out of every printable form.

``pkcs11:token=fastca;object=ca-key;type=private?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:/state/pin``

Only the attributes fastca uses are given fields; others in the path are
kept (for round-tripping) but ignored. ``pin-value`` is accepted because the
RFC allows it, but ``str()``/``repr()`` never show it: a PIN in a URI that
reaches a log or a process listing is a PIN lost.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, unquote_to_bytes

from fastca.errors import ConfigurationError
from fastca.signing.secret_file import read_secret_file

__all__ = ["Pkcs11Uri"]

_PATH_ATTRS = {"token", "manufacturer", "serial", "model", "object", "type", "id",
               "library-manufacturer", "library-description", "library-version",
               "slot-id", "slot-description", "slot-manufacturer"}
_QUERY_ATTRS = {"pin-source", "pin-value", "module-name", "module-path"}
_OBJECT_TYPES = {"private", "public", "cert", "secret-key", "data"}
_MAX_PIN_FILE_BYTES = 1024
# RFC 7512 pchar minus the separators that would change the URI's structure.
_SAFE = "-._~:[]@!$'()*+,=&/"


def _pct_decode(text: str, name: str) -> bytes:
    try:
        return unquote_to_bytes(text)
    except ValueError as exc:  # pragma: no cover - unquote_to_bytes is lenient
        raise ConfigurationError(f"PKCS#11 URI attribute {name!r} is not valid percent-encoding") from exc


@dataclass(frozen=True)
class Pkcs11Uri:
    token: str | None = None
    object: str | None = None
    type: str | None = None
    id: bytes | None = None
    serial: str | None = None
    slot_id: int | None = None
    module_path: str | None = None
    module_name: str | None = None
    pin_source: str | None = None
    pin_value: str | None = field(default=None, repr=False)

    @classmethod
    def parse(cls, uri: str) -> Pkcs11Uri:
        if not uri.startswith("pkcs11:"):
            raise ConfigurationError("a PKCS#11 key URI must start with 'pkcs11:' (RFC 7512)")
        body = uri[len("pkcs11:"):]
        path, _, query = body.partition("?")
        values: dict[str, str] = {}
        for part, separator, allowed in ((path, ";", _PATH_ATTRS), (query, "&", _QUERY_ATTRS)):
            if not part:
                continue
            for item in part.split(separator):
                name, eq, raw = item.partition("=")
                if not eq or not name:
                    raise ConfigurationError(f"PKCS#11 URI component {name or item!r} has no '=value'")
                if name not in allowed:
                    if name.startswith("x-"):
                        continue  # vendor extensions are allowed and ignored
                    raise ConfigurationError(f"unknown PKCS#11 URI attribute {name!r}")
                if name in values:
                    raise ConfigurationError(f"PKCS#11 URI attribute {name!r} appears twice")
                values[name] = raw

        def text(name: str) -> str | None:
            if name not in values:
                return None
            try:
                return _pct_decode(values[name], name).decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ConfigurationError(f"PKCS#11 URI attribute {name!r} is not UTF-8") from exc

        obj_type = text("type")
        if obj_type is not None and obj_type not in _OBJECT_TYPES:
            raise ConfigurationError(f"PKCS#11 URI type must be one of {sorted(_OBJECT_TYPES)}")
        slot = text("slot-id")
        try:
            slot_id = int(slot) if slot is not None else None
        except ValueError as exc:
            raise ConfigurationError("PKCS#11 URI slot-id must be a decimal number") from exc
        return cls(
            token=text("token"),
            object=text("object"),
            type=obj_type,
            id=_pct_decode(values["id"], "id") if "id" in values else None,
            serial=text("serial"),
            slot_id=slot_id,
            module_path=text("module-path"),
            module_name=text("module-name"),
            pin_source=text("pin-source"),
            pin_value=text("pin-value"),
        )

    def to_string(self, *, include_pin_value: bool = False) -> str:
        path = []
        for name, value in (("token", self.token), ("serial", self.serial),
                            ("slot-id", None if self.slot_id is None else str(self.slot_id)),
                            ("object", self.object), ("type", self.type)):
            if value is not None:
                path.append(f"{name}={quote(value, safe=_SAFE.replace(';', ''))}")
        if self.id is not None:
            path.append("id=" + "".join(f"%{b:02x}" for b in self.id))
        query = []
        for name, value in (("module-path", self.module_path), ("module-name", self.module_name),
                            ("pin-source", self.pin_source)):
            if value is not None:
                query.append(f"{name}={quote(value, safe='/:._-')}")
        if self.pin_value is not None:
            query.append("pin-value=" + (quote(self.pin_value, safe="") if include_pin_value else "REDACTED"))
        return "pkcs11:" + ";".join(path) + ("?" + "&".join(query) if query else "")

    def __str__(self) -> str:
        return self.to_string()

    def with_object(self, label: str, obj_type: str | None = None) -> Pkcs11Uri:
        return Pkcs11Uri(**{**self.__dict__, "object": label, "type": obj_type or self.type})

    def pin_file(self) -> Path | None:
        """The file pin-source names (a file: URI or a path), if any."""
        if self.pin_value is not None or self.pin_source is None:
            return None
        source = self.pin_source
        if source.startswith("file:"):
            source = source[len("file:"):]
            if source.startswith("//"):
                source = source[2:]
        return Path(source)

    def read_pin(self) -> str | None:
        """The user PIN from pin-value or pin-source (a file: URI or a path)."""
        if self.pin_value is not None:
            return self.pin_value
        source = self.pin_file()
        if source is None:
            return None
        data = read_secret_file(source, "PKCS#11 PIN file", _MAX_PIN_FILE_BYTES)
        try:
            return data.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError:
            raise ConfigurationError(f"the PKCS#11 PIN file {source} is not UTF-8 text") from None

    def resolved_module_path(self, default: str | None = None) -> str:
        path = self.module_path or default or os.environ.get("FASTCA_PKCS11_MODULE")
        if not path:
            raise ConfigurationError(
                "no PKCS#11 module: add module-path=/path/to/module.so to the key URI "
                "or set FASTCA_PKCS11_MODULE")
        return path
