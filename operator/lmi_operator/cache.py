"""What the operator has seen: each LMIModel, its children and its pods, fed by watch events.

Level-based, like client-go's informer caches: an event only updates the copy held here and tells
the owner which model to look at again (`on_spec` for the model or a child, `on_pods` for a pod).
Copies are slimmed (no managedFields) because thousands of them are kept. A model's entry goes once
it and everything it owned are gone, so memory follows the live models under churn."""

from __future__ import annotations

import asyncio
import datetime
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lmi_operator import metrics
from lmi_operator.api import API_VERSION, KIND
from lmi_operator.group_status import failed_container, group_of, group_ready
from lmi_operator.kube import ApiError, KubeClient, object_path
from lmi_operator.profile_plan import ProfilePlan
from lmi_operator.relist import RelistDetector
from lmi_operator.render import MANAGED_SELECTOR, MODEL_LABEL
from lmi_operator.render_inspect import INSPECTS_LABEL
from lmi_operator.render_lws import LWS_API_VERSION, LWS_KIND
from lmi_operator.workqueue import WorkQueue

log = logging.getLogger(__name__)
Key = tuple[str, str]

# Children the operator creates only in some cases, pruned when the spec no longer asks for them.
OPTIONAL_KINDS = {
    "PodDisruptionBudget": "policy/v1",
    "HorizontalPodAutoscaler": "autoscaling/v2",
    "PersistentVolumeClaim": "v1",
    # The inspection (render_inspect), only until the model's facts are in its status.
    "Job": "batch/v1",
}
# The kinds the operator watches, kind -> apiVersion; a re-list of LMIModels checks them all (a kind
# with nothing left to list yields no listing event of its own).
WATCHED_KINDS = {
    KIND: API_VERSION,
    "ConfigMap": "v1",
    "Service": "v1",
    "Deployment": "apps/v1",
    # Only where the cluster serves it (prerequisites): a sweep finds none where it does not.
    LWS_KIND: LWS_API_VERSION,
    **OPTIONAL_KINDS,
    "Pod": "v1",
}


def compare_versions(a: str, b: str) -> int | None:
    """-1, 0 or 1 as resourceVersion `a` is older than, the same as or newer than `b` (two versions
    of one resource), or None when either is not comparable.

    Kubernetes 1.35 made resourceVersions comparable (KEP-5504; client-go's CompareResourceVersion):
    a positive decimal integer of any length, without leading zeros. Anything else (an aggregated
    API server's own scheme) stays opaque: None, and the caller falls back on arrival order."""
    for v in (a, b):
        if not v.isascii() or not v.isdigit() or v.startswith("0"):
            return None
    if (len(a), a) == (len(b), b):
        return 0
    return -1 if (len(a), a) < (len(b), b) else 1


def _version(obj: Mapping[str, Any]) -> str:
    return str(obj.get("metadata", {}).get("resourceVersion", ""))


def not_older(incoming: Mapping[str, Any], cached: Mapping[str, Any] | None) -> bool:
    """Whether `incoming` may replace `cached`: it is not an older version of it. Watch events come
    in order, so only a write's answer racing them can be older; incomparable versions let the
    incoming copy win, as an informer's arrival order does."""
    if cached is None:
        return True
    order = compare_versions(_version(incoming), _version(cached))
    return order is None or order >= 0


def slim(obj: Mapping[str, Any]) -> dict[str, Any]:
    """A copy without metadata.managedFields, which is large and never read (memory at scale)."""
    meta = {k: v for k, v in obj.get("metadata", {}).items() if k != "managedFields"}
    return {**obj, "metadata": meta}


def pod_copy(pod: Mapping[str, Any]) -> dict[str, Any]:
    """What is kept of a pod: only its name, labels and status decide anything."""
    return {"metadata": slim(pod)["metadata"], "status": pod.get("status", {})}


def key_of(obj: Mapping[str, Any]) -> Key:
    """(namespace, name) of an object."""
    meta = obj["metadata"]
    return meta.get("namespace", ""), meta["name"]


def owner_key(obj: Mapping[str, Any]) -> Key | None:
    """The LMIModel that controls a child, from its controller owner reference or model label."""
    meta = obj.get("metadata", {})
    for ref in meta.get("ownerReferences", []):
        if ref.get("kind") == KIND and ref.get("apiVersion", "").startswith(API_VERSION.split("/")[0]):
            return meta.get("namespace", ""), ref["name"]
    labels = meta.get("labels", {})
    if name := labels.get(MODEL_LABEL) or labels.get(INSPECTS_LABEL):
        return meta.get("namespace", ""), name
    return None


def _created_before(obj: Mapping[str, Any], moment: float) -> bool:
    stamp = obj.get("metadata", {}).get("creationTimestamp")
    if not stamp:
        return False
    # RFC 3339 to the second: a model created in this replica's first second counts as older.
    return datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp() <= moment


