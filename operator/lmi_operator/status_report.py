"""Reporting a model's status: gather what is observed, let `status.build_status` judge, apply it.

The whole status is server-side applied by a field manager of its own, so keys it no longer
writes (an option removed from the spec) go; keys an older operator wrote by merge patch are removed
by one merge patch. Nothing is written when the status would not change. A change of the Ready
condition is recorded as an Event."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from lmi_operator import metrics
from lmi_operator.adapter_status import AdapterReport, judge
from lmi_operator.adapter_sync import AdapterSync
from lmi_operator.api import API_VERSION, KIND, EngineMode, InvalidLMIModel, LMIModel, parse_lmimodel
from lmi_operator.cache import Key, ModelCache, ModelState
from lmi_operator.engine_options import check_options
from lmi_operator.events import EventRecorder, Subject
from lmi_operator.fit_check import FitCheck
from lmi_operator.gpu_capacity import GpuCapacity
from lmi_operator.kube import STATUS_FIELD_MANAGER, ApiError, KubeClient, object_path
from lmi_operator.prerequisites import Prerequisites
from lmi_operator.profile_check import profile_status
from lmi_operator.properties import lmi_options
from lmi_operator.render import (
    WORKLOAD_KINDS,
    desired_replicas,
    gpu_resource_of,
    render,
    selector_of,
    selector_string,
    serving_selector,
    workload_kind,
)
from lmi_operator.render_adapters import declared, lora_on
from lmi_operator.render_lws import serves_http
from lmi_operator.replica_phases import server_ready, server_starting, startup_status
from lmi_operator.settings import OperatorSettings
from lmi_operator.startup_reader import StartupReader
from lmi_operator.status import INSUFFICIENT_GPU, READY, Observed, build_status, problem_of
from lmi_runtime.admin_auth import Signer

# How often to look again at a model whose pods are loading (to notice a StartupTimeout), and at one
# whose model server is starting (to follow its start-up phases).
RECHECK_SECONDS = 30.0
STARTING_RECHECK_SECONDS = 10.0


def parse(body: Mapping[str, Any]) -> tuple[LMIModel | None, str | None]:
    """The parsed model, or None and why the spec is invalid (also for engine options vLLM refuses)."""
    try:
        obj = parse_lmimodel(body)
    except InvalidLMIModel as err:
        return None, str(err)
    return obj, check_options(obj.spec.engine.options)


def removals(live: Mapping[str, Any], wanted: Mapping[str, Any]) -> dict[str, Any] | None:
    """A merge patch that deletes the map keys `live` has and `wanted` lacks (None when there are
    none); lists and values are compared whole and set to `wanted`'s."""
    patch: dict[str, Any] = {}
    for k, v in live.items():
        if k not in wanted:
            patch[k] = None
        elif isinstance(v, Mapping) and isinstance(wanted[k], Mapping):
            if (inner := removals(v, wanted[k])) is not None:
                patch[k] = inner
        elif v != wanted[k]:
            patch[k] = wanted[k]
    return patch or None


def rendered_config_hashes(st: ModelState, obj: LMIModel, settings: OperatorSettings) -> dict[str, str]:
    """The config hash on each pod template rendered from `obj`'s spec, by Deployment name, rendered
    once per generation (templates depend on the spec and the name only, not on the replicas; the
    uid tells a re-created model apart)."""
    stamp = (str(obj.metadata.uid), int(obj.metadata.generation or 1))
    if st.config_hashes is None or st.config_hashes[0] != stamp:
        st.config_hashes = (stamp, render(obj, settings).config_hashes())
    return st.config_hashes[1]


