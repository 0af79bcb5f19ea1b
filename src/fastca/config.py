"""The CA's configuration: ``fastca.toml`` in the state directory, every key
also settable from the environment as ``FASTCA_<SECTION>__<KEY>`` (for
example ``FASTCA_ISSUANCE__MAX_TTL_SECONDS=3600``); the environment wins.

Only lifecycle keys are written by ``fastca init``; everything else has a
default here, and a key a user adds to the file survives later ``init``
steps that rewrite the lifecycle keys.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from pathlib import Path
from typing import Any, Literal

import tomli_w
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from fastca.audit.config import AuditConfig
from fastca.authn.config import AuthnConfig
from fastca.errors import ConfigurationError
from fastca.monitoring.config import MonitoringConfig
from fastca.trust.config import TrustConfig

__all__ = ["CONFIG_FILE", "CAConfig", "write_lifecycle", "resolve_path", "SignerConfig", "IssuanceConfig", "ServerConfig", "PolicyConfig", "RateLimitConfig",
           "TimeWindowRule", "SourceNetworkRule", "NamedSignerConfig"]


CONFIG_FILE = "fastca.toml"     # in the state directory (fastca.ca.state has the rest of its layout)


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class SignerConfig(_Section):
    backend: Literal["pkcs11", "software"] = "pkcs11"
    key_uri: str | None = None          # RFC 7512 URI; pin-source=file: (never pin-value) preferred
    softhsm_conf: str | None = None     # the embedded SoftHSM token's configuration, relative to the state dir
    key_file: str | None = None         # software backend: PEM private key, relative to the state dir
    key_type: str | None = None         # informational: what `fastca init` generated

    @field_validator("key_uri")
    @classmethod
    def _no_pin_in_configuration(cls, value: str | None) -> str | None:
        # The value is not echoed: it holds the PIN.
        if value is not None and "pin-value=" in value.partition("?")[2]:
            raise ValueError("the key URI carries pin-value=; a PIN is never kept in the configuration: "
                             "put it in a file only you can read (chmod 600) and reference it with "
                             "pin-source=file:/path/to/pin")
        return value


class IssuanceConfig(_Section):
    default_ttl_seconds: int = Field(86400, gt=0)
    max_ttl_seconds: int = Field(90 * 86400, gt=0)
    over_max_ttl: Literal["reject", "clamp"] = "reject"   # istiod rejects; istio-csr clamps
    backdate_seconds: int = Field(120, ge=0)
    istio_key_usage: bool = False       # True: digitalSignature+keyEncipherment on EC leaves too, like istiod

    @model_validator(mode="after")
    def _default_within_max(self) -> IssuanceConfig:
        if self.default_ttl_seconds > self.max_ttl_seconds:
            raise ValueError(f"default_ttl_seconds ({self.default_ttl_seconds}) is above max_ttl_seconds "
                             f"({self.max_ttl_seconds}): every request without a TTL would be refused")
        return self


class ServerConfig(_Section):
    # The main port requests a client certificate and verifies it if one is
    # offered (as istiod's 15012 does), so VMs with PROV_CERT and sidecars
    # with tokens share it.
    listen: str = "127.0.0.1:15012"
    # An extra port that *requires* a client certificate, for deployments that
    # want token callers kept off it. None: no such port.
    mtls_listen: str | None = None
    plaintext: bool = False             # Istio's :15010 case; no TLS at all
    metrics_listen: str | None = "127.0.0.1:15014"
    serving_dns_names: list[str] = ["localhost", "istiod.istio-system.svc"]
    # IP SANs of the serving certificate beyond the IP addresses the server
    # listens on (which it always carries): for agents that dial an address
    # of a wildcard listener (0.0.0.0, ::), which names no address itself.
    serving_ip_addresses: list[str] = []
    serving_cert_ttl_seconds: int = Field(86400, gt=60)
    max_receive_message_bytes: int = Field(256 * 1024, gt=1024)
    batch_max: int = Field(64, ge=1, le=4096)
    # A window of a few ms pays for itself under load (bigger batches, fewer
    # hops), and flushing whenever no batch is in flight would give it up
    # (batches of one); only a quiet server (recent batches of one) skips it.
    # bench/RESULTS.md has the comparisons.
    batch_delay_us: int = Field(2000, ge=0)
    queue_limit: int = Field(4096, ge=1)
    # Calls a worker holds at once, across its connections: past it a new
    # call is answered RESOURCE_EXHAUSTED as soon as its headers are in.
    max_concurrent_rpcs: int = Field(1024, ge=1)
    # HTTP/2 per connection: streams open at once (refused beyond), and the
    # request headers of one call, names and values (INVALID_ARGUMENT beyond).
    max_concurrent_streams: int = Field(100, ge=1, le=10_000)
    max_metadata_bytes: int = Field(16 * 1024, ge=1024, le=1024 * 1024)
    # Each request header (gRPC metadata entry): its name and its value,
    # checked as the header arrives, before anything reads it
    # (INVALID_ARGUMENT beyond; the name is never echoed).
    max_metadata_key_bytes: int = Field(256, ge=16, le=16 * 1024)
    max_metadata_value_bytes: int = Field(8 * 1024, ge=256, le=1024 * 1024)
    # Elements of one bulk call (fastca.v1.BulkCertificateService); more is INVALID_ARGUMENT.
    max_bulk_requests: int = Field(100, ge=1, le=10_000)
    handshake_timeout_seconds: float = Field(10.0, gt=0)        # TLS handshake, from accept
    idle_timeout_seconds: float = Field(300.0, ge=0)            # no call for this long: GOAWAY (0: never)
    max_unauthenticated_calls: int = Field(256, ge=1)           # refused authentications, then the connection goes
    shutdown_grace_seconds: float = Field(10.0, ge=0)
    workers: int = Field(0, ge=0, le=64)   # server processes sharing the port; 0: one per CPU
    # How often each server looks at its state directory for a CA rotation's
    # next phase (fastca.ca.rotation allows a margin of a minute for it).
    ca_watch_seconds: float = Field(5.0, gt=0, le=30)

    def worker_count(self) -> int:
        """``workers``, or the CPUs this process may run on."""
        if self.workers:
            return self.workers
        try:
            return max(1, min(64, len(os.sched_getaffinity(0))))
        except AttributeError:      # not Linux
            return max(1, min(64, os.cpu_count() or 1))


    @field_validator("serving_ip_addresses")
    @classmethod
    def _ip_literals(cls, values: list[str]) -> list[str]:
        for value in values:
            ipaddress.ip_address(value)
        return values

    def listen_ip_addresses(self) -> list[str]:
        """The IP literals of the listen addresses, wildcards excepted, then
        serving_ip_addresses: the serving certificate's IP SANs."""
        out: list[str] = []
        for address in (self.listen, self.mtls_listen):
            if not address:
                continue
            host = address.rpartition(":")[0].strip("[]")
            try:
                ip = ipaddress.ip_address(host)
            except ValueError:
                continue            # a host name: covered by serving_dns_names
            if not ip.is_unspecified and str(ip) not in out:
                out.append(str(ip))
        for value in self.serving_ip_addresses:
            if str(ipaddress.ip_address(value)) not in out:
                out.append(str(ipaddress.ip_address(value)))
        return out


