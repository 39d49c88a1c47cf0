"""The reconcile loop: keeps each LMIModel's children applied and its status true.

Level-based: watch events only update in-memory copies of the objects and queue the owning
model's key; one reconcile per key at a time compares desired with observed state and writes only
what differs. An unchanged world therefore costs no API request at all."""

from __future__ import annotations

import asyncio
import datetime
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from lmi_operator import metrics
from lmi_operator.api import API_VERSION, KIND, InvalidLMIModel, LMIModel, parse_lmimodel
from lmi_operator.drift import contains
from lmi_operator.engine_options import check_options
from lmi_operator.events import EventRecorder, Subject
from lmi_operator.kube import ApiError, KubeClient, object_path
from lmi_operator.properties import lmi_options
from lmi_operator.relist import RelistDetector
from lmi_operator.render import (
    APPLIED_HASH,
    CONFIG_HASH,
    MANAGED_SELECTOR,
    MODEL_LABEL,
    desired_replicas,
    gpu_resource_of,
    render,
    selector_of,
    selector_string,
)
from lmi_operator.settings import OperatorSettings
from lmi_operator.status import INSUFFICIENT_GPU, READY, Observed, build_status, problem_of
from lmi_operator.workqueue import WorkQueue

log = logging.getLogger(__name__)
Key = tuple[str, str]

# Children the operator creates only in some cases, pruned when the spec no longer asks for them.
OPTIONAL_KINDS = {
    "PodDisruptionBudget": "policy/v1",
    "HorizontalPodAutoscaler": "autoscaling/v2",
}
# How often to look again at a model whose pods are loading (to notice a StartupTimeout) or whose
# Secret is missing (Secrets are not watched, by design).
RECHECK_SECONDS = 30.0
# The kinds the operator watches, kind -> apiVersion; a re-list of LMIModels checks them all (a kind
# with nothing left to list yields no listing event of its own).
WATCHED_KINDS = {
    KIND: API_VERSION,
    "ConfigMap": "v1",
    "Service": "v1",
    "Deployment": "apps/v1",
    **OPTIONAL_KINDS,
    "Pod": "v1",
}


def _rv(obj: Mapping[str, Any]) -> int:
    try:
        return int(obj.get("metadata", {}).get("resourceVersion", "0"))
    except ValueError:
        return 0


def namespace_going(err: ApiError) -> bool:
    """Whether the API refused because the namespace is gone or being deleted (not for want of RBAC).

    The model goes with its namespace: nothing to create, nothing to retry.
    """
    return err.status == 404 or (err.status == 403 and "being terminated" in err.message)


def _created_before(obj: Mapping[str, Any], moment: float) -> bool:
    stamp = obj.get("metadata", {}).get("creationTimestamp")
    if not stamp:
        return False
    # RFC 3339 to the second: a model created in this replica's first second counts as older.
    return datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp() <= moment


def slim(obj: Mapping[str, Any]) -> dict[str, Any]:
    """A copy without metadata.managedFields, which is large and never read (memory at scale)."""
    meta = {k: v for k, v in obj.get("metadata", {}).items() if k != "managedFields"}
    return {**obj, "metadata": meta}


def rendered_config_hash(obj: LMIModel, settings: OperatorSettings) -> str:
    """The config hash on the pod template of the Deployment rendered from `obj`'s spec."""
    deployment = next(d for d in render(obj, settings).objects if d["kind"] == "Deployment")
    return str(deployment["spec"]["template"]["metadata"]["annotations"][CONFIG_HASH])


def drifted(live: Mapping[str, Any] | None, desired: Mapping[str, Any]) -> bool:
    """Whether `desired` must be applied: the child is missing, was applied from another rendering
    (its hash annotation differs: fields were added or removed), or was edited by hand since."""
    if live is None:
        return True
    applied = live.get("metadata", {}).get("annotations", {}).get(APPLIED_HASH)
    return applied != desired["metadata"]["annotations"][APPLIED_HASH] or not contains(live, desired)


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


def _key_of(obj: Mapping[str, Any]) -> Key:
    meta = obj["metadata"]
    return meta.get("namespace", ""), meta["name"]


