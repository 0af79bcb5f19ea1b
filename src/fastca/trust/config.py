"""The ``[trust]`` section of fastca.toml.

    [trust.kubernetes]
    enabled = true
    # kubeconfig = "/etc/fastca/kubeconfig"   # unset: in-cluster (service-account token, KUBERNETES_SERVICE_*)
    # context = "prod"                        # a kubeconfig context; unset: its current-context
    lease_name = "fastca-trust-publisher"
    lease_namespace = "istio-system"
    lease_duration_seconds = 15               # a dead leader's Lease is taken over after this
    renew_deadline_seconds = 10               # a leader that cannot renew for this long stops writing
    retry_period_seconds = 2                  # how often candidates and the leader try
    # identity = "fastca-0"                   # unset: $POD_NAME (or the host name) + "_" + pid
    resync_seconds = 300                      # full list-and-repair besides the watches

    [trust.peers]                             # other meshes' roots, merged into the bundle agents trust
    sync_interval_seconds = 60
    grace_period_seconds = 86400              # an unreachable peer's last good roots are kept this long
    max_certificates = 100                    # per peer bundle
    max_bytes = 1048576                       # per peer bundle

    [trust.peers.sources.west]                # each source one of: file, url, kubeconfig
    file = "/etc/fastca/peers/west.pem"
    [trust.peers.sources.east]
    url = "https://east.example/roots.pem"
    ca_file = "/etc/fastca/peers/east-ca.pem"  # unset: the system's CAs
    [trust.peers.sources.south]
    kubeconfig = "/etc/fastca/peers/south.kubeconfig"   # its istio-ca-root-cert ConfigMap
    namespace = "istio-system"
"""

from __future__ import annotations

import os
import re
import socket

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = ["TrustConfig", "KubernetesTrustConfig", "PeersConfig", "PeerSourceConfig", "CONFIGMAP_NAME", "CONFIGMAP_KEY", "DEFAULT_SKIPPED_NAMESPACES"]

# What Istio's agents mount and read (istiod's CACertNamespaceConfigMap and its data key).
CONFIGMAP_NAME = "istio-ca-root-cert"
CONFIGMAP_KEY = "root-cert.pem"
# The namespaces istiod's namespace controller never writes to (its list of
# Kubernetes system namespaces that get no injection).
DEFAULT_SKIPPED_NAMESPACES = ("kube-system", "kube-public", "kube-node-lease", "local-path-storage")


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class KubernetesTrustConfig(_Section):
    enabled: bool = False
    kubeconfig: str | None = None           # relative to the state directory; None: in-cluster
    context: str | None = None
    configmap_name: str = CONFIGMAP_NAME
    skip_namespaces: list[str] = list(DEFAULT_SKIPPED_NAMESPACES)
    lease_name: str = "fastca-trust-publisher"
    lease_namespace: str = "istio-system"
    # Lease.spec.leaseDurationSeconds is an integer.
    lease_duration_seconds: int = Field(15, ge=2, le=3600)
    renew_deadline_seconds: float = Field(10.0, ge=1)
    retry_period_seconds: float = Field(2.0, ge=1)
    identity: str | None = None
    resync_seconds: float = Field(300.0, ge=1)
    request_timeout_seconds: float = Field(10.0, gt=0, le=300)
    # Server-side timeout of one watch request, after which it is reopened
    # from the last resourceVersion seen.
    watch_timeout_seconds: int = Field(300, ge=1, le=3600)

    @field_validator("identity")
    @classmethod
    def _identity(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("identity is empty")
        return value

    @model_validator(mode="after")
    def _timings(self) -> KubernetesTrustConfig:
        # client-go's (and kubernetes-asyncio's) rules: a leader must give up
        # before its Lease can be taken, and try more than once before that.
        if self.lease_duration_seconds <= self.renew_deadline_seconds:
            raise ValueError("lease_duration_seconds must be greater than renew_deadline_seconds")
        if self.renew_deadline_seconds <= 1.2 * self.retry_period_seconds:
            raise ValueError("renew_deadline_seconds must be greater than 1.2 x retry_period_seconds")
        return self

    def holder_identity(self) -> str:
        """Who this process is in the Lease: ``identity``, or the pod (host)
        name and the pid, unique among live processes."""
        if self.identity is not None:
            return self.identity
        return f"{os.environ.get('POD_NAME') or socket.gethostname()}_{os.getpid()}"


# Peer names are metric labels: short, plain, and only those configured.
_PEER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")


class PeerSourceConfig(_Section):
    """One peer's bundle: exactly one of ``file``, ``url`` (HTTPS) or
    ``kubeconfig`` (that cluster's ``istio-ca-root-cert`` ConfigMap). Paths
    are relative to the state directory."""

    file: str | None = None
    url: str | None = None
    ca_file: str | None = None              # url: the CAs its server certificate verifies to (unset: the system's)
    kubeconfig: str | None = None
    context: str | None = None
    namespace: str = "istio-system"
    configmap: str = CONFIGMAP_NAME
    key: str = CONFIGMAP_KEY
    timeout_seconds: float = Field(10.0, gt=0, le=300)

    @model_validator(mode="after")
    def _one_kind(self) -> PeerSourceConfig:
        given = [name for name in ("file", "url", "kubeconfig") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"a peer source needs exactly one of file, url, kubeconfig (got {given or 'none'})")
        if self.url is not None and not self.url.lower().startswith("https://"):
            raise ValueError("a peer url must be https://")
        if self.ca_file is not None and self.url is None:
            raise ValueError("ca_file is for a url source")
        return self

    @property
    def kind(self) -> str:
        return "file" if self.file is not None else "url" if self.url is not None else "kubeconfig"


class PeersConfig(_Section):
    sync_interval_seconds: float = Field(60.0, ge=0.2, le=86400)
    grace_period_seconds: float = Field(86400.0, ge=0)
    max_certificates: int = Field(100, ge=1, le=10_000)
    max_bytes: int = Field(1024 * 1024, ge=1024, le=64 * 1024 * 1024)
    sources: dict[str, PeerSourceConfig] = {}

    @field_validator("sources")
    @classmethod
    def _names(cls, value: dict[str, PeerSourceConfig]) -> dict[str, PeerSourceConfig]:
        for name in value:
            if not _PEER_NAME.fullmatch(name):
                raise ValueError(f"peer name {name!r}: letters, digits, '.', '_', '-', at most 63")
        return value


class TrustConfig(_Section):
    kubernetes: KubernetesTrustConfig = KubernetesTrustConfig()
    peers: PeersConfig = PeersConfig()