class RateLimitConfig(_Section):
    # Certificates per identity: a sustained rate and a burst. An Istio agent
    # renews once per half TTL (every 12 h by default), so 1/s with a burst
    # of 20 never touches a legitimate workload and bounds a stolen token.
    # 0: no limit.
    per_identity_per_second: float | None = Field(1.0, ge=0)
    burst: int = Field(20, ge=1)
    max_tracked_identities: int = Field(100_000, ge=1)


class TimeWindowRule(_Section):
    """Identities matching ``identities`` (fnmatch patterns) may obtain
    certificates only between ``start`` and ``end`` (UTC, HH:MM)."""

    identities: list[str]
    start: str
    end: str

    @field_validator("start", "end")
    @classmethod
    def _clock(cls, value: str) -> str:
        hours, _, minutes = value.partition(":")
        if not (hours.isdigit() and minutes.isdigit() and 0 <= int(hours) < 24 and 0 <= int(minutes) < 60):
            raise ValueError(f"{value!r} is not HH:MM")
        return value


class SourceNetworkRule(_Section):
    """Identities matching ``identities`` may call only from ``cidrs``."""

    identities: list[str]
    cidrs: list[str]

    @field_validator("cidrs")
    @classmethod
    def _networks(cls, values: list[str]) -> list[str]:
        for value in values:
            ipaddress.ip_network(value, strict=False)
        return values


