"""Leader election on a coordination.k8s.io Lease, so that of several replicas exactly one acts.

kopf's peering freezes replicas of equal priority and notices a dead peer only after about a
minute; a Lease hands over within its duration and is what Kubernetes' own controllers use."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lmi_operator.kube import ApiError, KubeClient, object_path

log = logging.getLogger(__name__)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _micro(ts: datetime.datetime) -> str:
    return ts.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True)
class LeaseConfig:
    """Which Lease, who we are, and the timings (seconds) of holding it, as client-go names them:
    a leader that has not renewed for `renew_deadline` stops acting; a follower takes the Lease only
    after seeing it unchanged for `duration` by its own clock. renew_deadline < duration keeps the
    two apart, whatever the replicas' wall clocks say."""

    namespace: str
    name: str
    identity: str
    duration: int = 15
    renew_deadline: float = 10.0
    retry_period: float = 2.0


class LeaderElector:
    """Acquires the Lease, renews it in the background and calls `on_lost` when it can't; `leading()`
    says whether this replica may act right now (writes check it, see KubeClient.write_guard)."""

    def __init__(self, client: KubeClient, config: LeaseConfig) -> None:
        self.client = client
        self.config = config
        self._path = object_path("coordination.k8s.io/v1", "Lease", config.namespace, config.name)
        # The other holder's record as last read, and when (monotonic) it last changed.
        self._observed: tuple[Any, ...] | None = None
        self._observed_at = 0.0
        # Monotonic time of the last successful take or renew (taken before its request was sent).
        self._renewed_at = 0.0

    def leading(self) -> bool:
        """True while the last renewal is younger than the renew deadline."""
        return self._renewed_at > 0 and time.monotonic() < self._renewed_at + self.config.renew_deadline

    async def acquire(self) -> None:
        """Block until this identity holds the Lease."""
        while True:
            with contextlib.suppress(TimeoutError, ApiError, OSError):
                if await asyncio.wait_for(self._try_take(), timeout=self.config.renew_deadline):
                    break
            await asyncio.sleep(self.config.retry_period)
        log.info("acquired lease %s/%s as %s", self.config.namespace, self.config.name, self.config.identity)

    async def keep(self, on_lost: Callable[[], None]) -> None:
        """Renew every retry period; call `on_lost` once a renewal has not succeeded within the renew
        deadline (each attempt is cut at the deadline) or another replica holds the Lease."""
        while True:
            await asyncio.sleep(self.config.retry_period)
            if not await self._renew():
                on_lost()
                return

    async def _renew(self) -> bool:
        while (left := self._renewed_at + self.config.renew_deadline - time.monotonic()) > 0:
            try:
                if await asyncio.wait_for(self._try_take(), timeout=left):
                    return True
                log.error("lease %s taken by another replica", self.config.name)
                return False
            except (TimeoutError, ApiError, OSError) as err:
                log.warning("lease renewal failed, retrying: %s", err or type(err).__name__)
            await asyncio.sleep(min(self.config.retry_period, max(left, 0.0)))
        log.error(
            "lease %s not renewed within %ss: stepping down", self.config.name, self.config.renew_deadline
        )
        return False

    async def release(self) -> None:
        """Give the Lease up on a clean shutdown so that a standby takes over at once."""
        lease = await self.client.get(self._path)
        if lease and lease.get("spec", {}).get("holderIdentity") == self.config.identity:
            lease["spec"]["holderIdentity"] = None
            await self.client.request("PUT", self._path, body=lease, guarded=False)

    async def _try_take(self) -> bool:
        now, sent = _now(), time.monotonic()
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
            return await self._write("POST", self._path.rsplit("/", 1)[0], body, sent)
        current = lease.get("spec", {})
        holder = current.get("holderIdentity")
        if holder and holder != self.config.identity:
            # Expiry by this replica's own observation, never by the holder's timestamps (clocks
            # differ): the record must stay unchanged for a whole duration as seen from here.
            record = (holder, current.get("renewTime"), current.get("leaseTransitions"))
            if record != self._observed:
                self._observed, self._observed_at = record, time.monotonic()
            duration = current.get("leaseDurationSeconds", self.config.duration)
            if time.monotonic() < self._observed_at + duration:
                return False
        if holder != self.config.identity:
            spec["acquireTime"] = _micro(now)
            spec["leaseTransitions"] = current.get("leaseTransitions", 0) + 1
        lease["spec"] = current | spec
        # The resourceVersion in the body makes this a compare-and-swap: a racing replica gets 409.
        return await self._write("PUT", self._path, lease, sent)

    async def _write(self, method: str, path: str, body: dict[str, Any], sent: float) -> bool:
        try:
            await self.client.request(method, path, body=body, guarded=False)
        except ApiError as err:
            if err.status in (409, 422):
                return False
            raise
        self._renewed_at = sent
        return True