@dataclass
class ModelState:
    """What the operator has seen of one LMIModel and its children."""

    model: dict[str, Any] | None = None
    # By (kind, name): a model may have several children of one kind, and a child named anew (the
    # inspection Job of a new source) is another object than its predecessor.
    children: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    pods: dict[str, dict[str, Any]] = field(default_factory=dict)
    # The pods of the inspection Job (render_inspect), apart from the model server's.
    inspection_pods: dict[str, dict[str, Any]] = field(default_factory=dict)
    # The generation the operator last applied to each Deployment (by name): the rollout that counts.
    applied_generations: dict[str, int] = field(default_factory=dict)
    # Why the API server refused what the spec renders to, for status (None: nothing refused).
    apply_error: str | None = None
    # ((uid, generation), config hash by Deployment name) of the pod templates that generation renders.
    config_hashes: tuple[tuple[str, int], dict[str, str]] | None = None
    # The replicas of each profile as last planned (profile_check; None without spec.profiles).
    profile_plan: ProfilePlan | None = None
    # ((uid, generation), name) of the inspection Job that generation renders to.
    inspect_job: tuple[tuple[str, int], str] | None = None
    # The last pod seen failed in each LeaderWorkerSet group (by group index), until the group is
    # whole and Ready again: LeaderWorkerSet deletes it with its group (group_status).
    group_failures: dict[str, dict[str, Any]] = field(default_factory=dict)

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        """The cached objects of `kind` (LMIModel, Pod or a child kind)."""
        if kind == KIND:
            return [self.model] if self.model is not None else []
        if kind == "Pod":
            return [*self.pods.values(), *self.inspection_pods.values()]
        return [child for (k, _), child in self.children.items() if k == kind]


