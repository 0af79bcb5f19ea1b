"""The [authn] configuration: TOML, environment, validation, what is built."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from pydantic import ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from fastca.authn import __all__ as public_names
from fastca.authn.config import AuthnConfig, build_authenticators

EXAMPLE = """
[authn]
mtls = true
order = ["mtls", "oidc", "tokenreview", "xfcc"]

[[authn.tokenreview]]
cluster_id = "Kubernetes"
api_server = "https://kubernetes.default.svc"
ca_file = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"
token_file = "/var/run/secrets/kubernetes.io/serviceaccount/token"
audiences = ["istio-ca"]

[authn.tokenreview_cache]
size = 10000
ttl_seconds = 30

[[authn.oidc]]
issuer = "https://container.googleapis.com/v1/projects/p/locations/l/clusters/c"
jwks_uri = "https://container.googleapis.com/v1/projects/p/locations/l/clusters/c/jwks"
audiences = ["istio-ca"]
algorithms = ["RS256"]

[authn.xfcc]
trusted_cidrs = ["10.0.0.0/8", "fd00::/8"]

[[authn.plugins]]
name = "apikey"
options = { keys = { "5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8" = "spiffe://cluster.local/ns/ci/sa/robot" } }

[authn.node_authorizer]
trusted_node_accounts = ["istio-system/ztunnel"]
pod_source = "kubernetes"
kubernetes_cluster = "Kubernetes"
"""


class Settings(BaseSettings):
    """How the lead embeds the section."""
    model_config = SettingsConfigDict(env_prefix="FASTCA_", env_nested_delimiter="__", extra="forbid")
    authn: AuthnConfig = AuthnConfig()


def test_toml_example_loads():
    config = Settings(**tomllib.loads(EXAMPLE)).authn
    assert config.tokenreview[0].cluster_id == "Kubernetes"
    assert [str(n) for n in config.xfcc.trusted_cidrs] == ["10.0.0.0/8", "fd00::/8"]
    assert config.oidc[0].algorithms == ["RS256"]
    assert config.node_authorizer.trusted_node_accounts == ["istio-system/ztunnel"]
    assert "5e884898" not in repr(config)          # plug-in options stay out of reprs


def test_environment_sets_nested_keys(monkeypatch):
    monkeypatch.setenv("FASTCA_AUTHN__MTLS", "false")
    monkeypatch.setenv("FASTCA_AUTHN__XFCC__TRUSTED_CIDRS", '["192.168.0.0/16"]')
    monkeypatch.setenv("FASTCA_AUTHN__TOKENREVIEW_CACHE__TTL_SECONDS", "5")
    config = Settings().authn
    assert config.mtls is False
    assert [str(n) for n in config.xfcc.trusted_cidrs] == ["192.168.0.0/16"]
    assert config.tokenreview_cache.ttl_seconds == 5


def test_defaults():
    config = AuthnConfig()
    assert config.order == ["mtls", "oidc", "tokenreview", "xfcc"]
    assert config.xfcc.trusted_cidrs == []                      # nobody's XFCC is believed
    assert config.node_authorizer.trusted_node_accounts == []   # nobody may impersonate
    chain = build_authenticators(config, trust_domain="cluster.local", roots=[])
    assert chain.names == ("mtls",)
    in_cluster = AuthnConfig.model_validate({"tokenreview": [{}]}).tokenreview[0]
    assert in_cluster.bearer_token_file == "/var/run/secrets/kubernetes.io/serviceaccount/token"
    assert in_cluster.audiences == ["istio-ca"]


@pytest.mark.parametrize("bad", [
    {"oidc": [{"issuer": "https://i"}]},                                             # no JWKS
    {"oidc": [{"issuer": "https://i", "jwks_uri": "https://i/k", "jwks_file": "k"}]},
    {"oidc": [{"issuer": "https://i", "jwks_uri": "http://i/keys"}]},               # not HTTPS
    {"oidc": [{"issuer": "https://i", "jwks_file": "k", "algorithms": ["HS256"]}]},
    {"oidc": [{"issuer": "https://i", "jwks_file": "k", "audiences": []}]},
    {"tokenreview": [{"api_server": "http://kube:8080"}]},
    {"tokenreview": [{"client_cert_file": "c.pem"}]},                               # key missing
    {"tokenreview": [{"token_file": "t", "client_cert_file": "c", "client_key_file": "k"}]},
    {"tokenreview": [{}, {}]},                                                      # duplicate cluster ids
    {"xfcc": {"trusted_cidrs": ["not-a-network"]}},
    {"order": ["mtls", "kerberos"]},
    {"order": ["mtls", "mtls"]},
    {"plugins": [{"name": "mtls"}]},
    {"plugins": [{"name": "x"}, {"name": "x"}]},
    {"node_authorizer": {"trusted_node_accounts": ["istio-system/ztunnel"]}},        # no pod source
    {"node_authorizer": {"trusted_node_accounts": ["ztunnel"], "pod_source": "static", "static_file": "p"}},
    {"node_authorizer": {"trusted_node_accounts": ["a/b"], "pod_source": "static"}},
    {"node_authorizer": {"trusted_node_accounts": ["a/b"], "pod_source": "kubernetes"}},   # no cluster
    {"unknown_key": 1},
])
def test_invalid_configuration_is_refused(bad):
    with pytest.raises(ValidationError):
        AuthnConfig.model_validate(bad)


def test_relative_paths_resolve_against_base_dir(tmp_path: Path):
    config = AuthnConfig.model_validate({"tokenreview": [{"api_server": "https://k", "ca_file": "ca.pem",
                                                          "token_file": "tok"}],
                                         "oidc": [{"issuer": "https://i", "jwks_file": "jwks.json"}]})
    chain = build_authenticators(config, trust_domain="cluster.local", roots=[], base_dir=tmp_path)
    by_name = {a.name: a for a in chain.authenticators}
    assert by_name["oidc"].provider.jwks_file == str(tmp_path / "jwks.json")
    api = next(iter(by_name["tokenreview"]._apis.values()))
    assert api.cluster.ca_file == str(tmp_path / "ca.pem") and api.cluster.token_file == str(tmp_path / "tok")


def test_public_names_exist():
    from fastca import authn
    assert all(hasattr(authn, name) for name in public_names)