class PolicyConfig(_Section):
    strict_csr: bool = False            # CSR URI SANs must equal the caller's identity (istio-csr's rule)
    rate_limit: RateLimitConfig = RateLimitConfig()
    time_windows: list[TimeWindowRule] = []
    source_networks: list[SourceNetworkRule] = []


class NamedSignerConfig(_Section):
    """Another CA (its own state directory) that callers select with the
    ``CertSigner`` metadata key."""

    state_dir: str


class CAConfig(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FASTCA_", env_nested_delimiter="__", frozen=True,
                                      extra="forbid")

    trust_domain: str = "cluster.local"
    signer: SignerConfig = SignerConfig()
    issuance: IssuanceConfig = IssuanceConfig()
    pending_csr: str | None = None      # set between `init --csr-out` and `init --install-cert`
    server: ServerConfig = ServerConfig()
    policy: PolicyConfig = PolicyConfig()
    audit: AuditConfig = AuditConfig()
    authn: AuthnConfig = AuthnConfig()
    trust: TrustConfig = TrustConfig()
    monitoring: MonitoringConfig = MonitoringConfig()
    signers: dict[str, NamedSignerConfig] = {}

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                   file_secret_settings):
        # The file's values arrive as init arguments; the environment overrides them.
        return (env_settings, init_settings)

    @classmethod
    def load(cls, state_dir: Path) -> CAConfig:
        path = state_dir / CONFIG_FILE
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigurationError(f"no CA in {state_dir}: run `fastca init --state {state_dir}` first") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigurationError(f"{path} is not valid TOML: {exc}") from None
        return cls.from_mapping(data, source=str(path))

    @classmethod
    def from_mapping(cls, data: dict[str, Any], source: str = "configuration") -> CAConfig:
        try:
            return cls(**data)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            raise ConfigurationError(f"{source}: {problems}") from None

    def path(self, state_dir: Path, name: str | None) -> Path | None:
        return resolve_path(state_dir, name)


def resolve_path(state_dir: Path, name: str | None) -> Path | None:
    if name is None:
        return None
    candidate = Path(name)
    return candidate if candidate.is_absolute() else state_dir / candidate


def write_lifecycle(state_dir: Path, *, trust_domain: str | None = None, signer: SignerConfig | None = None,
                    issuance: IssuanceConfig | None = None, pending_csr: str | None = None) -> None:
    """Write the keys `fastca init` owns, keeping every other key already in
    the file (a user's [server], [authn]… tables). The file, not the
    environment, is what is written: FASTCA_* variables stay overrides."""
    path = state_dir / CONFIG_FILE
    try:
        body = tomllib.loads(path.read_text())
    except FileNotFoundError:
        body = {}
    if trust_domain is not None:
        body["trust_domain"] = trust_domain
    if signer is not None:
        body["signer"] = signer.model_dump(exclude_none=True)
    if issuance is not None:
        body["issuance"] = {**body.get("issuance", {}), **issuance.model_dump()}
    if pending_csr is None:
        body.pop("pending_csr", None)
    else:
        body["pending_csr"] = pending_csr
    text = ("# fastca CA configuration. Paths are relative to this directory. Every key can also be\n"
            "# set from the environment as FASTCA_<SECTION>__<KEY>; see README.md for the sections.\n"
            + tomli_w.dumps(body))
    tmp = state_dir / (CONFIG_FILE + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
