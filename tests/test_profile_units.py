"""GPU profiles without a cluster: a profile's replicas' spec (`LMIModelSpec.for_profile`), and the
planner of replicas per profile (`profile_plan`), also iterated over a simulated cluster."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from lmi_operator import api, crd
from lmi_operator.fit_status import FitReport, combine
from lmi_operator.profile_check import profile_status, settled
from lmi_operator.profile_plan import ProfileObservation, ProfilePlan, plan_profiles
from lmi_operator.render import PROFILE_LABEL, render
from lmi_operator.settings import OperatorSettings
from tests.test_api_models import BASE, merged

PRODUCT = "nvidia.com/gpu.product"


def spec_with(**spec: Any) -> api.LMIModelSpec:
    """The spec of BASE with `spec` merged in."""
    return api.parse_lmimodel(merged(BASE, {"spec": spec})).spec


# --- for_profile ---------------------------------------------------------------------------------


def test_a_profile_overrides_engine_gpus_and_nodes_and_has_no_profiles() -> None:
    spec = spec_with(
        engine={"tensorParallelDegree": 2, "maxModelLen": 32768, "enablePrefixCaching": True},
        resources={"gpus": 2, "memory": "64Gi"},
        scheduling={"nodeSelector": {"pool": "gpu", "zone": "a"}, "tolerations": [{"key": "gpu"}]},
        profiles=[
            {"name": "h100", "gpu": {"product": "NVIDIA-H100-80GB-HBM3"}},
            {
                "name": "l40s",
                "gpu": {"product": "NVIDIA-L40S", "nodeSelector": {"pool": "l40s"}},
                "resources": {"gpus": 4},
                "engine": {
                    "tensorParallelDegree": 4,
                    "quantize": "fp8",
                    "maxModelLen": 8192,
                    "maxRollingBatchSize": 64,
                    "gpuMemoryUtilization": 0.95,
                },
            },
        ],
    )
    h100, l40s = (spec.for_profile(p) for p in spec.profiles)

    assert h100.engine == spec.engine and h100.resources == spec.resources and h100.profiles == []
    assert h100.scheduling is not None
    assert h100.scheduling.node_selector == {"pool": "gpu", "zone": "a", PRODUCT: "NVIDIA-H100-80GB-HBM3"}

    assert (l40s.engine.tensor_parallel_degree, l40s.engine.quantize) == (4, "fp8")
    assert (l40s.engine.max_model_len, l40s.engine.max_rolling_batch_size) == (8192, 64)
    assert l40s.engine.gpu_memory_utilization == 0.95 and l40s.engine.enable_prefix_caching
    assert l40s.resources.gpus == 4 and l40s.resources.memory == "64Gi"
    assert spec.scheduling is not None and l40s.scheduling is not None
    assert l40s.scheduling.tolerations == spec.scheduling.tolerations
    assert l40s.scheduling.node_selector == {"pool": "l40s", "zone": "a", PRODUCT: "NVIDIA-L40S"}
    assert l40s.gpus_required() == 4 and l40s.tensor_parallel_size() == 4

    # The spec itself is untouched.
    assert spec.engine.quantize is None and spec.resources.gpus == 2 and len(spec.profiles) == 2
    assert PRODUCT not in spec.scheduling.node_selector


def test_a_profile_of_a_spec_without_scheduling_selects_its_nodes() -> None:
    spec = spec_with(
        engine={"pipelineParallelDegree": 2},
        resources={"gpus": 2},
        profiles=[{"name": "pool-b", "gpu": {"nodeSelector": {"pool": "b"}}, "resources": {"gpus": 8}}],
    )
    (profile,) = spec.profiles
    on_b = spec.for_profile(profile)
    assert on_b.scheduling is not None and on_b.scheduling.node_selector == {"pool": "b"}
    # tensorParallelDegree max resolves against the profile's GPUs.
    assert on_b.tensor_parallel_size() == 4 and on_b.gpus_required() == 8
    assert spec.scheduling is None


def test_profile_engine_fields_are_the_engine_fields_without_defaults() -> None:
    schema = crd.openapi_schema()["properties"]["spec"]["properties"]
    engine = schema["engine"]["properties"]
    overrides = schema["profiles"]["items"]["properties"]["engine"]["properties"]
    assert list(overrides) == [
        "tensorParallelDegree",
        "quantize",
        "maxModelLen",
        "maxRollingBatchSize",
        "gpuMemoryUtilization",
    ]
    for name, node in overrides.items():
        assert node == {k: v for k, v in engine[name].items() if k != "default"}, name


# --- the planner ---------------------------------------------------------------------------------


def obs(name: str, free: int, current: int = 0, scheduled: int = 0, ready: int = 0, fits: bool = True) -> Any:
    """A ProfileObservation, positionally."""
    return ProfileObservation(name, fits, free, current, scheduled, ready)


def test_filling_the_preferred_type_sends_new_replicas_to_the_fallback() -> None:
    plan = plan_profiles(5, [obs("h100", 0, 3, 3, 3), obs("l40s", 4)])
    assert plan.replicas() == {"h100": 3, "l40s": 2}
    assert [t.reason for t in plan.targets] == ["Placed", "Placed"]
    assert plan.active == "h100" and not plan.insufficient_memory


def test_replicas_no_profile_has_room_for_wait_on_the_first_that_fits() -> None:
    plan = plan_profiles(6, [obs("h200", 1, fits=False), obs("h100", 1), obs("l40s", 2)])
    assert plan.replicas() == {"h200": 0, "h100": 4, "l40s": 2}
    assert [t.reason for t in plan.targets] == ["InsufficientGPUMemory", "WaitingForGPUs", "Placed"]
    assert plan.active == "h100"


def test_a_profile_that_does_not_fit_is_skipped() -> None:
    plan = plan_profiles(2, [obs("l4", 8, fits=False), obs("h100", 2), obs("h200", 2)])
    assert plan.replicas() == {"l4": 0, "h100": 2, "h200": 0}
    assert [t.reason for t in plan.targets] == ["InsufficientGPUMemory", "Placed", "NotNeeded"]
    assert plan.active == "h100"


def test_a_profile_without_free_gpus_is_skipped_and_says_so() -> None:
    plan = plan_profiles(2, [obs("h100", 0), obs("l40s", 2)])
    assert plan.replicas() == {"h100": 0, "l40s": 2}
    assert plan.targets[0].reason == "NoFreeGPUs" and plan.active == "l40s"


def test_no_profile_fits_asks_for_nothing_and_says_so() -> None:
    plan = plan_profiles(2, [obs("l4", 4, 2, 2, 2, fits=False), obs("t4", 4, fits=False)])
    assert plan.insufficient_memory and plan.active is None
    assert plan.replicas() == {"l4": 0, "t4": 0}
    assert {t.reason for t in plan.targets} == {"InsufficientGPUMemory"}


def test_scaling_down_removes_fallback_replicas_first() -> None:
    plan = plan_profiles(3, [obs("h100", 0, 3, 3, 3), obs("l40s", 0, 2, 2, 2)])
    assert plan.replicas() == {"h100": 3, "l40s": 0}
    plan = plan_profiles(2, [obs("h100", 0, 3, 3, 3), obs("l40s", 0, 2, 2, 2)])
    assert plan.replicas() == {"h100": 2, "l40s": 0}
    assert plan_profiles(0, [obs("h100", 0, 3, 3, 3), obs("l40s", 0, 2, 2, 2)]).replicas() == {
        "h100": 0,
        "l40s": 0,
    }


def test_moving_back_raises_the_preferred_and_keeps_the_fallback_until_ready() -> None:
    # The preferred type has room again: its replicas start, the fallback's keep serving.
    plan = plan_profiles(2, [obs("h100", 2), obs("l40s", 0, 2, 2, 2)])
    assert plan.replicas() == {"h100": 2, "l40s": 2}
    assert [(t.ideal, t.reason) for t in plan.targets] == [(2, "Placed"), (0, "Draining")]
    # One is ready on the preferred type: one fallback replica goes.
    plan = plan_profiles(2, [obs("h100", 0, 2, 2, 1), obs("l40s", 0, 2, 2, 2)])
    assert plan.replicas() == {"h100": 2, "l40s": 1}


def test_unbound_replicas_above_the_ideal_go_at_once() -> None:
    # A fallback replica waits for GPUs while the preferred type has room: it serves nothing.
    plan = plan_profiles(2, [obs("h100", 2), obs("l40s", 0, 2, 1, 1)])
    assert plan.replicas() == {"h100": 2, "l40s": 1}


# --- the planner over a simulated cluster ------------------------------------------------------------


@dataclass
class Pod:
    """A replica's pod: bound to a node at `bound_at` (a step), ready one step later."""

    bound_at: int | None = None
    ready: bool = False