class StatusReporter:
    """Writes each model's status from the cache; `recheck(key, delay)` asks to be called again."""

    def __init__(
        self,
        client: KubeClient,
        cache: ModelCache,
        settings: OperatorSettings,
        events: EventRecorder,
        signer: Signer | None = None,
        fits: FitCheck | None = None,
        prerequisites: Prerequisites | None = None,
    ) -> None:
        self.client = client
        self.cache = cache
        self.settings = settings
        self.events = events
        self.fits = fits or FitCheck(cache, GpuCapacity(client), settings)
        self.prerequisites = prerequisites or Prerequisites(client)
        self.startups = StartupReader()
        self.adapters = AdapterSync(signer or Signer())
        self._reasons: dict[Key, str] = {}

    async def report(self, key: Key) -> float | None:
        """Write one model's status from what is observed now; return when to look again (None: only
        when something changes): soon while a model server starts, later while pods are not Ready."""
        st = self.cache.current(key)
        if st is None or st.model is None:
            return None
        body = st.model
        obj, invalid = parse(body)
        invalid = invalid or st.apply_error
        if obj is None or invalid is not None:
            await self._write(key, body, self._observed(key, st, body, None, invalid=invalid))
            return None
        if (missing := await self.prerequisites.missing(obj.spec)) is not None:
            observed = self._observed(key, st, body, obj, options=lmi_options(obj.spec))
            await self._write(key, body, dataclasses.replace(observed, missing_prerequisite=missing))
            return None
        # Status read from a partial cache would be rewritten for nothing (then back): see the workload.
        names = rendered_config_hashes(st, obj, self.settings)
        api_version, kind = workload_kind(obj.spec)
        await self.cache.read_missing(key, [(api_version, kind, name) for name in names])
        observed = self._observed(key, st, body, obj, options=lmi_options(obj.spec))
        observed = dataclasses.replace(observed, fit=await self.fits.judge(key, obj))
        # The replicas' model servers: a group's leader serves for the group (render_lws).
        servers = [pod for pod in observed.pods if serves_http(pod)]
        runtime = await self.startups.read(key, servers)
        observed = dataclasses.replace(observed, startup=startup_status(servers, runtime))
        if lora_on(obj.spec):
            observed = dataclasses.replace(observed, adapters=await self._adapters(key, obj, observed))
        problem = problem_of(observed)
        if problem is not None and problem.reason == INSUFFICIENT_GPU:
            free = await self.fits.gpus.free_by_node(observed.gpu_resource)
            largest = await self.fits.gpus.largest_node(observed.gpu_resource)
            observed = dataclasses.replace(observed, free_gpus_by_node=free, largest_node_gpus=largest)
        status = await self._write(key, body, observed)
        if any(server_starting(pod) for pod in servers):
            return STARTING_RECHECK_SECONDS
        adapters = observed.adapters
        if adapters is not None and not adapters.converged and any(map(server_ready, servers)):
            # Loading: soon (a finished load also asks for a report); a failure: retried less often.
            return RECHECK_SECONDS if adapters.failed else STARTING_RECHECK_SECONDS
        ready = next(c for c in status["conditions"] if c["type"] == READY)
        return RECHECK_SECONDS if ready["status"] != "True" and st.pods else None

    async def _adapters(self, key: Key, obj: LMIModel, observed: Observed) -> AdapterReport:
        """Judge what the ready replicas last answered about the declared adapters (and look again)."""
        wanted = declared(obj.spec)
        ready = [pod for pod in observed.pods if serves_http(pod) and server_ready(pod)]
        answers = await self.adapters.answers(key, wanted, ready)
        return judge(wanted, [str(p["metadata"]["name"]) for p in ready], answers)

    def forget(self, key: Key) -> None:
        """The model is gone: it no longer counts in the models-by-reason gauge, and its Events
        are no longer remembered for aggregation."""
        self._track(key, None)
        self.events.forget(*key)
        self.startups.forget(key)
        self.adapters.forget(key)

    def _observed(
        self,
        key: Key,
        st: ModelState,
        body: Mapping[str, Any],
        obj: LMIModel | None,
        invalid: str | None = None,
        options: Mapping[str, str] | None = None,
    ) -> Observed:
        spec = body.get("spec", {})
        hashes: dict[str, str] = {}
        # An invalid spec is not applied: no advice about its engine settings.
        mode: EngineMode | None = None
        batch_size: int | None = None
        nodes = 1
        selector = selector_string(selector_of(key[1]))
        if obj is not None:
            nodes = obj.spec.resources.nodes
            selector = selector_string(serving_selector(obj))
            hashes = rendered_config_hashes(st, obj, self.settings)
            desired = desired_replicas(obj.spec)
            gpus = obj.spec.resources.gpus
            gpu_resource = gpu_resource_of(obj.spec, self.settings)
            timeout = obj.spec.startup.timeout_seconds
            mode, batch_size = obj.spec.engine.mode, obj.spec.engine.max_rolling_batch_size
        else:
            desired = int(spec.get("replicas", 1)) if isinstance(spec.get("replicas", 1), int) else 1
            gpus, gpu_resource, timeout = 0, self.settings.gpu_resource_name, 3600
        pods = [p for p in st.pods.values() if not p["metadata"].get("deletionTimestamp")]
        return Observed(
            name=key[1],
            namespace=key[0],
            generation=int(body["metadata"].get("generation", 1)),
            desired_replicas=desired,
            gpus_per_replica=gpus,
            gpu_resource=gpu_resource,
            startup_timeout_seconds=timeout,
            # The workloads this generation renders; with an unread spec, whichever are there.
            deployments={
                str(d["metadata"]["name"]): d
                for kind in WORKLOAD_KINDS
                for d in st.of_kind(kind)
                if not hashes or d["metadata"]["name"] in hashes
            },
            deployment_generations=st.applied_generations,
            pods=pods,
            invalid_spec=invalid,
            engine_options=options or {},
            selector=selector,
            config_hashes=hashes,
            engine_mode=mode,
            max_rolling_batch_size=batch_size,
            profiles=profile_status(st.profile_plan, pods)
            if obj is not None and obj.spec.profiles and st.profile_plan is not None
            else None,
            nodes_per_replica=nodes,
            group_failures=dict(st.group_failures),
        )

    async def _write(self, key: Key, body: Mapping[str, Any], observed: Observed) -> dict[str, Any]:
        """Apply the status built from `observed` unless it is the status already there; return it."""
        previous = body.get("status") or {}
        status = build_status(observed, previous)
        self._track(key, next(c["reason"] for c in status["conditions"] if c["type"] == READY))
        if status == previous:
            return status
        applied = {"apiVersion": API_VERSION, "kind": KIND, "metadata": {"name": key[1], "namespace": key[0]}}
        try:
            # The whole status by server-side apply: what this manager applied before and leaves out
            # now (an option removed from the spec) is removed.
            updated = await self.client.apply(
                applied | {"status": status}, field_manager=STATUS_FIELD_MANAGER, subresource="status"
            )
            metrics.API_WRITES.labels("LMIModelStatus").inc()
            if (leftover := removals(updated.get("status") or {}, status)) is not None:
                # Keys another manager owns stay under an apply: those an older operator wrote by
                # merge patch. Once removed here, they are gone for good.
                path = object_path(API_VERSION, KIND, key[0], key[1]) + "/status"
                updated = await self.client.merge_patch(path, {"status": leftover})
                metrics.API_WRITES.labels("LMIModelStatus").inc()
        except ApiError as err:
            if err.status == 404:
                return status
            raise
        self.cache.written(key, updated)
        await self._record_transition(key, body, previous, status)
        return status

    def _track(self, key: Key, reason: str | None) -> None:
        """Keep the models-by-reason gauge current."""
        old = self._reasons.pop(key, None)
        if old is not None:
            metrics.MODELS.labels(old).dec()
        if reason is not None:
            self._reasons[key] = reason
            metrics.MODELS.labels(reason).inc()

    async def _record_transition(
        self, key: Key, body: Mapping[str, Any], previous: Mapping[str, Any], status: Mapping[str, Any]
    ) -> None:
        """An Event when the Ready condition changed its status or reason."""
        cond = next(c for c in status["conditions"] if c["type"] == READY)
        old = next((c for c in previous.get("conditions", []) if c["type"] == READY), None)
        if old is not None and (old.get("status"), old.get("reason")) == (cond["status"], cond["reason"]):
            return
        subject = Subject(key[0], key[1], body["metadata"].get("uid"))
        await self.events.record(subject, cond["reason"], cond["message"], cond["status"] == "True")
