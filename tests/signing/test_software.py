import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from fastca.errors import ConfigurationError
from fastca.signing.base import Signer, signature_algorithm_for
from fastca.signing.software import SoftwareSigner


@pytest.mark.parametrize("key,hash_cls", [
    (ec.generate_private_key(ec.SECP256R1()), hashes.SHA256),
    (ec.generate_private_key(ec.SECP384R1()), hashes.SHA384),
    (rsa.generate_private_key(65537, 2048), hashes.SHA256),
])
def test_signatures_verify(key, hash_cls):
    signer = SoftwareSigner(key)
    assert isinstance(signer, Signer)
    data = [b"tbs-%d" % i for i in range(5)]
    for item, signature in zip(data, signer.sign_many(data)):
        if isinstance(key, ec.EllipticCurvePrivateKey):
            key.public_key().verify(signature, item, ec.ECDSA(hash_cls()))
        else:
            key.public_key().verify(signature, item, padding.PKCS1v15(), hash_cls())


def test_algorithm_identifiers():
    assert signature_algorithm_for(ec.generate_private_key(ec.SECP256R1()).public_key())[0].hex() \
        == "300a06082a8648ce3d040302"
    assert signature_algorithm_for(rsa.generate_private_key(65537, 2048).public_key())[0].hex() \
        == "300d06092a864886f70d01010b0500"
    with pytest.raises(ConfigurationError):
        signature_algorithm_for(ec.generate_private_key(ec.SECP521R1()).public_key())


def test_repr_shows_no_key_material():
    key = ec.generate_private_key(ec.SECP256R1())
    text = repr(SoftwareSigner(key))
    assert str(key.private_numbers().private_value) not in text
    assert "SoftwareSigner" in text


def test_key_file_readable_by_others_is_refused(tmp_path):
    from cryptography.hazmat.primitives import serialization


    key = ec.generate_private_key(ec.SECP256R1())
    path = tmp_path / "ca-key.pem"
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o644)
    with pytest.raises(ConfigurationError, match=r"mode 0644.*chmod 600"):
        SoftwareSigner.from_pem_file(str(path))
    path.chmod(0o600)
    assert SoftwareSigner.from_pem_file(str(path)).public_key.public_numbers() == key.public_key().public_numbers()
