"""Authenticator plug-ins found through entry points, registered here
without installing anything: a ``*.dist-info`` on a temporary sys.path entry
is all importlib.metadata needs."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import pytest

from fastca.authn.config import AuthnConfig, build_authenticators
from fastca.authn.plugins import ENTRY_POINT_GROUP, available_plugins, load_plugin
from fastca.errors import AuthenticationFailed, ConfigurationError
from tests.authn._support import TRUST_DOMAIN, request

KEY = "k3y-for-the-build-robot"
ROBOT = "spiffe://cluster.local/ns/ci/sa/build-robot"
OPTIONS = {"keys": {hashlib.sha256(KEY.encode()).hexdigest(): ROBOT}}


@pytest.fixture
def registered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dist = tmp_path / "fastca_test_plugins-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fastca-test-plugins\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        f"[{ENTRY_POINT_GROUP}]\n"
        "apikey = tests.authn.apikey_plugin:factory\n"
        "not-an-authenticator = tests.authn.apikey_plugin:not_an_authenticator\n"
        "broken = tests.authn.apikey_plugin:broken_factory\n"
        "missing-module = tests.authn.no_such_module:factory\n")
    monkeypatch.syspath_prepend(str(tmp_path))


def test_entry_point_is_discovered_and_loaded(registered):
    assert {"apikey", "broken", "not-an-authenticator"} <= set(available_plugins())
    authenticator = load_plugin("apikey", OPTIONS, TRUST_DOMAIN)
    caller = asyncio.run(authenticator.authenticate(request(x_api_key=KEY)))
    assert caller.identities == (ROBOT,) and caller.credential_type == "apikey"
    with pytest.raises(AuthenticationFailed, match="unknown API key"):
        asyncio.run(authenticator.authenticate(request(x_api_key=KEY + "x")))
    assert asyncio.run(authenticator.authenticate(request())) is None


def test_enabled_by_name_in_config_and_placed_after_builtins(registered):
    config = AuthnConfig.model_validate({"plugins": [{"name": "apikey", "options": OPTIONS}]})
    assert "options" not in repr(config.plugins[0])
    chain = build_authenticators(config, trust_domain=TRUST_DOMAIN, roots=[])
    assert chain.names == ("mtls", "apikey")
    assert asyncio.run(chain.authenticate(request(x_api_key=KEY))).identities == (ROBOT,)
    with pytest.raises(AuthenticationFailed) as info:
        asyncio.run(chain.authenticate(request(x_api_key="wrong")))
    assert "apikey: unknown API key" in str(info.value)
    assert "wrong" not in str(info.value)

    first = AuthnConfig.model_validate({"plugins": [{"name": "apikey", "options": OPTIONS}],
                                        "order": ["apikey", "mtls"]})
    assert build_authenticators(first, trust_domain=TRUST_DOMAIN, roots=[]).names == ("apikey", "mtls")


@pytest.mark.parametrize("name,match", [("nope", "no authenticator plug-in"),
                                        ("not-an-authenticator", "did not return an Authenticator"),
                                        ("broken", "failed to load: RuntimeError"),
                                        ("missing-module", "failed to load: ModuleNotFoundError")])
def test_bad_plugins_are_configuration_errors(registered, name, match):
    with pytest.raises(ConfigurationError, match=match) as info:
        load_plugin(name, {"secret": "hunter2"}, TRUST_DOMAIN)
    assert "hunter2" not in str(info.value)


def test_plugin_validates_its_options(registered):
    with pytest.raises(ConfigurationError, match="options.keys"):
        load_plugin("apikey", {}, TRUST_DOMAIN)
