"""`fastca agent` settings: flags > environment > config file > defaults.

Istio's agent environment names are honoured as they are (CA_ADDR,
CA_ROOT_CA, TRUST_DOMAIN, POD_NAMESPACE, SERVICE_ACCOUNT, SECRET_TTL,
CLUSTER_ID, SECRET_GRACE_PERIOD_RATIO…), so an agent container's existing
environment configures fastca's agent unchanged; each key is also
``FASTCA_AGENT_<KEY>``.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from fastca.errors import ConfigurationError

__all__ = ["AgentConfig", "parse_duration"]

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(value: str | float) -> float:
    """Seconds from a number or a Go duration ("24h", "1h30m", "90s"), the
    form Istio's SECRET_TTL takes."""
    if isinstance(value, (int, float)):
        return float(value)
    text = value.strip()
    try:
        return float(text)
    except ValueError:
        pass
    position, total = 0, 0.0
    for match in _DURATION_PART.finditer(text):
        if match.start() != position:
            break
        total += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        position = match.end()
    if position != len(text) or not text:
        raise ValueError(f"{value!r} is not a duration like 24h, 90m or 3600s")
    return total


def _env(name: str, *istio: str) -> AliasChoices:
    return AliasChoices(name, f"FASTCA_AGENT_{name.upper()}", *istio)


class AgentConfig(BaseSettings):
    model_config = SettingsConfigDict(populate_by_name=True, extra="forbid", frozen=True)

    ca_addr: str = Field("istiod.istio-system.svc:15012", validation_alias=_env("ca_addr", "CA_ADDR"))
    ca_root: Path | None = Field(None, validation_alias=_env("ca_root", "CA_ROOT_CA"))
    # The name the CA's certificate must carry, when it is not the host part
    # of ca_addr (an agent dialling an IP address, or a tunnel's local port).
    ca_server_name: str | None = Field(None, validation_alias=_env("ca_server_name"))
    socket: Path = Field(Path("./var/run/secrets/workload-spiffe-uds/socket"), validation_alias=_env("socket"))
    trust_domain: str = Field("cluster.local", validation_alias=_env("trust_domain", "TRUST_DOMAIN"))
    namespace: str = Field("default", validation_alias=_env("namespace", "POD_NAMESPACE"))
    service_account: str = Field("default", validation_alias=_env("service_account", "SERVICE_ACCOUNT"))
    token_file: Path | None = Field(Path("./var/run/secrets/tokens/istio-token"),
                                    validation_alias=_env("token_file"))
    cluster_id: str = Field("Kubernetes", validation_alias=_env("cluster_id", "CLUSTER_ID"))
    cert_signer: str = Field("", validation_alias=_env("cert_signer"))
    client_cert: Path | None = Field(None, validation_alias=_env("client_cert"))    # VMs: PROV_CERT's cert-chain.pem
    client_key: Path | None = Field(None, validation_alias=_env("client_key"))
    ttl_seconds: float = Field(86400.0, gt=0, validation_alias=_env("ttl_seconds", "SECRET_TTL"))
    key_type: Literal["rsa-2048", "ec-p256", "ec-p384"] = Field("rsa-2048", validation_alias=_env("key_type"))
    rotation_ratio: float = Field(0.5, ge=0, le=1,
                                  validation_alias=_env("rotation_ratio", "SECRET_GRACE_PERIOD_RATIO"))
    rotation_jitter: float = Field(0.01, ge=0, le=0.5,
                                   validation_alias=_env("rotation_jitter", "SECRET_GRACE_PERIOD_RATIO_JITTER"))
    backoff_max_seconds: float = Field(60.0, gt=0, validation_alias=_env("backoff_max_seconds"))
    mounted_dir: Path | None = Field(None, validation_alias=_env("mounted_dir"))   # file-mounted mode
    output_dir: Path | None = Field(None, validation_alias=_env("output_dir", "OUTPUT_CERTS"))
    metrics_listen: str | None = Field("127.0.0.1:15020", validation_alias=_env("metrics_listen"))
    expiry_alert_seconds: float = Field(3600.0, ge=0, validation_alias=_env("expiry_alert_seconds"))
    health_check_interval_seconds: float = Field(30.0, gt=0, validation_alias=_env("health_check_interval_seconds"))
    # How long one check-and-read of a file-* resource (or of the mounted
    # directory's files) may take before the resource is marked unhealthy.
    file_read_timeout_seconds: float = Field(5.0, gt=0, validation_alias=_env("file_read_timeout_seconds"))
    # How often the root bundle is asked for between renewals (fastca's
    # TrustBundleService; a CA without it is asked once). 0: only renewals bring it.
    root_poll_seconds: float = Field(60.0, ge=0, validation_alias=_env("root_poll_seconds"))

    @field_validator("ttl_seconds", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> Any:
        return parse_duration(value) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _pairs(self) -> AgentConfig:
        if (self.client_cert is None) != (self.client_key is None):
            raise ValueError("client_cert and client_key go together")
        return self

    @property
    def spiffe_id(self) -> str:
        return f"spiffe://{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"

    @property
    def plaintext(self) -> bool:
        return self.ca_addr.endswith(":15010")

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                   file_secret_settings):
        # `load` merges file, environment and flags itself and passes the
        # result as init arguments, which therefore win.
        return (init_settings, env_settings)

    @classmethod
    def load(cls, config_file: Path | None = None, **flags: Any) -> AgentConfig:
        """file < environment < flags (a None flag is "not given")."""
        file_values: dict[str, Any] = {}
        if config_file is not None:
            try:
                file_values = tomllib.loads(config_file.read_text())
            except (OSError, tomllib.TOMLDecodeError) as exc:
                raise ConfigurationError(f"agent config {config_file}: {exc}") from None
        try:
            from_env = cls()
            env_values = {name: getattr(from_env, name) for name in from_env.model_fields_set}
            given = {name: value for name, value in flags.items() if value is not None}
            return cls(**{**file_values, **env_values, **given})
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            raise ConfigurationError(f"agent configuration: {problems}") from None
