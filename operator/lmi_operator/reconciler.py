"""The reconcile loop: two work queues over the cache, one for children and one for status.

Level-based: watch events only update the cache (cache.py) and queue the owning model's key; one
reconcile per key at a time compares desired with observed state and writes only what differs
(children.py), then the status is reported from what is observed (status_report.py). An unchanged
world therefore costs no API request at all. Status has its own queue so that a burst of new models
gets its Deployments first. A pod's events come in bursts (created, scheduled, running and ready
within milliseconds on a fast node): its model's status is reported POD_EVENTS_SETTLE_SECONDS after
the first, once for the burst (docs/benchmarks.md). Ready itself follows the Deployment's status,
which is reported at once."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from lmi_operator import metrics
from lmi_operator.cache import Key, ModelCache
from lmi_operator.children import ChildrenApplier
from lmi_operator.events import EventRecorder
from lmi_operator.fit_check import FitCheck
from lmi_operator.gpu_capacity import GpuCapacity
from lmi_operator.kube import KubeClient
from lmi_operator.memory import Trimmer
from lmi_operator.prerequisites import MISSING_RECHECK_SECONDS, Prerequisites
from lmi_operator.profile_check import RECHECK_SECONDS as PROFILES_RECHECK_SECONDS
from lmi_operator.profile_check import ProfileCheck, settled
from lmi_operator.settings import OperatorSettings
from lmi_operator.status_report import StatusReporter, parse
from lmi_operator.workqueue import WorkQueue
from lmi_runtime.admin_auth import Signer

POD_EVENTS_SETTLE_SECONDS = 0.2


class Reconciler:
    """Holds the cache and reconciles LMIModels from it through the work queues."""

    def __init__(self, client: KubeClient, settings: OperatorSettings) -> None:
        self.client = client
        self.settings = settings
        self.queue: WorkQueue[Key] = WorkQueue(self.reconcile, workers=settings.workers)
        self.status_queue: WorkQueue[Key] = WorkQueue(self.report, workers=max(2, settings.workers // 2))
        self.cache = ModelCache(
            client,
            settings.namespaces,
            on_spec=self.queue.add,
            on_pods=self._pods_changed,
            on_deleted=self._deleted,
        )
        # Made per process, kept in memory only: a new operator's public key reaches the pods through
        # their ConfigMaps (lmi_runtime.admin_auth).
        signer = Signer()
        # Cluster-wide, kopf watches the CRDs and so an API installed later (handlers).
        self.prerequisites = Prerequisites(client, rescans=not settings.namespaces)
        self.children = ChildrenApplier(client, self.cache, settings, self.prerequisites, signer.public_key)
        # One view of the nodes' GPUs for both queues: the Deployment's gate and the status.
        capacity = GpuCapacity(client)
        self.fits = FitCheck(self.cache, capacity, settings, notify=self.queue.add)
        self.profiles = ProfileCheck(self.cache, capacity, settings)
        self.status = StatusReporter(
            client, self.cache, settings, EventRecorder(client), signer, self.fits, self.prerequisites
        )
        # A replica that finished loading adapters is reported at once.
        self.status.adapters.notify = self.status_queue.add
        self.last_progress = time.monotonic()

    async def run(self) -> None:
        """Process the queues until cancelled."""
        async with asyncio.TaskGroup() as group:
            group.create_task(self.queue.run())
            group.create_task(self.status_queue.run())
            group.create_task(self.cache.sweeps.run())
            group.create_task(Trimmer(lambda: len(self.cache.models)).run())

    def pending(self) -> int:
        """Keys waiting or in flight in either queue."""
        return len(self.queue) + len(self.status_queue)

    async def reconcile(self, key: Key) -> None:
        """Bring one LMIModel's children in line with its spec, then queue its status."""
        await self._timed("children", key, self._reconcile)

    async def report(self, key: Key) -> None:
        """Write one LMIModel's status from what is observed now."""
        await self._timed("status", key, self._report)

    async def _reconcile(self, key: Key) -> None:
        st = self.cache.current(key)
        if st is None or st.model is None:
            return
        obj, invalid = parse(st.model)
        # Nothing is applied from an invalid spec, nor from one needing an API the cluster does not
        # serve: what runs keeps running as it was.
        if obj is not None and invalid is None and await self.prerequisites.missing(obj.spec) is not None:
            self.queue.add_after(key, MISSING_RECHECK_SECONDS)
        elif obj is not None and invalid is None:
            fit = await self.fits.judge(key, obj)
            plan = await self.profiles.plan(key, obj, fit)
            await self.children.apply(key, obj, fit, plan)
            if plan is not None and not settled(plan):
                # Freed GPUs raise no event of ours: look again (profile_check).
                self.queue.add_after(key, PROFILES_RECHECK_SECONDS)
        self.status_queue.add(key)

    async def _report(self, key: Key) -> None:
        if (again := await self.status.report(key)) is not None:
            self.status_queue.add_after(key, again)

    def _pods_changed(self, key: Key) -> None:
        self.status_queue.add_after(key, POD_EVENTS_SETTLE_SECONDS)

    def _deleted(self, key: Key) -> None:
        self.status.forget(key)
        self.fits.forget(key)

    async def _timed(self, step: str, key: Key, work: Callable[[Key], Awaitable[None]]) -> None:
        started = time.perf_counter()
        try:
            await work(key)
        except Exception:
            metrics.RECONCILES.labels(step, "error").inc()
            raise
        finally:
            self.last_progress = time.monotonic()
            metrics.RECONCILE_SECONDS.labels(step).observe(time.perf_counter() - started)
            metrics.QUEUE_DEPTH.set(self.pending())
        metrics.RECONCILES.labels(step, "ok").inc()
