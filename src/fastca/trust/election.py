"""Leader election on a coordination.k8s.io/v1 Lease, with kubernetes-asyncio's
``LeaderElection`` (client-go's algorithm): a candidate takes the Lease when
it is free or when its record has not changed for ``lease_duration``; the
leader renews every ``retry_period`` and gives up when it could not renew for
``renew_deadline``. Every write is a replace carrying the resourceVersion it
read, so two candidates racing for one Lease cannot both win: the loser gets
409 Conflict and reads again.

What this module adds to the library:

- its lock never raises out of the election loop: a transport error, a
  timeout, or an API error whose body is not a Status is a failed attempt
  (the library would otherwise leave its leading task running after the
  election loop died);
- every request has a timeout (``request_timeout_seconds``);
- a fence: ``holds_lease()`` is true only while the last successful renewal
  is younger than ``renew_deadline``, which is shorter than the lease
  duration other candidates wait out, so a leader that lost the API server
  stops writing before anyone else may start;
- the leading coroutine is restarted if it fails, cancelled when the Lease
  is lost, and the Lease is released (holder emptied) on a graceful stop, so
  the other replica takes over at its next retry instead of after the lease
  duration;
- Lease times are written as UTC (the library writes local time with a Z).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException
from kubernetes_asyncio.leaderelection.electionconfig import Config as ElectionConfig
from kubernetes_asyncio.leaderelection.leaderelection import LeaderElection
from kubernetes_asyncio.leaderelection.leaderelectionrecord import LeaderElectionRecord
from kubernetes_asyncio.leaderelection.resourcelock.leaselock import LeaseLock

from fastca.observability.logging import get_logger
from fastca.trust.config import KubernetesTrustConfig

__all__ = ["LeaderElector"]

log = get_logger("fastca.trust.election")

_RESTART_DELAY_S = 1.0


def _failed_attempt(status: int, reason: str) -> ApiException:
    """What the library expects from a failed read: an ApiException whose
    body is a Status with a code (it reads ``body["code"]``)."""
    error = ApiException(status=status, reason=reason)
    error.body = json.dumps({"kind": "Status", "code": status, "message": reason})
    return error


class _LeaseLock(LeaseLock):
    def __init__(self, name: str, namespace: str, identity: str, api_client: client.ApiClient, *,
                 timeout: float, on_written: Callable[[], None]) -> None:
        super().__init__(name, namespace, identity, api_client)
        self._timeout = timeout
        self._on_written = on_written
        self.conflicts = 0

    async def get(self, name: str, namespace: str) -> Any:
        try:
            lease = await self.api_instance.read_namespaced_lease(name, namespace, _request_timeout=self._timeout)
        except ApiException as error:
            return False, _failed_attempt(error.status or 0, str(error.reason))
        except Exception as error:      # transport (aiohttp.ClientError), timeout, a body that is not JSON
            log.warning("lease read failed", lease=f"{namespace}/{name}", reason=repr(error))
            return False, _failed_attempt(0, repr(error))
        self.lease_reference = lease
        return True, self.election_record(lease)

    async def create(self, name: str, namespace: str, election_record: LeaderElectionRecord) -> bool:
        body = client.V1Lease(metadata=client.V1ObjectMeta(name=name),
                              spec=self.update_lease(election_record))
        return await self._write("create", self.api_instance.create_namespaced_lease(
            namespace, body, _request_timeout=self._timeout), name, namespace)

    async def update(self, name: str, namespace: str, updated_record: LeaderElectionRecord) -> bool:
        if self.lease_reference is None:
            return False
        # The object as read, resourceVersion included: a Lease changed since
        # (another candidate won, or anyone touched it) answers 409.
        self.lease_reference.spec = self.update_lease(updated_record, self.lease_reference.spec)
        return await self._write("update", self.api_instance.replace_namespaced_lease(
            name=name, namespace=namespace, body=self.lease_reference, _request_timeout=self._timeout),
            name, namespace)

    async def _write(self, what: str, request: Awaitable[Any], name: str, namespace: str) -> bool:
        try:
            await request
        except ApiException as error:
            if error.status == 409:
                self.conflicts += 1
                log.info("lease changed since it was read; reading it again", lease=f"{namespace}/{name}",
                         operation=what)
            else:
                log.warning("lease write refused", lease=f"{namespace}/{name}", operation=what,
                            status=error.status, reason=str(error.reason))
            return False
        except asyncio.CancelledError:
            raise
        except Exception as error:      # transport, timeout
            log.warning("lease write failed", lease=f"{namespace}/{name}", operation=what, reason=repr(error))
            return False
        self._on_written()
        return True

    # The library keeps times as str(naive local datetime); the Lease holds
    # RFC 3339 UTC. Convert both ways through local time, so that a round
    # trip (the leader keeps its acquireTime) is stable in any time zone.
    def time_str_to_iso(self, str_time: str | None) -> str | None:
        if not str_time:
            return None
        for fmt in ("%Y-%m-%d %H:%M:%S.%f", "%Y-%m-%d %H:%M:%S"):
            try:
                local = dt.datetime.strptime(str_time, fmt)
            except ValueError:
                continue
            return local.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        return None

    def election_record(self, lease: client.V1Lease) -> LeaderElectionRecord:
        record = LeaderElectionRecord(None, None, None, None)
        spec = lease.spec
        if spec is None:
            return record
        record.holder_identity = spec.holder_identity or None
        if spec.lease_duration_seconds:
            record.lease_duration = str(spec.lease_duration_seconds)
        for attribute in ("acquire_time", "renew_time"):
            value = getattr(spec, attribute)
            if isinstance(value, dt.datetime):
                aware = value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)
                setattr(record, attribute, str(aware.astimezone().replace(tzinfo=None)))
        return record


class LeaderElector:
    """Runs ``lead(holds_lease)`` while this process holds the Lease.

    ``lead`` is cancelled when the Lease is lost (and restarted once it is
    won again); it should check ``holds_lease()`` before each write."""

    def __init__(self, api_client: client.ApiClient, config: KubernetesTrustConfig,
                 lead: Callable[[Callable[[], bool]], Awaitable[None]]) -> None:
        self._api = api_client
        self._config = config
        self._lead = lead
        self.identity = config.holder_identity()
        self.leading = False
        self._renewed_at: float | None = None
        self._leading_task: asyncio.Task[None] | None = None
        self.terms = 0                  # how many times this process became the leader
        self._past_conflicts = 0
        self._lock: _LeaseLock | None = None

    @property
    def conflicts(self) -> int:
        """409s met writing the Lease."""
        return self._past_conflicts + (self._lock.conflicts if self._lock is not None else 0)

    def holds_lease(self) -> bool:
        renewed = self._renewed_at
        return (self.leading and renewed is not None
                and time.monotonic() - renewed < self._config.renew_deadline_seconds)

    def _written(self) -> None:
        self._renewed_at = time.monotonic()

    async def run(self) -> None:
        config = self._config
        while True:
            lock = self._lock = _LeaseLock(config.lease_name, config.lease_namespace, self.identity, self._api,
                                           timeout=config.request_timeout_seconds, on_written=self._written)
            election = LeaderElection(ElectionConfig(
                lock, lease_duration=config.lease_duration_seconds, renew_deadline=config.renew_deadline_seconds,
                retry_period=config.retry_period_seconds, onstarted_leading=self._leading,
                onstopped_leading=self._stopped_leading))
            try:
                await election.run()
            except asyncio.CancelledError:
                raise
            except Exception as error:
                log.error("leader election failed; starting over", reason=repr(error))
            finally:
                self._past_conflicts += lock.conflicts
                self._lock = None
                await self._stop_leading()
            await asyncio.sleep(config.retry_period_seconds)

    async def _leading(self) -> None:
        self.leading = True
        self.terms += 1
        self._leading_task = asyncio.current_task()
        log.info("leading", identity=self.identity,
                 lease=f"{self._config.lease_namespace}/{self._config.lease_name}")
        try:
            while True:
                try:
                    await self._lead(self.holds_lease)
                    return
                except asyncio.CancelledError:
                    raise
                except Exception as error:
                    log.error("leader's work failed; restarting it", reason=repr(error))
                    await asyncio.sleep(_RESTART_DELAY_S)
        finally:
            self.leading = False

    async def _stopped_leading(self) -> None:
        log.warning("lost the lease", identity=self.identity)
        await self._stop_leading()

    async def _stop_leading(self) -> None:
        self.leading = False
        task, self._leading_task = self._leading_task, None
        if task is not None and task is not asyncio.current_task() and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def release(self) -> None:
        """Give the Lease up if this process holds it (a graceful stop): the
        holder is emptied, so the next candidate takes it at its next try."""
        was_holding = self._renewed_at is not None
        await self._stop_leading()
        if not was_holding:
            return
        config = self._config
        api = client.CoordinationV1Api(self._api)
        try:
            lease = await api.read_namespaced_lease(config.lease_name, config.lease_namespace,
                                                    _request_timeout=config.request_timeout_seconds)
            if lease.spec is None or lease.spec.holder_identity != self.identity:
                return
            lease.spec.holder_identity = ""
            lease.spec.lease_duration_seconds = 1
            await api.replace_namespaced_lease(config.lease_name, config.lease_namespace, lease,
                                               _request_timeout=config.request_timeout_seconds)
            log.info("lease released", identity=self.identity)
        except asyncio.CancelledError:
            raise
        except Exception as error:
            log.warning("could not release the lease; it expires on its own", reason=repr(error))
        finally:
            self._renewed_at = None
