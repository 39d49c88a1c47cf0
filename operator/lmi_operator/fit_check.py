"""Gathers what the memory fit of one model is judged from (its recorded or freshly inspected facts,
its engine settings, the GPU types it may land on) and asks fit_status to judge. The children's
reconcile uses the answer to hold the Deployment back, the status report to write FitsGPUMemory."""

from __future__ import annotations

from lmi_operator.api import LMIModel
from lmi_operator.cache import Key, ModelCache, ModelState
from lmi_operator.capacity import engine_of
from lmi_operator.fit_status import FitReport, Inspection, inspection_of, judge, source_of
from lmi_operator.gpu_capacity import GpuCapacity
from lmi_operator.properties import lmi_options
from lmi_operator.render import gpu_resource_of, render
from lmi_operator.settings import OperatorSettings


class FitCheck:
    """Judges models that ask for GPUs; a CPU model (resources.gpus 0) is not judged (None)."""

    def __init__(self, cache: ModelCache, gpus: GpuCapacity, settings: OperatorSettings) -> None:
        self.cache = cache
        self.gpus = gpus
        self.settings = settings

    async def judge(self, key: Key, obj: LMIModel) -> FitReport | None:
        """The fit of `obj` as observed in its cache entry."""
        spec = obj.spec
        if not spec.resources.gpus:
            return None
        st = self.cache.state(key)
        job = self._job_name(st, obj)
        recorded = ((st.model or {}).get("status") or {}).get("modelFacts")
        if source_of(recorded) == (spec.model.id, spec.model.revision):
            inspection = Inspection(facts=recorded, recorded=True)
        else:
            # Judged from a partial cache (after a restart), a finished inspection would read as
            # running and its verdict would be rewritten for nothing: read what is not cached yet.
            await self.cache.read_missing(key, [("batch/v1", "Job", job)])
            live = st.children.get("Job")
            mine = live if live is not None and live["metadata"]["name"] == job else None
            if mine is not None and mine.get("status", {}).get("conditions"):
                await self.cache.read_inspection_pods(key, job)
            inspection = inspection_of(
                mine, list(st.inspection_pods.values()), spec.model.id, spec.model.revision
            )
        selector = spec.scheduling.node_selector if spec.scheduling else {}
        types = await self.gpus.gpu_types(gpu_resource_of(spec, self.settings), selector)
        return judge(inspection, engine_of(lmi_options(spec), spec.resources.gpus), types, job)

    def _job_name(self, st: ModelState, obj: LMIModel) -> str:
        """The name of the inspection Job `obj`'s generation renders to, rendered once per generation."""
        stamp = (str(obj.metadata.uid), int(obj.metadata.generation or 1))
        if st.inspect_job is None or st.inspect_job[0] != stamp:
            job = render(obj, self.settings, inspect=True).by_kind("Job")
            assert job is not None  # rendered with inspect=True
            st.inspect_job = (stamp, str(job["metadata"]["name"]))
        return st.inspect_job[1]
