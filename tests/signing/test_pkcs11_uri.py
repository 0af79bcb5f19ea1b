import pytest

from fastca.errors import ConfigurationError
from fastca.signing.pkcs11_uri import Pkcs11Uri


def test_parses_rfc7512_path_and_query():
    uri = Pkcs11Uri.parse("pkcs11:token=My%20Token;object=ca-key;type=private;id=%01%02"
                          "?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:/etc/pin")
    assert uri.token == "My Token"
    assert uri.object == "ca-key"
    assert uri.type == "private"
    assert uri.id == b"\x01\x02"
    assert uri.module_path == "/usr/lib/softhsm/libsofthsm2.so"
    assert uri.pin_source == "file:/etc/pin"


def test_round_trips():
    text = "pkcs11:token=fastca;object=fastca-ca;type=private?module-path=/m.so&pin-source=file:/p"
    assert str(Pkcs11Uri.parse(text)) == text
    assert Pkcs11Uri.parse(str(Pkcs11Uri.parse(text))) == Pkcs11Uri.parse(text)


def test_pin_value_never_printed():
    uri = Pkcs11Uri.parse("pkcs11:token=t;object=k?pin-value=s3cr3t-PIN")
    assert uri.read_pin() == "s3cr3t-PIN"
    for text in (str(uri), repr(uri), uri.to_string(), f"{uri}"):
        assert "s3cr3t-PIN" not in text
    assert "pin-value=REDACTED" in str(uri)
    assert "s3cr3t-PIN" in uri.to_string(include_pin_value=True)


def test_pin_from_file(tmp_path):
    (tmp_path / "pin").write_text("1234\n")
    (tmp_path / "pin").chmod(0o600)
    assert Pkcs11Uri.parse(f"pkcs11:token=t?pin-source=file:{tmp_path / 'pin'}").read_pin() == "1234"
    assert Pkcs11Uri.parse(f"pkcs11:token=t?pin-source={tmp_path / 'pin'}").read_pin() == "1234"


@pytest.mark.parametrize("mode", [0o604, 0o640, 0o620, 0o666])
def test_pin_file_others_may_access_is_refused_with_the_fix(tmp_path, mode):
    pin = tmp_path / "pin"
    pin.write_text("s3cr3t-PIN\n")
    pin.chmod(mode)
    with pytest.raises(ConfigurationError) as refused:
        Pkcs11Uri.parse(f"pkcs11:token=t?pin-source=file:{pin}").read_pin()
    assert str(pin) in str(refused.value) and f"chmod 600 {pin}" in str(refused.value)
    assert "s3cr3t-PIN" not in str(refused.value)


def test_missing_pin_file_error_names_path_not_contents(tmp_path):
    with pytest.raises(ConfigurationError, match="cannot read the PKCS#11 PIN file"):
        Pkcs11Uri.parse(f"pkcs11:token=t?pin-source=file:{tmp_path / 'absent'}").read_pin()


@pytest.mark.parametrize("bad", [
    "token=t", "pkcs11:token", "pkcs11:tokn=t", "pkcs11:token=a;token=b", "pkcs11:type=bogus",
    "pkcs11:token=t?module-pth=/x", "pkcs11:slot-id=abc",
])
def test_rejects_malformed(bad):
    with pytest.raises(ConfigurationError):
        Pkcs11Uri.parse(bad)


def test_vendor_attributes_ignored():
    assert Pkcs11Uri.parse("pkcs11:token=t;x-vendor=1").token == "t"
