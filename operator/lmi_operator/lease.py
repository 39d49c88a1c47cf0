"""Leader election on a coordination.k8s.io Lease, so that of several replicas exactly one acts.

kopf's peering freezes replicas of equal priority and notices a dead peer only after about a
minute; a Lease hands over within its duration and is what Kubernetes' own controllers use."""

from __future__ import annotations

import asyncio
import datetime
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lmi_operator.kube import ApiError, KubeClient, object_path

log = logging.getLogger(__name__)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _micro(ts: datetime.datetime) -> str:
    return ts.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse(ts: str) -> datetime.datetime:
    return datetime.datetime.strptime(ts, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=datetime.UTC)


@dataclass(frozen=True)
class LeaseConfig:
    """Which Lease, who we are, and the timings (seconds) of holding it."""

    namespace: str
    name: str
    identity: str
    duration: int = 15
    renew_every: float = 5.0
    retry_every: float = 2.0


class LeaderElector:
    """Acquires the Lease, renews it in the background and calls `on_lost` when it can't."""

    def __init__(self, client: KubeClient, config: LeaseConfig) -> None:
        self.client = client
        self.config = config
        self._path = object_path("coordination.k8s.io/v1", "Lease", config.namespace, config.name)

    async def acquire(self) -> None:
        """Block until this identity holds the Lease."""
        while not await self._try_take():
            await asyncio.sleep(self.config.retry_every)
        log.info("acquired lease %s/%s as %s", self.config.namespace, self.config.name, self.config.identity)

    async def keep(self, on_lost: Callable[[], None]) -> None:
        """Renew until renewal fails for longer than the Lease duration, then call `on_lost`."""
        last_ok = _now()
        while True:
            await asyncio.sleep(self.config.renew_every)
            try:
                if await self._try_take():
                    last_ok = _now()
                    continue
                log.error("lease %s taken by another replica", self.config.name)
            except (TimeoutError, ApiError, OSError) as err:
                if (_now() - last_ok).total_seconds() < self.config.duration:
                    log.warning("lease renewal failed, retrying: %s", err)
                    continue
                log.error("lease renewal failed for %ss: %s", self.config.duration, err)
            on_lost()
            return

    async def release(self) -> None:
        """Give the Lease up on a clean shutdown so that a standby takes over at once."""
        lease = await self.client.get(self._path)
        if lease and lease.get("spec", {}).get("holderIdentity") == self.config.identity:
            lease["spec"]["holderIdentity"] = None
            await self.client.request("PUT", self._path, body=lease)

    async def _try_take(self) -> bool:
        now = _now()
        lease = await self.client.get(self._path)
        spec: dict[str, Any] = {
            "holderIdentity": self.config.identity,
            "leaseDurationSeconds": self.config.duration,
            "renewTime": _micro(now),
        }
        if lease is None:
            body = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": self.config.name, "namespace": self.config.namespace},
                "spec": spec | {"acquireTime": _micro(now), "leaseTransitions": 0},
            }
            return await self._write("POST", self._path.rsplit("/", 1)[0], body)
        current = lease.get("spec", {})
        holder = current.get("holderIdentity")
        if holder and holder != self.config.identity:
            renewed = current.get("renewTime")
            duration = current.get("leaseDurationSeconds", self.config.duration)
            if renewed and (now - _parse(renewed)).total_seconds() < duration:
                return False
        if holder != self.config.identity:
            spec["acquireTime"] = _micro(now)
            spec["leaseTransitions"] = current.get("leaseTransitions", 0) + 1
        lease["spec"] = current | spec
        # The resourceVersion in the body makes this a compare-and-swap: a racing replica gets 409.
        return await self._write("PUT", self._path, lease)

    async def _write(self, method: str, path: str, body: dict[str, Any]) -> bool:
        try:
            await self.client.request(method, path, body=body)
        except ApiError as err:
            if err.status in (409, 422):
                return False
            raise
        return True