@dataclass
class Pool:
    """The nodes of one profile, in replica slots, and the model's Deployment on them."""

    slots: int
    others: int = 0  # slots held by other workloads
    fits: bool = True
    replicas: int = 0
    pods: list[Pod] = field(default_factory=list)

    def free(self) -> int:
        return self.slots - self.others - sum(p.bound_at is not None for p in self.pods)

    def observe(self, name: str) -> ProfileObservation:
        bound = sum(p.bound_at is not None for p in self.pods)
        return ProfileObservation(name, self.fits, max(self.free(), 0), self.replicas, bound, self.ready())

    def ready(self) -> int:
        return sum(p.ready for p in self.pods)

    def scale(self, replicas: int) -> None:
        """The Deployment's scale: new pods pending; removal as the ReplicaSet controller ranks pods
        (unbound, then not ready, then ready)."""
        self.replicas = replicas
        self.pods.sort(key=lambda p: (p.bound_at is not None, p.ready))
        del self.pods[: max(len(self.pods) - replicas, 0)]
        self.pods += [Pod() for _ in range(replicas - len(self.pods))]

    def progress(self, step: int) -> None:
        """Pods bound before this step become ready; pending pods bind where slots are free."""
        for pod in self.pods:
            if pod.bound_at is not None and pod.bound_at < step:
                pod.ready = True
        for pod in self.pods:
            if pod.bound_at is None and self.free() > 0:
                pod.bound_at = step


