import pytest

from fastca.agent.config import AgentConfig, parse_duration
from fastca.errors import ConfigurationError


@pytest.mark.parametrize("text,seconds", [("24h", 86400), ("1h30m", 5400), ("90s", 90), ("24h0m0s", 86400),
                                          ("1.5h", 5400), ("500ms", 0.5), ("3600", 3600)])
def test_go_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "h", "24x", "1h garbage", "-5m"])
def test_bad_durations(text):
    with pytest.raises(ValueError):
        parse_duration(text)


def test_istio_environment_names(monkeypatch):
    for name, value in {"CA_ADDR": "ca.example:15012", "CA_ROOT_CA": "/etc/root.pem", "TRUST_DOMAIN": "corp.example",
                        "POD_NAMESPACE": "shop", "SERVICE_ACCOUNT": "cart", "SECRET_TTL": "12h",
                        "CLUSTER_ID": "east", "SECRET_GRACE_PERIOD_RATIO": "0.4"}.items():
        monkeypatch.setenv(name, value)
    config = AgentConfig.load()
    assert config.ca_addr == "ca.example:15012" and str(config.ca_root) == "/etc/root.pem"
    assert config.spiffe_id == "spiffe://corp.example/ns/shop/sa/cart"
    assert config.ttl_seconds == 43200 and config.cluster_id == "east" and config.rotation_ratio == 0.4


def test_file_then_environment_then_flags(monkeypatch, tmp_path):
    config_file = tmp_path / "agent.toml"
    config_file.write_text('namespace = "from-file"\nservice_account = "from-file"\nkey_type = "ec-p256"\n'
                           'ca_addr = "file:15012"\n')
    monkeypatch.setenv("FASTCA_AGENT_SERVICE_ACCOUNT", "from-env")
    monkeypatch.setenv("CA_ADDR", "env:15012")
    config = AgentConfig.load(config_file, ca_addr="flag:15012", namespace=None)
    assert (config.namespace, config.service_account, config.key_type, config.ca_addr) == \
        ("from-file", "from-env", "ec-p256", "flag:15012")


def test_plaintext_port_and_bad_values(monkeypatch):
    assert AgentConfig.load(ca_addr="istiod:15010").plaintext is True
    assert AgentConfig.load(ca_addr="istiod:15012").plaintext is False
    with pytest.raises(ConfigurationError, match="ttl_seconds"):
        AgentConfig.load(ttl_seconds="forever")
    with pytest.raises(ConfigurationError, match="client_cert"):
        AgentConfig.load(client_cert="/tmp/cert.pem")


def test_tls_without_a_root_is_a_clear_error(tmp_path):
    from fastca.agent.main import Agent

    with pytest.raises(ConfigurationError, match="--ca-root"):
        Agent(AgentConfig.load(ca_addr="ca:15012", socket=tmp_path / "s"))
