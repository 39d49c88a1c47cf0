"""Observing a model's GPU profiles (spec.profiles) for profile_plan: per profile, whether the model
fits its GPU (fit_check), the replicas the free GPUs of its nodes still hold (gpu_capacity), and what
its Deployment asks for, has bound to nodes and has ready (the cache).

GPUs freed by other workloads raise no event the operator watches, so a model whose replicas are not
where the ideal puts them (on a fallback while a preferred profile may have room, or on the way back)
is planned again every RECHECK_SECONDS; the free GPUs are listed at most every
gpu_capacity.FRESH_SECONDS for all models together."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from lmi_operator.api import LMIModel
from lmi_operator.cache import Key, ModelCache
from lmi_operator.fit_status import FitReport
from lmi_operator.gpu_capacity import GpuCapacity
from lmi_operator.profile_plan import ProfileObservation, ProfilePlan, plan_profiles
from lmi_operator.render import PROFILE_LABEL, desired_replicas, gpu_resource_of, workload_name
from lmi_operator.replica_phases import server_ready
from lmi_operator.settings import OperatorSettings

RECHECK_SECONDS = 5.0


def _scheduled(pod: Mapping[str, Any]) -> bool:
    conditions = pod.get("status", {}).get("conditions", [])
    return any(c.get("type") == "PodScheduled" and c.get("status") == "True" for c in conditions)


def settled(plan: ProfilePlan) -> bool:
    """Whether there is nothing to look at again: every profile asks for its ideal, and every replica
    is placed on the most preferred profile the model fits (none on a fallback, none waiting)."""
    first = next((t for t in plan.targets if t.reason != "InsufficientGPUMemory"), None)
    return all(t.replicas == t.ideal for t in plan.targets) and all(
        t.ideal == 0 or (t is first and t.reason == "Placed") for t in plan.targets
    )


def profile_status(plan: ProfilePlan, pods: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """status.profile (the most preferred profile replicas are placed on, left out when none is) and
    status.profiles: each profile's replicas asked for, ready, and why."""
    ready = Counter(pod["metadata"].get("labels", {}).get(PROFILE_LABEL) for pod in pods if server_ready(pod))
    rows = [
        {"name": t.name, "replicas": t.replicas, "readyReplicas": ready[t.name], "reason": t.reason}
        for t in plan.targets
    ]
    return ({"profile": plan.active} if plan.active else {}) | {"profiles": rows}


class ProfileCheck:
    """Plans the replicas of each profile of a model from what is observed now."""

    def __init__(self, cache: ModelCache, gpus: GpuCapacity, settings: OperatorSettings) -> None:
        self.cache = cache
        self.gpus = gpus
        self.settings = settings

    async def plan(self, key: Key, obj: LMIModel, fit: FitReport | None) -> ProfilePlan | None:
        """The plan of `obj`'s profiles (None without profiles); it is kept in the model's cache entry
        for the status."""
        spec = obj.spec
        st = self.cache.state(key)
        if not spec.profiles:
            st.profile_plan = None
            return None
        resource = gpu_resource_of(spec, self.settings)
        pods = [p for p in st.pods.values() if not p["metadata"].get("deletionTimestamp")]
        observed = []
        for profile in spec.profiles:
            own = spec.for_profile(profile)
            labels = own.scheduling.node_selector if own.scheduling else {}
            deployment = st.children.get(("Deployment", workload_name(key[1], profile.name)))
            mine = [p for p in pods if p["metadata"].get("labels", {}).get(PROFILE_LABEL) == profile.name]
            observed.append(
                ProfileObservation(
                    name=profile.name,
                    fits=fit.profile_fits.get(profile.name, True) if fit is not None else True,
                    free_slots=await self.gpus.free_slots(resource, labels, own.resources.gpus),
                    current=int((deployment or {}).get("spec", {}).get("replicas", 0)),
                    scheduled=sum(map(_scheduled, mine)),
                    ready=sum(map(server_ready, mine)),
                )
            )
        st.profile_plan = plan_profiles(desired_replicas(spec), observed)
        return st.profile_plan