def simulate(
    desired: int, pools: dict[str, Pool], events: dict[int, Any], steps: int = 20
) -> list[dict[str, int]]:
    """Run the planner for `steps` steps (events[step](pools) first); return the replicas asked for
    each step, checking that once the model was ready it never drops below `desired` ready replicas."""
    history: list[dict[str, int]] = []
    was_ready = False
    for step in range(steps):
        if step in events:
            events[step](pools)
        plan = plan_profiles(desired, [pool.observe(name) for name, pool in pools.items()])
        for name, pool in pools.items():
            pool.scale(plan.replicas()[name])
        ready = sum(pool.ready() for pool in pools.values())
        assert not was_ready or ready >= desired, f"step {step}: {ready} ready of {desired}"
        was_ready = was_ready or ready >= desired
        history.append(plan.replicas())
        for pool in pools.values():
            pool.progress(step)
    return history


def release(name: str, slots: int) -> Any:
    """An event: other workloads on pool `name` give back `slots` slots."""

    def event(pools: dict[str, Pool]) -> None:
        pools[name].others -= slots

    return event


@pytest.mark.parametrize(
    ("desired", "releases", "final"),
    [
        (3, {8: release("h100", 4)}, {"h100": 3, "l40s": 0}),
        (3, {8: release("h100", 1), 12: release("h100", 3)}, {"h100": 3, "l40s": 0}),
        (4, {8: release("h100", 2)}, {"h100": 2, "l40s": 2}),
        (1, {8: release("h100", 4)}, {"h100": 1, "l40s": 0}),
    ],
    ids=["all-at-once", "one-then-the-rest", "partly", "single-replica"],
)
def test_fallback_replicas_move_back_without_a_dip(
    desired: int, releases: dict[int, Any], final: dict[str, int]
) -> None:
    pools = {"h100": Pool(slots=4, others=4), "l40s": Pool(slots=4)}
    history = simulate(desired, pools, releases)
    assert history[7] == {"h100": 0, "l40s": desired}, "before the release, all on the fallback"
    assert history[-1] == final and history[-2] == final, "converges to the ideal"
    assert sum(pool.ready() for pool in pools.values()) == desired