def owner_key(obj: Mapping[str, Any]) -> Key | None:
    """The LMIModel that controls a child, from its controller owner reference or model label."""
    meta = obj.get("metadata", {})
    for ref in meta.get("ownerReferences", []):
        if ref.get("kind") == KIND and ref.get("apiVersion", "").startswith(API_VERSION.split("/")[0]):
            return meta.get("namespace", ""), ref["name"]
    if name := meta.get("labels", {}).get(MODEL_LABEL):
        return meta.get("namespace", ""), name
    return None


@dataclass
class ModelState:
    """What the operator has seen of one LMIModel and its children."""

    model: dict[str, Any] | None = None
    children: dict[str, dict[str, Any]] = field(default_factory=dict)
    pods: dict[str, dict[str, Any]] = field(default_factory=dict)
    applied_generation: int | None = None
    apply_error: str | None = None


def _cached(st: ModelState, kind: str) -> list[dict[str, Any]]:
    """The cached objects of `kind` that belong to one model."""
    if kind == KIND:
        return [st.model] if st.model is not None else []
    if kind == "Pod":
        return list(st.pods.values())
    return [st.children[kind]] if kind in st.children else []


class Reconciler:
    """Holds the observed objects and reconciles LMIModels from them through a work queue."""

    def __init__(self, client: KubeClient, settings: OperatorSettings) -> None:
        self.client = client
        self.settings = settings
        self.events = EventRecorder(client)
        self.state: dict[Key, ModelState] = {}
        self.queue: WorkQueue[Key] = WorkQueue(self.reconcile, workers=settings.workers)
        self.status_queue: WorkQueue[Key] = WorkQueue(self.report, workers=max(2, settings.workers // 2))
        self.last_progress = time.monotonic()
        # Built when this replica starts acting (after the Lease, before the watches).
        self.started_at = time.time()
        self._free_gpus: tuple[float, dict[str, int]] | None = None
        self._reasons: dict[Key, str] = {}
        self.sweeps: WorkQueue[str] = WorkQueue(self.sweep, workers=1)
        self.relists = RelistDetector(self._relisted)

    # -- observations (from watch events) ---------------------------------------------------------

    def _state(self, key: Key) -> ModelState:
        return self.state.setdefault(key, ModelState())

    def _forget_if_gone(self, key: Key) -> bool:
        """Drop a model's state once it and everything it owned are gone (memory under churn)."""
        st = self.state.get(key)
        if st is None or st.model is not None or st.children or st.pods:
            return False
        del self.state[key]
        return True

    def observe_model(self, obj: dict[str, Any], deleted: bool, listed: bool = False) -> None:
        """An LMIModel was added, changed or deleted (`listed`: seen in a listing, not a watch)."""
        self.relists.observe(KIND, listed)
        key = _key_of(obj)
        st = self._state(key)
        if deleted:
            st.model = None
            self._track(key, None)
            self._forget_if_gone(key)
            return
        if st.model is None or _rv(obj) >= _rv(st.model):
            st.model = slim(obj)
        self.queue.add(key)

    def observe_child(self, obj: dict[str, Any], deleted: bool, listed: bool = False) -> None:
        """A ConfigMap, Service, Deployment, PDB or HPA labelled as ours changed."""
        self.relists.observe(obj["kind"], listed)
        key = owner_key(obj)
        if key is None:
            return
        st = self._state(key)
        kind = obj["kind"]
        if deleted:
            st.children.pop(kind, None)
            if self._forget_if_gone(key):
                return
        elif kind not in st.children or _rv(obj) >= _rv(st.children[kind]):
            st.children[kind] = slim(obj)
        self.queue.add(key)

    def observe_pod(self, obj: dict[str, Any], deleted: bool, listed: bool = False) -> None:
        """A model server pod changed."""
        self.relists.observe("Pod", listed)
        key = owner_key(obj)
        if key is None:
            return
        st = self._state(key)
        name = obj["metadata"]["name"]
        if deleted:
            st.pods.pop(name, None)
            if self._forget_if_gone(key):
                return
        else:
            # Only the pod's name, labels and status decide anything: keep just those.
            st.pods[name] = {"metadata": slim(obj)["metadata"], "status": obj.get("status", {})}
        self.status_queue.add(key)

    # -- reconcile ----------------------------------------------------------------------------------

    async def run(self) -> None:
        """Process both queues until cancelled."""
        async with asyncio.TaskGroup() as group:
            group.create_task(self.queue.run())
            group.create_task(self.status_queue.run())
            group.create_task(self.sweeps.run())

    def _relisted(self, kind: str) -> None:
        for swept in WATCHED_KINDS if kind == KIND else (kind,):
            self.sweeps.add(swept)

    async def sweep(self, kind: str) -> None:
        """Forget the cached objects of `kind` that a fresh list no longer holds, as deleted.

        Only objects at least as old as the list count: a newer one may simply postdate it."""
        params = {} if kind == KIND else {"labelSelector": MANAGED_SELECTOR}
        present: set[Key] = set()
        bound: dict[str | None, int] = {}
        for namespace in self.settings.namespaces or (None,):
            path = object_path(WATCHED_KINDS[kind], kind, namespace)
            body = await self.client.request("GET", path, params=params)
            bound[namespace] = _rv(body)
            present.update(_key_of(item) for item in body.get("items", []))
        gone = [
            obj
            for key, st in self.state.items()
            if (limit := bound.get(key[0], bound.get(None))) is not None
            for obj in _cached(st, kind)
            if _key_of(obj) not in present and _rv(obj) <= limit
        ]
        forget = {KIND: self.observe_model, "Pod": self.observe_pod}.get(kind, self.observe_child)
        for obj in gone:
            forget(obj, True)
        if gone:
            log.info("a re-list of %s: %d cached objects no longer exist", kind, len(gone))

    def pending(self) -> int:
        """Keys waiting or in flight in either queue."""
        return len(self.queue) + len(self.status_queue)

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

    async def reconcile(self, key: Key) -> None:
        """Bring one LMIModel's children in line with its spec, then queue its status."""
        await self._timed("children", key, self._reconcile)

    async def report(self, key: Key) -> None:
        """Write one LMIModel's status from what is observed now."""
        await self._timed("status", key, self._report)

    def _parse(self, body: Mapping[str, Any]) -> tuple[LMIModel | None, str | None]:
        try:
            obj = parse_lmimodel(body)
        except InvalidLMIModel as err:
            return None, str(err)
        return obj, check_options(obj.spec.engine.options)

    def _current(self, key: Key) -> ModelState | None:
        st = self.state.get(key)
        if st is None or st.model is None or st.model["metadata"].get("deletionTimestamp"):
            return None
        return st

    async def _reconcile(self, key: Key) -> None:
        st = self._current(key)
        if st is None or st.model is None:
            return
        obj, invalid = self._parse(st.model)
        if obj is None or invalid is not None:
            # Nothing is applied from an invalid spec: what runs keeps running as it was.
            self.status_queue.add(key)
            return

        rendered = render(obj, self.settings)
        await self._read_missing(
            key, st, [(d["apiVersion"], d["kind"], d["metadata"]["name"]) for d in rendered.objects]
        )
        stale = [d for d in rendered.objects if drifted(st.children.get(d["kind"]), d)]
        # Independent objects: apply them together (a pod waits for its ConfigMap by itself).
        results = await asyncio.gather(*(self.client.apply(d) for d in stale), return_exceptions=True)
        st.apply_error = None
        for desired, result in zip(stale, results, strict=True):
            if isinstance(result, ApiError) and namespace_going(result):
                return
            if isinstance(result, ApiError) and result.status in (400, 422):
                # The API server refuses what the spec renders to: retrying cannot help, say why.
                st.apply_error = f"the {desired['kind']} rendered from the spec was refused: {result.message}"
                continue
            if isinstance(result, BaseException):
                raise result
            metrics.API_WRITES.labels(desired["kind"]).inc()
            # A watch event may have brought a newer copy (say, with the status the controller
            # wrote) while the apply was in flight: keep the newer one.
            current = st.children.get(desired["kind"])
            if current is None or _rv(result) >= _rv(current):
                st.children[desired["kind"]] = slim(result)
            if desired["kind"] == "Deployment":
                st.applied_generation = result["metadata"].get("generation")
        wanted = {o["kind"] for o in rendered.objects}
        for kind, api_version in OPTIONAL_KINDS.items():
            if kind in st.children and kind not in wanted:
                await self._delete(api_version, kind, key)
                st.children.pop(kind, None)
        # Status has its own queue, so that a burst of new models gets its Deployments first.
        self.status_queue.add(key)

    async def _read_missing(self, key: Key, st: ModelState, wanted: list[tuple[str, str, str]]) -> None:
        """Read the children in `wanted` (apiVersion, kind, name) that are not in the cache, when they
        may exist: the model was reconciled before (by another replica, or before a restart; its
        children may exist though its status was not written yet) and a child's event may not have come
        yet, as when the model's or its pods' events beat the children's initial list."""
        missing = [w for w in wanted if w[1] not in st.children]
        if not missing or st.model is None:
            return
        if not (st.model.get("status") or _created_before(st.model, self.started_at)):
            return
        found = await asyncio.gather(*(self.client.get(object_path(a, k, key[0], n)) for a, k, n in missing))
        for (_, kind, _), live in zip(missing, found, strict=True):
            if live is not None and kind not in st.children:
                st.children[kind] = slim(live)

    async def _report(self, key: Key) -> None:
        st = self._current(key)
        if st is None or st.model is None:
            return
        body = st.model
        obj, invalid = self._parse(body)
        invalid = invalid or st.apply_error
        if obj is None or invalid is not None:
            await self._write_status(key, body, self._observed(key, body, None, invalid=invalid))
            return
        # Status read from a partial cache would be rewritten for nothing (then back): see the Deployment.
        await self._read_missing(key, st, [("apps/v1", "Deployment", key[1])])
        missing = await self._missing_secret(obj)
        observed = self._observed(key, body, obj, missing_secret=missing, options=lmi_options(obj.spec))
        problem = problem_of(observed)
        if problem is not None and problem.reason == INSUFFICIENT_GPU:
            observed = self._with_free_gpus(observed, await self._free_gpus_by_node(observed.gpu_resource))
        await self._write_status(key, body, observed)
        ready = next(c for c in self._status_of(st)["conditions"] if c["type"] == READY)
        if ready["status"] != "True" and (st.pods or missing):
            self.status_queue.add_after(key, RECHECK_SECONDS)

    def _status_of(self, st: ModelState) -> dict[str, Any]:
        status: dict[str, Any] = (st.model or {}).get("status") or {}
        return status

    def _observed(
        self,
        key: Key,
        body: Mapping[str, Any],
        obj: LMIModel | None,
        invalid: str | None = None,
        missing_secret: str | None = None,
        options: Mapping[str, str] | None = None,
    ) -> Observed:
        st = self._state(key)
        spec = body.get("spec", {})
        deployment = st.children.get("Deployment")
        config_hash = None
        if obj is not None:
            config_hash = rendered_config_hash(obj, self.settings)
            desired = desired_replicas(obj.spec)
            gpus = obj.spec.resources.gpus
            gpu_resource = gpu_resource_of(obj.spec, self.settings)
            timeout = obj.spec.startup.timeout_seconds
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
            deployment=deployment,
            deployment_generation=st.applied_generation,
            pods=pods,
            invalid_spec=invalid,
            missing_secret=missing_secret,
            engine_options=options or {},
            selector=selector_string(selector_of(key[1])),
            config_hash=config_hash,
        )

    @staticmethod
    def _with_free_gpus(observed: Observed, free: dict[str, int]) -> Observed:
        return Observed(**{**observed.__dict__, "free_gpus_by_node": free})

    async def _write_status(self, key: Key, body: Mapping[str, Any], observed: Observed) -> None:
        st = self._state(key)
        previous = body.get("status") or {}
        status = build_status(observed, previous)
        self._track(key, next(c["reason"] for c in status["conditions"] if c["type"] == READY))
        if status == previous:
            return
        path = object_path(API_VERSION, KIND, key[0], key[1]) + "/status"
        applied = {"apiVersion": API_VERSION, "kind": KIND, "metadata": {"name": key[1], "namespace": key[0]}}
        try:
            # The whole status by server-side apply: what this manager applied before and leaves out
            # now (an option removed from the spec) is removed.
            updated = await self.client.apply_status(applied | {"status": status})
            metrics.API_WRITES.labels("LMIModelStatus").inc()
            if (leftover := removals(updated.get("status") or {}, status)) is not None:
                # Keys another manager owns stay under an apply: those an older operator wrote by
                # merge patch. Once removed here, they are gone for good.
                updated = await self.client.merge_patch(path, {"status": leftover})
                metrics.API_WRITES.labels("LMIModelStatus").inc()
        except ApiError as err:
            if err.status == 404:
                return
            raise
        if st.model is None or _rv(updated) >= _rv(st.model):
            st.model = slim(updated)
        await self._record_transitions(key, body, previous, status)

    def _track(self, key: Key, reason: str | None) -> None:
        """Keep the models-by-reason gauge current."""
        old = self._reasons.pop(key, None)
        if old is not None:
            metrics.MODELS.labels(old).dec()
        if reason is not None:
            self._reasons[key] = reason
            metrics.MODELS.labels(reason).inc()

    async def _record_transitions(
        self, key: Key, body: Mapping[str, Any], previous: Mapping[str, Any], status: Mapping[str, Any]
    ) -> None:
        before = {c["type"]: c for c in previous.get("conditions", [])}
        for cond in status["conditions"]:
            if cond["type"] != READY:
                continue
            old = before.get(READY)
            if (
                old is not None
                and old.get("status") == cond["status"]
                and old.get("reason") == cond["reason"]
            ):
                continue
            subject = Subject(key[0], key[1], body["metadata"].get("uid"))
            await self.events.record(subject, cond["reason"], cond["message"], cond["status"] == "True")

    async def _delete(self, api_version: str, kind: str, key: Key) -> None:
        try:
            await self.client.request("DELETE", object_path(api_version, kind, key[0], key[1]))
            metrics.API_WRITES.labels(kind).inc()
        except ApiError as err:
            if err.status != 404:
                raise

    async def _missing_secret(self, obj: LMIModel) -> str | None:
        ref = obj.spec.model.hf_token_secret_ref
        if ref is None:
            return None
        namespace = str(obj.metadata.namespace)
        secret = await self.client.get(object_path("v1", "Secret", namespace, ref.name))
        if secret is None:
            return f"spec.model.hfTokenSecretRef: Secret {ref.name!r} not found in namespace {namespace!r}"
        if ref.key not in (secret.get("data") or {}):
            return f"spec.model.hfTokenSecretRef: Secret {ref.name!r} has no key {ref.key!r}"
        return None

    async def _free_gpus_by_node(self, gpu_resource: str) -> dict[str, int]:
        """Unallocated GPUs per schedulable node; cached briefly, since only shortage reports need it."""
        now = time.monotonic()
        if self._free_gpus is not None and now - self._free_gpus[0] < 10:
            return self._free_gpus[1]
        nodes = await self.client.list("/api/v1/nodes")
        free: dict[str, int] = {}
        for node in nodes:
            gpus = int(node.get("status", {}).get("allocatable", {}).get(gpu_resource, "0") or 0)
            if gpus and not node.get("spec", {}).get("unschedulable"):
                free[node["metadata"]["name"]] = gpus
        pods = await self.client.list(
            "/api/v1/pods", fieldSelector="status.phase!=Succeeded,status.phase!=Failed"
        )
        for pod in pods:
            node_name = pod.get("spec", {}).get("nodeName")
            if node_name not in free:
                continue
            for c in pod["spec"].get("containers", []):
                free[node_name] -= int(c.get("resources", {}).get("requests", {}).get(gpu_resource, "0") or 0)
        self._free_gpus = (now, free)
        return free
