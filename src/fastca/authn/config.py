"""Configuration of the authenticators and the node authorizer, as the
``[authn]`` table of ``fastca.toml`` (every key also ``FASTCA_AUTHN__…``),
and the two functions that turn it into running objects.

Relative file paths are resolved against ``base_dir`` (the state directory)
when the objects are built. No model holds a secret's value: only paths to
files that hold one, and plug-in options are left out of reprs.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from cryptography import x509
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from fastca.clock import SYSTEM_CLOCK, Clock
from fastca.errors import ConfigurationError

if TYPE_CHECKING:
    from fastca.authn.chain import AuthenticatorChain
    from fastca.authn.node_authorizer import NodeAuthorizer

__all__ = [
    "BUILTIN_AUTHENTICATORS",
    "AuthnConfig",
    "NodeAuthorizerConfig",
    "OidcProvider",
    "PluginConfig",
    "RejectionCacheConfig",
    "TokenReviewCacheConfig",
    "TokenReviewCluster",
    "XfccConfig",
    "build_authenticators",
    "build_node_authorizer",
]

IN_CLUSTER_API_SERVER = "https://kubernetes.default.svc"
IN_CLUSTER_CA_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"
IN_CLUSTER_TOKEN_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/token"

BUILTIN_AUTHENTICATORS = ("mtls", "oidc", "tokenreview", "xfcc")

# Asymmetric only: a JWKS is public, so an HMAC "key" from it would be a
# secret anyone can read; "none" is not a signature at all.
ALLOWED_JWT_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512",
                                    "ES256", "ES384", "ES512", "EdDSA"})


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def _https(url: str, what: str) -> str:
    if not url.startswith("https://"):
        raise ValueError(f"{what} must be an https:// URL")
    return url.rstrip("/")


class TokenReviewCluster(_Section):
    """A Kubernetes API server: where service-account tokens are reviewed
    (and, for the node authorizer, where pods are watched). Defaults are the
    in-cluster ones. Credentials: ``token_file`` (re-read on every call, as
    projected tokens rotate) or ``client_cert_file`` + ``client_key_file``;
    with neither, the in-cluster token file."""

    cluster_id: str = ""                          # what agents send as `clusterid`
    api_server: str = IN_CLUSTER_API_SERVER
    ca_file: str | None = IN_CLUSTER_CA_FILE      # None: the system trust store
    token_file: str | None = None
    client_cert_file: str | None = None
    client_key_file: str | None = None
    audiences: list[str] = Field(default_factory=lambda: ["istio-ca"], min_length=1)
    timeout_seconds: float = Field(5.0, gt=0, le=60)
    # TokenReviews in flight at once, per worker: a burst of new agents (a
    # restart, a scale-up) waits here, in order, rather than in the HTTP
    # client's connection pool, whose scheduling costs grow with its queue.
    max_concurrent_reviews: int = Field(32, ge=1, le=1024)

    @field_validator("api_server")
    @classmethod
    def _api_server(cls, value: str) -> str:
        return _https(value, "api_server")

    @model_validator(mode="after")
    def _credentials(self) -> TokenReviewCluster:
        if (self.client_cert_file is None) != (self.client_key_file is None):
            raise ValueError("client_cert_file and client_key_file go together")
        if self.token_file is not None and self.client_cert_file is not None:
            raise ValueError("use token_file or client_cert_file/client_key_file, not both")
        return self

    @property
    def bearer_token_file(self) -> str | None:
        """The file to read the API-server token from; None with a client certificate."""
        if self.client_cert_file is not None:
            return None
        return self.token_file if self.token_file is not None else IN_CLUSTER_TOKEN_FILE


class TokenReviewCacheConfig(_Section):
    size: int = Field(10_000, ge=0)              # 0: no cache
    ttl_seconds: float = Field(30.0, ge=0, le=600)


class RejectionCacheConfig(_Section):
    """Tokens the API server or the issuer refused outright (not
    authenticated, bad signature, expired), remembered briefly so a caller
    retrying one costs no further TokenReview or verification. Outages and
    timeouts are never remembered. Keyed by a hash of the token."""

    size: int = Field(10_000, ge=0)              # entries (LRU); 0: no cache
    ttl_seconds: float = Field(10.0, ge=0, le=300)


class OidcProvider(_Section):
    """istiod's ``JWT_RULE``: tokens from ``issuer`` (compared exactly),
    signed by a key in the JWKS, for one of ``audiences``."""

    issuer: str = Field(min_length=1)
    jwks_uri: str | None = None
    jwks_file: str | None = None
    jwks_ca_file: str | None = None               # None: the system trust store
    audiences: list[str] = Field(default_factory=lambda: ["istio-ca"], min_length=1)
    algorithms: list[str] = Field(default_factory=lambda: ["RS256", "ES256"], min_length=1)
    leeway_seconds: int = Field(10, ge=0, le=300)
    cluster_id: str = ""
    jwks_refresh_min_interval_seconds: float = Field(30.0, ge=0)   # refetch on unknown kid at most this often
    jwks_max_age_seconds: float = Field(3600.0, gt=0)
    timeout_seconds: float = Field(5.0, gt=0, le=60)

    @field_validator("jwks_uri")
    @classmethod
    def _jwks_uri(cls, value: str | None) -> str | None:
        return None if value is None else _https(value, "jwks_uri")

    @field_validator("algorithms")
    @classmethod
    def _algorithms(cls, values: list[str]) -> list[str]:
        bad = [v for v in values if v not in ALLOWED_JWT_ALGORITHMS]
        if bad:
            raise ValueError(f"algorithms {bad} are not allowed; choose from {sorted(ALLOWED_JWT_ALGORITHMS)}")
        return values

    @model_validator(mode="after")
    def _one_jwks(self) -> OidcProvider:
        if (self.jwks_uri is None) == (self.jwks_file is None):
            raise ValueError("set exactly one of jwks_uri and jwks_file")
        return self


class XfccConfig(_Section):
    # Peers whose x-forwarded-client-cert header is believed. Empty: nobody
    # (Istio trusts loopback implicitly; fastca does not).
    trusted_cidrs: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    max_header_bytes: int = Field(16 * 1024, ge=256, le=1024 * 1024)

    @field_validator("trusted_cidrs", mode="before")
    @classmethod
    def _networks(cls, values: Any) -> Any:
        if isinstance(values, list):
            return [ipaddress.ip_network(v, strict=False) if isinstance(v, str) else v for v in values]
        return values


class PluginConfig(_Section):
    """An authenticator from the ``fastca.authenticators`` entry-point group."""

    name: str = Field(min_length=1)
    options: dict[str, Any] = Field(default_factory=dict, repr=False)   # may carry secrets


class NodeAuthorizerConfig(_Section):
    """Who may ask for certificates on behalf of others (ztunnel), and where
    the pod facts that bound it come from."""

    trusted_node_accounts: list[str] = []         # "ns/sa", e.g. "istio-system/ztunnel"
    pod_source: Literal["kubernetes", "static"] | None = None
    static_file: str | None = None                # JSON or TOML list of pods (pod_source = "static")
    kubernetes_cluster: str = ""                  # a tokenreview cluster_id; "" = the first one

    @field_validator("trusted_node_accounts")
    @classmethod
    def _accounts(cls, values: list[str]) -> list[str]:
        for value in values:
            namespace, slash, account = value.partition("/")
            if not slash or not namespace or not account or "/" in account:
                raise ValueError(f"{value!r} is not ns/sa")
        return values

    @model_validator(mode="after")
    def _source(self) -> NodeAuthorizerConfig:
        if self.trusted_node_accounts and self.pod_source is None:
            raise ValueError("trusted_node_accounts needs a pod_source")
        if self.pod_source == "static" and not self.static_file:
            raise ValueError('pod_source = "static" needs static_file')
        return self


class AuthnConfig(_Section):
    mtls: bool = True
    tokenreview: list[TokenReviewCluster] = []
    tokenreview_cache: TokenReviewCacheConfig = TokenReviewCacheConfig()
    rejection_cache: RejectionCacheConfig = RejectionCacheConfig()
    # Calls from one peer address (IP) waiting on an authenticator that has
    # to go to the network (a TokenReview not cached, OIDC); past it a call
    # is answered RESOURCE_EXHAUSTED before any request is made. Calls
    # judged at once (client certificate, cached review, XFCC) never wait.
    max_pending_per_peer: int = Field(64, ge=1, le=100_000)
    oidc: list[OidcProvider] = []
    xfcc: XfccConfig = XfccConfig()
    plugins: list[PluginConfig] = []
    # istiod's order (client certificate first); plug-ins not named here
    # follow in the order they are listed.
    order: list[str] = Field(default_factory=lambda: list(BUILTIN_AUTHENTICATORS))
    node_authorizer: NodeAuthorizerConfig = NodeAuthorizerConfig()

    @model_validator(mode="after")
    def _names(self) -> AuthnConfig:
        plugin_names = [p.name for p in self.plugins]
        if len(set(plugin_names)) != len(plugin_names):
            raise ValueError("plug-in names must be unique")
        clashes = set(plugin_names) & set(BUILTIN_AUTHENTICATORS)
        if clashes:
            raise ValueError(f"plug-in names {sorted(clashes)} clash with built-in authenticators")
        known = set(BUILTIN_AUTHENTICATORS) | set(plugin_names)
        unknown = [n for n in self.order if n not in known]
        if unknown:
            raise ValueError(f"order names unknown authenticators {unknown}")
        if len(set(self.order)) != len(self.order):
            raise ValueError("order names an authenticator twice")
        cluster_ids = [c.cluster_id for c in self.tokenreview]
        if len(set(cluster_ids)) != len(cluster_ids):
            raise ValueError("tokenreview cluster_ids must be unique")
        if self.node_authorizer.pod_source == "kubernetes":
            wanted = self.node_authorizer.kubernetes_cluster
            if not self.tokenreview or (wanted and wanted not in cluster_ids):
                raise ValueError("node_authorizer.kubernetes_cluster names no tokenreview cluster")
        return self

    def kubernetes_cluster(self, cluster_id: str) -> TokenReviewCluster:
        for cluster in self.tokenreview:
            if cluster.cluster_id == cluster_id:
                return cluster
        if not cluster_id and self.tokenreview:
            return self.tokenreview[0]
        raise ConfigurationError(f"no tokenreview cluster {cluster_id!r}")


def _resolve(path: str | None, base_dir: Path | None) -> str | None:
    if path is None or base_dir is None or Path(path).is_absolute():
        return path
    return str(base_dir / path)


def _resolved_cluster(cluster: TokenReviewCluster, base_dir: Path | None) -> TokenReviewCluster:
    return cluster.model_copy(update={
        "ca_file": _resolve(cluster.ca_file, base_dir),
        "token_file": _resolve(cluster.token_file, base_dir),
        "client_cert_file": _resolve(cluster.client_cert_file, base_dir),
        "client_key_file": _resolve(cluster.client_key_file, base_dir),
    })


def build_authenticators(config: AuthnConfig, *, trust_domain: str,
                         roots: Sequence[x509.Certificate] | Any,
                         intermediates: Sequence[x509.Certificate] | Any = (),
                         base_dir: Path | None = None, clock: Clock = SYSTEM_CLOCK) -> AuthenticatorChain:
    """The chain in ``config.order`` (plug-ins not named there appended).
    ``roots`` and ``intermediates`` are lists or zero-argument callables
    returning the current ones (so a root rotation needs no rebuild). Token expiry and
    cache ages are judged by ``clock``."""
    from fastca.authn.chain import AuthenticatorChain
    from fastca.authn.k8s_tokenreview import TokenReviewAuthenticator
    from fastca.authn.mtls import MtlsAuthenticator
    from fastca.authn.oidc import OidcAuthenticator
    from fastca.authn.plugins import load_plugin
    from fastca.authn.xfcc import XfccAuthenticator

    from fastca.authn._rejections import RejectionCache

    order = list(config.order) + [p.name for p in config.plugins if p.name not in config.order]
    # One table for every remote authenticator: entries are scoped by cluster or issuer.
    rejections = RejectionCache(config.rejection_cache.size, config.rejection_cache.ttl_seconds, clock.monotonic)
    plugins = {p.name: p for p in config.plugins}
    authenticators: list[Any] = []
    for name in order:
        if name == "mtls":
            if config.mtls:
                authenticators.append(MtlsAuthenticator(roots, intermediates))
        elif name == "oidc":
            for provider in config.oidc:
                provider = provider.model_copy(update={"jwks_file": _resolve(provider.jwks_file, base_dir),
                                                       "jwks_ca_file": _resolve(provider.jwks_ca_file, base_dir)})
                authenticators.append(OidcAuthenticator(provider, trust_domain=trust_domain, clock=clock.now,
                                                        jwks_clock=clock.monotonic, rejections=rejections))
        elif name == "tokenreview":
            if config.tokenreview:
                authenticators.append(TokenReviewAuthenticator(
                    [_resolved_cluster(c, base_dir) for c in config.tokenreview], trust_domain=trust_domain,
                    cache_size=config.tokenreview_cache.size, cache_ttl=config.tokenreview_cache.ttl_seconds,
                    clock=clock.now, rejections=rejections))
        elif name == "xfcc":
            if config.xfcc.trusted_cidrs:
                authenticators.append(XfccAuthenticator(config.xfcc.trusted_cidrs,
                                                        max_header_bytes=config.xfcc.max_header_bytes))
        else:
            plugin = plugins[name]
            authenticators.append(load_plugin(plugin.name, plugin.options, trust_domain))
    return AuthenticatorChain(authenticators, max_pending_per_peer=config.max_pending_per_peer)


def build_node_authorizer(config: AuthnConfig, *, trust_domain: str,
                          base_dir: Path | None = None) -> NodeAuthorizer | None:
    """None when no node accounts are trusted: impersonation is then always
    denied. A Kubernetes pod source must be started (``await
    authorizer.start()``) before use and stopped at shutdown."""
    from fastca.authn.node_authorizer import (
        KubernetesPodSource,
        NodeAuthorizer,
        StaticPodSource,
    )

    settings = config.node_authorizer
    if not settings.trusted_node_accounts:
        return None
    source: Any
    if settings.pod_source == "static":
        assert settings.static_file is not None
        source = StaticPodSource(Path(_resolve(settings.static_file, base_dir) or settings.static_file))
    else:
        cluster = _resolved_cluster(config.kubernetes_cluster(settings.kubernetes_cluster), base_dir)
        source = KubernetesPodSource(cluster)
    return NodeAuthorizer(set(settings.trusted_node_accounts), source, trust_domain=trust_domain)