def test_scaling_up_and_down_over_the_simulated_cluster() -> None:
    pools = {"h100": Pool(slots=2), "l40s": Pool(slots=4), "t4": Pool(slots=8, fits=False)}
    history = simulate(5, pools, {}, steps=6)
    assert history[-1] == {"h100": 2, "l40s": 3, "t4": 0}
    history = simulate(2, pools, {}, steps=6)
    assert history[0] == {"h100": 2, "l40s": 0, "t4": 0}, "the fallback's replicas go first"


# --- rendering, the fit and the status of profiles ----------------------------------------------


def profiled(**spec: Any) -> api.LMIModel:
    body = merged(
        BASE,
        {
            "metadata": {"uid": "u1", "namespace": "ns"},
            "spec": {
                "replicas": 3,
                "profiles": [
                    {"name": "h100", "gpu": {"product": "NVIDIA-H100-80GB-HBM3"}},
                    {
                        "name": "a10g",
                        "gpu": {"product": "NVIDIA-A10G"},
                        "resources": {"gpus": 2},
                        "engine": {"tensorParallelDegree": 2, "quantize": "fp8"},
                    },
                ],
                **spec,
            },
        },
    )
    return api.parse_lmimodel(body)


def test_each_profile_renders_its_own_config_and_deployment_behind_one_service() -> None:
    obj = profiled()
    name = str(obj.metadata.name)
    rendered = render(obj, OperatorSettings(), replicas={"h100": 1, "a10g": 2})
    by_name = {(o["kind"], o["metadata"]["name"]): o for o in rendered.objects}
    assert sorted(by_name) == sorted(
        [
            ("ConfigMap", f"{name}-h100-lmi-config"),
            ("ConfigMap", f"{name}-a10g-lmi-config"),
            ("Deployment", f"{name}-h100"),
            ("Deployment", f"{name}-a10g"),
            ("Service", name),
            ("PodDisruptionBudget", name),
        ]
    )
    a10g = by_name["Deployment", f"{name}-a10g"]
    assert a10g["spec"]["replicas"] == 2
    assert a10g["spec"]["selector"]["matchLabels"][PROFILE_LABEL] == "a10g"
    pod = a10g["spec"]["template"]["spec"]
    assert pod["nodeSelector"]["nvidia.com/gpu.product"] == "NVIDIA-A10G"
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert {"name": "lmi-config", "configMap": {"name": f"{name}-a10g-lmi-config"}} in pod["volumes"]
    properties = by_name["ConfigMap", f"{name}-a10g-lmi-config"]["data"]["serving.properties"]
    assert "option.tensor_parallel_degree=2" in properties and "option.quantize=fp8" in properties
    assert by_name["Deployment", f"{name}-h100"]["spec"]["replicas"] == 1
    # The Service and the PDB select the pods of every profile.
    assert PROFILE_LABEL not in by_name["Service", name]["spec"]["selector"]
    assert PROFILE_LABEL not in by_name["PodDisruptionBudget", name]["spec"]["selector"]["matchLabels"]
    # Without a plan, every replica is on the first profile.
    default = {
        o["metadata"]["name"]: o["spec"]["replicas"]
        for o in render(obj, OperatorSettings()).objects
        if o["kind"] == "Deployment"
    }
    assert default == {f"{name}-h100": 3, f"{name}-a10g": 0}
    assert set(rendered.config_hashes()) == {f"{name}-h100", f"{name}-a10g"}


