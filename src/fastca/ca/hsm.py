"""Key management inside a PKCS#11 token: generate, import, find, list.

All of it runs on the process's PKCS#11 thread (Pkcs11Context).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from pkcs11 import Attribute, KeyType, ObjectClass
from pkcs11 import exceptions as p11_errors
from pkcs11.util.ec import encode_named_curve_parameters

from fastca.errors import ConfigurationError
from fastca.signing.pkcs11 import public_key_from_token
from fastca.signing.pkcs11_context import Pkcs11Context
from fastca.signing.pkcs11_uri import Pkcs11Uri

__all__ = ["KEY_TYPES", "generate_key", "import_private_key", "key_exists", "list_tokens", "TokenListing"]

# key type name -> (PKCS#11 key type, size or curve)
KEY_TYPES: dict[str, tuple[KeyType, Any]] = {
    "ec-p256": (KeyType.EC, "secp256r1"),
    "ec-p384": (KeyType.EC, "secp384r1"),
    "rsa-2048": (KeyType.RSA, 2048),
    "rsa-3072": (KeyType.RSA, 3072),
}

# A CA key is generated or imported so that it can sign and nothing else,
# and so that it can never leave the token.
_PRIVATE_TEMPLATE = {
    Attribute.TOKEN: True,
    Attribute.PRIVATE: True,
    Attribute.SENSITIVE: True,
    Attribute.EXTRACTABLE: False,
    Attribute.SIGN: True,
    Attribute.DECRYPT: False,
    Attribute.UNWRAP: False,
    Attribute.DERIVE: False,
}
_PUBLIC_TEMPLATE = {
    Attribute.TOKEN: True,
    Attribute.VERIFY: True,
    Attribute.ENCRYPT: False,
    Attribute.WRAP: False,
}


def _object_template(uri: Pkcs11Uri, key_id: bytes) -> dict[Attribute, Any]:
    if uri.object is None:
        raise ConfigurationError(f"the key URI {uri} needs object=<label> to create a key")
    return {Attribute.LABEL: uri.object, Attribute.ID: uri.id or key_id}


def key_exists(uri: Pkcs11Uri, softhsm_conf: str | None = None) -> bool:
    context = Pkcs11Context.for_this_process()

    def on_thread() -> bool:
        session = context.session(uri, softhsm_conf)
        template: dict[Attribute, Any] = {Attribute.CLASS: ObjectClass.PRIVATE_KEY}
        if uri.object is not None:
            template[Attribute.LABEL] = uri.object
        if uri.id is not None:
            template[Attribute.ID] = uri.id
        return any(True for _ in session.get_objects(template))

    return context.run(on_thread)


def generate_key(uri: Pkcs11Uri, key_type: str, softhsm_conf: str | None = None
                 ) -> ec.EllipticCurvePublicKey | rsa.RSAPublicKey:
    """Generate a non-extractable, sensitive signing key pair in the token."""
    if key_type not in KEY_TYPES:
        raise ConfigurationError(f"unknown key type {key_type!r}; choose one of {', '.join(KEY_TYPES)}")
    p11_type, size = KEY_TYPES[key_type]
    context = Pkcs11Context.for_this_process()

    def on_thread() -> Any:
        session = context.session(uri, softhsm_conf)
        common = _object_template(uri, os.urandom(16))
        private = {**_PRIVATE_TEMPLATE, **common}
        public = {**_PUBLIC_TEMPLATE, **common}
        try:
            if p11_type == KeyType.EC:
                params = session.create_domain_parameters(
                    KeyType.EC, {Attribute.EC_PARAMS: encode_named_curve_parameters(size)}, local=True)
                public_key, _ = params.generate_keypair(
                    store=True, private_template=private, public_template=public)
            else:
                public_key, _ = session.generate_keypair(
                    KeyType.RSA, size, store=True, private_template=private, public_template=public)
        except p11_errors.PKCS11Error as exc:
            raise ConfigurationError(f"the token refused to generate a {key_type} key: {type(exc).__name__}") from None
        return public_key_from_token(public_key)

    return context.run(on_thread)


def _int_bytes(value: int) -> bytes:
    return value.to_bytes((value.bit_length() + 7) // 8 or 1, "big")


def import_private_key(uri: Pkcs11Uri, private_key: Any, softhsm_conf: str | None = None) -> None:
    """Store a software key (an Istio ``ca-key.pem``) in the token as a
    sensitive, non-extractable key, with its public half beside it."""
    if isinstance(private_key, rsa.RSAPrivateKey):
        numbers = private_key.private_numbers()
        pub = numbers.public_numbers
        private_attrs = {
            Attribute.KEY_TYPE: KeyType.RSA,
            Attribute.MODULUS: _int_bytes(pub.n), Attribute.PUBLIC_EXPONENT: _int_bytes(pub.e),
            Attribute.PRIVATE_EXPONENT: _int_bytes(numbers.d),
            Attribute.PRIME_1: _int_bytes(numbers.p), Attribute.PRIME_2: _int_bytes(numbers.q),
            Attribute.EXPONENT_1: _int_bytes(numbers.dmp1), Attribute.EXPONENT_2: _int_bytes(numbers.dmq1),
            Attribute.COEFFICIENT: _int_bytes(numbers.iqmp),
        }
        public_attrs = {Attribute.KEY_TYPE: KeyType.RSA, Attribute.MODULUS: _int_bytes(pub.n),
                        Attribute.PUBLIC_EXPONENT: _int_bytes(pub.e)}
    elif isinstance(private_key, ec.EllipticCurvePrivateKey):
        curve = private_key.curve.name
        if curve not in ("secp256r1", "secp384r1"):
            raise ConfigurationError(f"CA key curve {curve} is not supported (P-256, P-384)")
        params = encode_named_curve_parameters(curve)
        size = (private_key.curve.key_size + 7) // 8
        point = private_key.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
        # CKA_EC_POINT is the DER OCTET STRING around the point.
        ec_point = bytes([0x04, len(point)]) + point
        private_attrs = {Attribute.KEY_TYPE: KeyType.EC, Attribute.EC_PARAMS: params,
                         Attribute.VALUE: private_key.private_numbers().private_value.to_bytes(size, "big")}
        public_attrs = {Attribute.KEY_TYPE: KeyType.EC, Attribute.EC_PARAMS: params, Attribute.EC_POINT: ec_point}
    else:
        raise ConfigurationError("only RSA and EC CA keys can be imported")

    context = Pkcs11Context.for_this_process()

    def on_thread() -> None:
        session = context.session(uri, softhsm_conf)
        common = _object_template(uri, os.urandom(16))
        try:
            session.create_object({Attribute.CLASS: ObjectClass.PRIVATE_KEY, **_PRIVATE_TEMPLATE,
                                   **private_attrs, **common})
            session.create_object({Attribute.CLASS: ObjectClass.PUBLIC_KEY, **_PUBLIC_TEMPLATE,
                                   **public_attrs, **common})
        except p11_errors.PKCS11Error as exc:
            raise ConfigurationError(f"the token refused the imported key: {type(exc).__name__}") from None

    context.run(on_thread)


@dataclass(frozen=True)
class TokenListing:
    token_uri: str
    label: str
    manufacturer: str
    model: str
    serial: str
    objects: list[dict[str, str]]


def list_tokens(module_path: str, softhsm_conf: str | None = None, pin_uri: Pkcs11Uri | None = None
                ) -> list[TokenListing]:
    """Tokens of a module and, where a PIN is known for the token, the keys
    in it, each as a PKCS#11 URI. Without a PIN only public objects show."""
    context = Pkcs11Context.for_this_process()

    def on_thread() -> list[TokenListing]:
        library = context.library(module_path, softhsm_conf)
        listings = []
        for slot in library.get_slots(token_present=True):
            token = slot.get_token()
            if not token.label:
                continue  # SoftHSM's spare uninitialised slot
            serial = token.serial.decode(errors="replace").strip() if isinstance(token.serial, bytes) else str(token.serial)
            base = Pkcs11Uri(token=token.label, serial=serial or None, module_path=module_path)
            objects: list[dict[str, str]] = []
            if pin_uri is not None and pin_uri.token == token.label:
                session = context.session(pin_uri, softhsm_conf)
            else:
                try:
                    session = token.open()
                except p11_errors.PKCS11Error:
                    session = None
            if session is not None:
                for object_class, type_name in ((ObjectClass.PRIVATE_KEY, "private"),
                                                (ObjectClass.PUBLIC_KEY, "public"),
                                                (ObjectClass.CERTIFICATE, "cert")):
                    for obj in session.get_objects({Attribute.CLASS: object_class}):
                        label = obj[Attribute.LABEL]
                        entry = {"uri": str(Pkcs11Uri(token=token.label, object=label, type=type_name,
                                                      module_path=module_path)),
                                 "label": label, "type": type_name}
                        try:
                            entry["key_type"] = KeyType(obj[Attribute.KEY_TYPE]).name
                        except (p11_errors.PKCS11Error, ValueError, KeyError):
                            pass
                        objects.append(entry)
            listings.append(TokenListing(str(base), token.label, token.manufacturer_id,
                                         token.model, serial, objects))
        return listings

    return context.run(on_thread)
