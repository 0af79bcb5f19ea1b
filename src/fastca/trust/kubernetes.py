"""The trust-bundle publisher as the server runs it: an API client (a
kubeconfig, or the pod's in-cluster credentials, re-read as the token
rotates), the leader elector, and the publisher that runs while this process
holds the Lease."""

from __future__ import annotations

import asyncio
from pathlib import Path

from kubernetes_asyncio import client
from kubernetes_asyncio import config as kube_config

from fastca.errors import ConfigurationError
from fastca.observability.logging import get_logger
from fastca.trust.config import KubernetesTrustConfig
from fastca.trust.election import LeaderElector
from fastca.trust.publisher import TrustBundlePublisher

__all__ = ["KubernetesTrustPublisher", "api_client", "kubeconfig_client"]

log = get_logger("fastca.trust")


async def kubeconfig_client(kubeconfig: str, context: str | None, base_dir: Path, *,
                            section: str) -> client.ApiClient:
    """An ApiClient from a kubeconfig file (relative to ``base_dir``)."""
    path = Path(kubeconfig)
    path = path if path.is_absolute() else base_dir / path
    try:
        return await kube_config.new_client_from_config(config_file=str(path), context=context,
                                                        persist_config=False)
    except (kube_config.ConfigException, OSError, ValueError) as error:
        raise ConfigurationError(f"{section} kubeconfig {path}: {error}") from None


async def api_client(config: KubernetesTrustConfig, base_dir: Path) -> client.ApiClient:
    """An ApiClient from ``kubeconfig`` (relative to ``base_dir``) or, when
    none is named, from the pod's service account."""
    if config.kubeconfig is not None:
        return await kubeconfig_client(config.kubeconfig, config.context, base_dir, section="[trust.kubernetes]")
    configuration = client.Configuration()
    try:
        kube_config.load_incluster_config(client_configuration=configuration)
    except kube_config.ConfigException as error:
        raise ConfigurationError("[trust.kubernetes]: no kubeconfig is set and this is not a pod "
                                 f"(in-cluster configuration: {error})") from None
    return client.ApiClient(configuration)


class KubernetesTrustPublisher:
    """``start`` joins the election; ``stop`` leaves it, releasing the Lease
    if held; ``set_bundle`` changes what is published."""

    def __init__(self, config: KubernetesTrustConfig, bundle_pem: str, *, base_dir: Path) -> None:
        self.config = config
        self._base_dir = base_dir
        self._bundle = bundle_pem
        self._api: client.ApiClient | None = None
        self.elector: LeaderElector | None = None
        self.publisher: TrustBundlePublisher | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._api = await api_client(self.config, self._base_dir)
        self.elector = LeaderElector(self._api, self.config, self._lead)
        self._task = asyncio.create_task(self.elector.run(), name="trust-leader-election")
        log.info("trust bundle publisher started", identity=self.elector.identity,
                 lease=f"{self.config.lease_namespace}/{self.config.lease_name}")

    async def _lead(self, holds_lease) -> None:
        assert self._api is not None
        self.publisher = TrustBundlePublisher(client.CoreV1Api(self._api), self.config, self._bundle,
                                              may_write=holds_lease)
        await self.publisher.run()

    def set_bundle(self, bundle_pem: str) -> None:
        self._bundle = bundle_pem
        if self.publisher is not None:
            self.publisher.set_bundle(bundle_pem)

    @property
    def leading(self) -> bool:
        return self.elector is not None and self.elector.leading

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if self.elector is not None:
            await self.elector.release()
        if self._api is not None:
            api, self._api = self._api, None
            await api.close()