def fit(status: str, reason: str, message: str, facts: dict[str, Any] | None = None) -> FitReport:
    condition = {"type": "FitsGPUMemory", "status": status, "reason": reason, "message": message}
    # Held back while inspecting and where it does not fit, as fit_status.judge does.
    return FitReport(condition, facts, deploy=status == "True", keep_job=False)


def test_the_fit_of_profiles_names_each_and_holds_where_any_fits() -> None:
    facts = {"source": "org/m"}
    fits = combine(
        {
            "h100": fit("True", "Fits", "fits H100", facts),
            "a10g": fit("False", "InsufficientGPUMemory", "needs 41 GiB", facts),
        }
    )
    assert fits.condition["status"] == "True" and fits.deploy
    assert fits.condition["message"] == "profile h100: fits H100; profile a10g: needs 41 GiB"
    assert fits.profile_fits == {"h100": True, "a10g": False}
    none = combine(
        {
            "h100": fit("False", "InsufficientGPUMemory", "needs 200 GiB", facts),
            "a10g": fit("False", "InsufficientGPUMemory", "needs 200 GiB", facts),
        }
    )
    assert (none.condition["status"], none.condition["reason"]) == ("False", "InsufficientGPUMemory")
    assert none.condition["message"].startswith("no profile fits: profile h100: needs 200 GiB")
    assert not none.deploy and none.insufficient
    # While the shared inspection runs, the model waits as a whole.
    waiting = combine(
        {
            "h100": fit("Unknown", "Inspecting", "Job j reads"),
            "a10g": fit("Unknown", "Inspecting", "Job j reads"),
        }
    )
    assert waiting.inspecting and not waiting.deploy
    assert waiting.profile_fits == {"h100": True, "a10g": True}


def test_the_profile_status_counts_each_profiles_ready_pods() -> None:
    plan = plan_profiles(
        2, [ProfileObservation("h100", True, 1, 1, 1, 1), ProfileObservation("a10g", True, 4, 1, 1, 1)]
    )

    def pod(profile: str, ready: bool) -> dict[str, Any]:
        server = {"name": "model-server", "ready": ready}
        return {
            "metadata": {"labels": {PROFILE_LABEL: profile}},
            "status": {"podIP": "10.0.0.1", "containerStatuses": [server]},
        }

    status = profile_status(plan, [pod("h100", True), pod("a10g", True), pod("a10g", False)])
    assert status["profile"] == "h100"
    assert status["profiles"] == [
        {"name": "h100", "replicas": 2, "readyReplicas": 1, "reason": "Placed"},
        {"name": "a10g", "replicas": 1, "readyReplicas": 1, "reason": "Draining"},
    ]
    nothing = plan_profiles(1, [ProfileObservation("h100", False, 0)])
    assert "profile" not in profile_status(nothing, [])


def test_a_plan_is_looked_at_again_while_replicas_are_on_a_fallback_or_waiting() -> None:
    def plan(h100_free: int, a10g_current: int = 0, fits: bool = True) -> ProfilePlan:
        return plan_profiles(
            2,
            [
                ProfileObservation("h100", fits, h100_free),
                ProfileObservation("a10g", True, 2, a10g_current, a10g_current, a10g_current),
            ],
        )

    assert settled(plan(h100_free=2))
    assert not settled(plan(h100_free=0, a10g_current=2)), "on the fallback: the H100s may free up"
    assert not settled(plan(h100_free=2, a10g_current=2)), "moving back"
    assert settled(plan(h100_free=0, a10g_current=2, fits=False)), "the fallback is the only fit"
    assert settled(plan_profiles(1, [ProfileObservation("h100", False, 4)])), "nothing fits: nothing to do"