class ModelCache:
    """The observed objects, by owning model. `on_spec(key)` is called when a model or one of its
    children changed (its children may need applying), `on_pods(key)` when one of its pods did,
    `on_deleted(key)` when the model was deleted."""

    def __init__(
        self,
        client: KubeClient,
        namespaces: Sequence[str],
        on_spec: Callable[[Key], None],
        on_pods: Callable[[Key], None],
        on_deleted: Callable[[Key], None],
    ) -> None:
        self.client = client
        self.namespaces = tuple(namespaces)
        self.models: dict[Key, ModelState] = {}
        self._on_spec = on_spec
        self._on_pods = on_pods
        self._on_deleted = on_deleted
        # Built when this replica starts acting (after the Lease, before the watches).
        self.started_at = time.time()
        self.relists = RelistDetector(self._relisted)
        # Re-listed kinds to compare with a fresh list of their own, one at a time.
        self.sweeps: WorkQueue[str] = WorkQueue(self.sweep, workers=1)

    def __iter__(self) -> Iterator[tuple[Key, ModelState]]:
        return iter(list(self.models.items()))

    def state(self, key: Key) -> ModelState:
        """The entry of one model, created empty if absent."""
        st = self.models.get(key)
        if st is None:
            st = self.models[key] = ModelState()
            metrics.CACHED_MODELS.set(len(self.models))
        return st

    def current(self, key: Key) -> ModelState | None:
        """The entry of a model that exists and is not being deleted, else None."""
        st = self.models.get(key)
        if st is None or st.model is None or st.model["metadata"].get("deletionTimestamp"):
            return None
        return st

    def _forget_if_gone(self, key: Key) -> bool:
        st = self.models.get(key)
        if st is None or st.model is not None or st.children or st.pods or st.inspection_pods:
            return False
        del self.models[key]
        metrics.CACHED_MODELS.set(len(self.models))
        return True

    # -- watch events -------------------------------------------------------------------------------

    def observe_model(self, obj: dict[str, Any], deleted: bool, listed: bool = False) -> None:
        """An LMIModel was added, changed or deleted (`listed`: seen in a listing, not a watch)."""
        self.relists.observe(KIND, listed)
        key = key_of(obj)
        st = self.state(key)
        if deleted:
            st.model = None
            self._on_deleted(key)
            self._forget_if_gone(key)
            return
        if not_older(obj, st.model):
            st.model = slim(obj)
        self._on_spec(key)

    def observe_child(self, obj: dict[str, Any], deleted: bool, listed: bool = False) -> None:
        """A ConfigMap, Service, Deployment, PDB or HPA labelled as ours changed."""
        self.relists.observe(obj["kind"], listed)
        key = owner_key(obj)
        if key is None:
            return
        st = self.state(key)
        child = (obj["kind"], obj["metadata"]["name"])
        if deleted:
            st.children.pop(child, None)
            if self._forget_if_gone(key):
                return
        elif not_older(obj, st.children.get(child)):
            st.children[child] = slim(obj)
        self._on_spec(key)

    def observe_pod(self, obj: dict[str, Any], deleted: bool, listed: bool = False) -> None:
        """A model server pod, or an inspection pod, changed."""
        self.relists.observe("Pod", listed)
        key = owner_key(obj)
        if key is None:
            return
        st = self.state(key)
        name = obj["metadata"]["name"]
        inspection = INSPECTS_LABEL in obj["metadata"].get("labels", {})
        pods = st.inspection_pods if inspection else st.pods
        if deleted:
            pods.pop(name, None)
            if self._forget_if_gone(key):
                return
        else:
            pods[name] = pod_copy(obj)
            if not inspection:
                self._remember_group_failure(st, pods[name])
        # An inspection's end decides whether the Deployment may be created: the children's queue.
        (self._on_spec if inspection else self._on_pods)(key)

    @staticmethod
    def _remember_group_failure(st: ModelState, pod: dict[str, Any]) -> None:
        if (group := group_of(pod)) is None:
            return
        if failed_container(pod) is not None:
            st.group_failures[group] = pod
        elif group in st.group_failures and group_ready(st.pods.values(), group):
            del st.group_failures[group]

    # -- what this replica wrote --------------------------------------------------------------------

    def written(self, key: Key, obj: Mapping[str, Any]) -> None:
        """Keep the API server's answer to a write of a child or the model, unless a watch event
        already brought a newer copy (say, with the status a controller wrote meanwhile). An answer
        that comes after the model's deletion was seen brings nothing back: a write in flight must
        not resurrect a deleted model (or its state) in the cache."""
        st = self.models.get(key)
        kind = obj["kind"]
        if st is None or (kind == KIND and st.model is None):
            return
        if kind == KIND:
            if not_older(obj, st.model):
                st.model = slim(obj)
        elif not_older(obj, st.children.get(child := (kind, obj["metadata"]["name"]))):
            st.children[child] = slim(obj)

    async def read_missing(self, key: Key, wanted: list[tuple[str, str, str]]) -> None:
        """Read the children in `wanted` (apiVersion, kind, name) that are not cached, when they may
        exist: the model was reconciled before (by another replica, or before a restart; its children
        may exist though its status was not written yet) and a child's event may not have come yet,
        as when the model's or its pods' events beat the children's initial list."""
        st = self.models.get(key)
        if st is None or st.model is None:
            return
        missing = [w for w in wanted if (w[1], w[2]) not in st.children]
        if not missing or not (st.model.get("status") or _created_before(st.model, self.started_at)):
            return
        found = await asyncio.gather(*(self.client.get(object_path(a, k, key[0], n)) for a, k, n in missing))
        for (_, kind, name), live in zip(missing, found, strict=True):
            if live is not None and (kind, name) not in st.children:
                st.children[kind, name] = slim(live)

    async def read_inspection_pods(self, key: Key, job: str) -> None:
        """Read the pods of the inspection Job `job` when none is cached: the Job finished (its
        result is in its pod) but the pods' initial list has not come yet, as after a restart."""
        st = self.models.get(key)
        if st is None or any(
            p["metadata"].get("labels", {}).get("job-name") == job for p in st.inspection_pods.values()
        ):
            return
        path = object_path("v1", "Pod", key[0])
        for pod in (await self.client.request("GET", path, params={"labelSelector": f"job-name={job}"}))[
            "items"
        ]:
            if INSPECTS_LABEL in pod["metadata"].get("labels", {}):
                st.inspection_pods[pod["metadata"]["name"]] = pod_copy(pod)

    # -- re-lists -----------------------------------------------------------------------------------

    def _relisted(self, kind: str) -> None:
        for swept in WATCHED_KINDS if kind == KIND else (kind,):
            self.sweeps.add(swept)

    async def sweep(self, kind: str) -> None:
        """Forget the cached objects of `kind` that a fresh list no longer holds, as deleted.

        Only objects no newer than the list count: a newer one may simply postdate it (an object
        whose version is not comparable with the list's is kept: its absence proves nothing)."""
        params = {} if kind == KIND else {"labelSelector": MANAGED_SELECTOR}
        present: set[Key] = set()
        listed_at: dict[str | None, str] = {}
        for namespace in self.namespaces or (None,):
            path = object_path(WATCHED_KINDS[kind], kind, namespace)
            try:
                body = await self.client.request("GET", path, params=params)
            except ApiError as err:
                if err.status != 404:
                    raise
                body = {}  # a kind the cluster does not serve (LeaderWorkerSet): none exists
            listed_at[namespace] = _version(body)
            present.update(key_of(item) for item in body.get("items", []))
        gone = [
            obj
            for key, st in self
            if (bound := listed_at.get(key[0], listed_at.get(None))) is not None
            for obj in st.of_kind(kind)
            if key_of(obj) not in present and compare_versions(_version(obj), bound) in (-1, 0)
        ]
        forget = {KIND: self.observe_model, "Pod": self.observe_pod}.get(kind, self.observe_child)
        for obj in gone:
            forget(obj, True)
        if gone:
            log.info("a re-list of %s: %d cached objects no longer exist", kind, len(gone))
