"""Gathers what the memory fit of one model is judged from (its recorded or freshly inspected facts,
its engine settings, the GPU types it may land on) and asks fit_status to judge. The children's
reconcile uses the answer to hold the Deployment back, the status report to write FitsGPUMemory.

Models of one namespace with the same source (spec.model and spec.env alike: the same files, read
the same way) share one inspection: the oldest of them runs the Job and the others take its result.
A fleet of models of one base model then costs one Job, not one per model (bench/operator_scale.py
creates 200 such models at once). The owner is chosen from what is cached (level-based: the same
owner after a restart); when it goes, the next oldest inspects. When the owner's result comes, the
models that wait for it are queued again (`notify`)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any

from lmi_operator.api import LMIModel, LMIModelSpec
from lmi_operator.cache import Key, ModelCache, ModelState
from lmi_operator.capacity import engine_of
from lmi_operator.fit_status import FitReport, Inspection, combine, inspection_of, judge, source_of
from lmi_operator.gpu_capacity import GpuCapacity
from lmi_operator.properties import lmi_options
from lmi_operator.render import gpu_resource_of, render
from lmi_operator.settings import OperatorSettings

Share = tuple[str, str]  # (namespace, digest of what the source is read with)


def share_of(key: Key, obj: LMIModel) -> Share:
    """Models with the same share read the same files the same way: spec.model and spec.env."""
    spec = obj.spec
    parts = [spec.model.model_dump(by_alias=True), [e.model_dump(by_alias=True) for e in spec.env]]
    return key[0], hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def _recorded(st: ModelState) -> dict[str, Any] | None:
    """The status.modelFacts of a cached model, if any."""
    facts: dict[str, Any] | None = ((st.model or {}).get("status") or {}).get("modelFacts")
    return facts


class FitCheck:
    """Judges models that ask for GPUs; a CPU model (resources.gpus 0) is not judged (None)."""

    def __init__(
        self,
        cache: ModelCache,
        gpus: GpuCapacity,
        settings: OperatorSettings,
        notify: Callable[[Key], None] = lambda _: None,
    ) -> None:
        self.cache = cache
        self.gpus = gpus
        self.settings = settings
        self.notify = notify
        self._members: dict[Share, set[Key]] = {}
        self._share: dict[Key, Share] = {}
        # Shares whose owner's result was announced to the others (and which result: facts or error).
        self._announced: dict[Share, str] = {}

    async def judge(self, key: Key, obj: LMIModel) -> FitReport | None:
        """The fit of `obj` as observed in its cache entry: of its spec, or of each of its profiles."""
        spec = obj.spec
        if not spec.resources.gpus:
            self.forget(key)
            return None
        inspection, job = await self._inspection(key, obj)
        if not spec.profiles:
            return await self._fit(spec, inspection, job)
        return combine({p.name: await self._fit(spec.for_profile(p), inspection, job) for p in spec.profiles})

    async def _fit(self, spec: LMIModelSpec, inspection: Inspection, job: str) -> FitReport:
        """The fit of `spec` on the GPU types of the nodes its node selector admits."""
        selector = spec.scheduling.node_selector if spec.scheduling else {}
        types = await self.gpus.gpu_types(gpu_resource_of(spec, self.settings), selector)
        return judge(inspection, engine_of(lmi_options(spec), spec.resources.gpus), types, job)

    async def _inspection(self, key: Key, obj: LMIModel) -> tuple[Inspection, str]:
        """What is known of the model's facts (recorded, its own Job's, or its share owner's), and
        what names its inspection."""
        spec = obj.spec
        st = self.cache.state(key)
        job = self._job_name(st, obj)
        recorded = _recorded(st)
        source = (spec.model.id, spec.model.revision)
        if source_of(recorded) == source:
            inspection = Inspection(facts=recorded, job_needed=False)
        else:
            share = self._join(key, share_of(key, obj))
            owner = self._owner(key, share)
            if owner == key:
                inspection = await self._own(key, st, job, obj)
                self._announce(key, share, inspection)
            else:
                inspection, job = self._borrowed(owner, source)
        return inspection, job

    def forget(self, key: Key) -> None:
        """`key` no longer takes part in any share (deleted, another source, or a CPU model now). If
        it owned the share's inspection, the next oldest member is queued to take it over: nothing
        else would tell it (the Job that goes with the owner is the owner's child, not its). A
        deleted model's age is no longer known: its leaving always queues the oldest one left."""
        if (share := self._share.pop(key, None)) is not None:
            members = self._members.get(share, set())
            members.discard(key)
            if not members:
                self._members.pop(share, None)
                self._announced.pop(share, None)
            elif self._age(key) < min(map(self._age, members)):
                # The new owner's result is announced anew, whatever the former owner's was.
                self._announced.pop(share, None)
                self.notify(min(members, key=self._age))

    def _join(self, key: Key, share: Share) -> Share:
        if self._share.get(key) != share:
            self.forget(key)
            self._share[key] = share
            self._members.setdefault(share, set()).add(key)
        return share

    def _age(self, key: Key) -> tuple[str, str]:
        """What orders a share's members: creation time, then name (a model no longer cached, as
        one just deleted, sorts by its name alone, before the others)."""
        st = self.cache.current(key)
        stamp = str(((st.model if st else None) or {}).get("metadata", {}).get("creationTimestamp", ""))
        return stamp, key[1]

    def _owner(self, key: Key, share: Share) -> Key:
        """The oldest cached model of the share (creation time, then name); `key` is one of them."""
        gone = [k for k in self._members.get(share, ()) if k != key and self.cache.current(k) is None]
        for k in gone:
            self.forget(k)
        return min(self._members.get(share, set()) | {key}, key=self._age)

    async def _own(self, key: Key, st: ModelState, job: str, obj: LMIModel) -> Inspection:
        """What this model's own inspection Job says."""
        # Judged from a partial cache (after a restart), a finished inspection would read as
        # running and its verdict would be rewritten for nothing: read what is not cached yet.
        await self.cache.read_missing(key, [("batch/v1", "Job", job)])
        mine = st.children.get(("Job", job))
        if mine is not None and mine.get("status", {}).get("conditions"):
            await self.cache.read_inspection_pods(key, job)
        return inspection_of(
            mine, list(st.inspection_pods.values()), obj.spec.model.id, obj.spec.model.revision
        )

    def _borrowed(self, owner: Key, source: tuple[str, str | None]) -> tuple[Inspection, str]:
        """What the owner of the share knows (its recorded facts, else its Job's result), and what
        names the inspection in messages."""
        st = self.cache.current(owner)
        assert st is not None  # _owner keeps only cached models
        named = (
            f"{st.inspect_job[1] if st.inspect_job else 'the inspection'} (of model {owner[1]}, same source)"
        )
        recorded = _recorded(st)
        if source_of(recorded) == source:
            return Inspection(facts=recorded, job_needed=False), named
        job = st.children.get(("Job", st.inspect_job[1])) if st.inspect_job else None
        if job is None:
            return Inspection(job_needed=False), named
        found = inspection_of(job, list(st.inspection_pods.values()), *source)
        error = f"{named}: {found.error}" if found.error is not None else None
        return Inspection(found.facts, error, job_needed=False, waiting=found.waiting), named

    def _announce(self, key: Key, share: Share, inspection: Inspection) -> None:
        """Queue the models waiting for this owner's result, once per result."""
        result = "facts" if inspection.facts is not None else "error" if inspection.error is not None else ""
        if result and self._announced.get(share) != result:
            self._announced[share] = result
            # The share may have been left meanwhile (the queues judge concurrently; reads await).
            for member in self._members.get(share, set()) - {key}:
                self.notify(member)

    def _job_name(self, st: ModelState, obj: LMIModel) -> str:
        """The name of the inspection Job `obj`'s generation renders to, rendered once per generation."""
        stamp = (str(obj.metadata.uid), int(obj.metadata.generation or 1))
        if st.inspect_job is None or st.inspect_job[0] != stamp:
            job = render(obj, self.settings, inspect=True).by_kind("Job")
            assert job is not None  # rendered with inspect=True
            st.inspect_job = (stamp, str(job["metadata"]["name"]))
        return st.inspect_job[1]
