"""A replica of several nodes (spec.resources.nodes): the API's rules, the LeaderWorkerSet it
renders to, and the status read from a group's pods (pure; tests/test_multi_node.py runs it against
the real LeaderWorkerSet controller)."""

from __future__ import annotations

import datetime
from typing import Any

import pytest

from lmi_operator import api
from lmi_operator.cache import ModelCache
from lmi_operator.prerequisites import missing_lws_message
from lmi_operator.render import CONFIG_HASH, MODEL_LABEL, render, template_of
from lmi_operator.render_lws import (
    EXCLUSIVE_TOPOLOGY_ANNOTATION,
    GROUP_INDEX_LABEL,
    GROUP_SIZE_ANNOTATION,
    LEADER_SELECTOR,
    WORKER_INDEX_LABEL,
    serves_http,
)
from lmi_operator.settings import OperatorSettings
from lmi_operator.status import (
    INSUFFICIENT_GPU,
    READY,
    WORKER_CRASHED,
    Observed,
    conditions_for,
    problem_of,
)
from tests.test_api_models import BASE, merged

NOW = datetime.datetime(2026, 12, 1, 12, 0, tzinfo=datetime.UTC)


def multi_node(**spec: Any) -> api.LMIModel:
    body = merged(
        BASE,
        {
            "metadata": {"uid": "u1", "namespace": "ns"},
            "spec": {
                "replicas": 2,
                "engine": {"tensorParallelDegree": 16},
                "resources": {"gpus": 8, "nodes": 2},
                **spec,
            },
        },
    )
    return api.parse_lmimodel(body)


def group_set(obj: api.LMIModel) -> dict[str, Any]:
    (lws,) = [o for o in render(obj, OperatorSettings()).objects if o["kind"] == "LeaderWorkerSet"]
    return lws


def test_a_replica_of_two_nodes_is_a_leader_worker_set_group_behind_a_leaders_service() -> None:
    obj = multi_node()
    name = str(obj.metadata.name)
    rendered = render(obj, OperatorSettings())
    kinds = sorted((o["kind"], o["metadata"]["name"]) for o in rendered.objects)
    # Not <model>: LeaderWorkerSet names its headless Service after itself, and <model> is the
    # model's own Service.
    assert ("LeaderWorkerSet", f"{name}-group") in kinds and ("Service", name) in kinds
    assert not [k for k in kinds if k[0] == "Deployment"]
    lws = group_set(obj)
    spec = lws["spec"]
    assert (spec["replicas"], spec["startupPolicy"]) == (2, "LeaderCreated")
    # spec.rollout's default (RollingUpdate, surge 1, unavailable 0) counted in groups.
    assert spec["rolloutStrategy"] == {
        "type": "RollingUpdate",
        "rollingUpdateConfiguration": {"maxSurge": 1, "maxUnavailable": 0},
    }
    group = spec["leaderWorkerTemplate"]
    assert (group["size"], group["restartPolicy"]) == (2, "RecreateGroupOnPodRestart")
    leader, worker = group["leaderTemplate"]["spec"], group["workerTemplate"]["spec"]
    (server,) = leader["containers"]
    assert server["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert "readinessProbe" in server and server["ports"][0]["name"] == "http"
    (joiner,) = worker["containers"]
    assert joiner["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert "readinessProbe" not in joiner and "ports" not in joiner, "workers serve no HTTP"
    for container in (server, joiner, *leader["initContainers"], *worker["initContainers"]):
        host_ip = next(e for e in container["env"] if e["name"] == "VLLM_HOST_IP")
        assert host_ip["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    service = next(o for o in rendered.objects if o["kind"] == "Service")
    assert service["spec"]["selector"][WORKER_INDEX_LABEL] == LEADER_SELECTOR[WORKER_INDEX_LABEL]
    assert rendered.config_hashes() == {
        f"{name}-group": template_of(lws)["metadata"]["annotations"][CONFIG_HASH]
    }
    # The tensor parallel degree spans the group; the runtime adds the group's place (multi_node).
    properties = next(o for o in rendered.objects if o["kind"] == "ConfigMap")["data"]["serving.properties"]
    assert "option.tensor_parallel_degree=16" in properties


def test_recreate_rolls_every_group_at_once_and_exclusive_topology_reaches_the_group_set() -> None:
    lws = group_set(
        multi_node(
            rollout={"strategy": "Recreate"},
            scheduling={"exclusiveTopology": "topology.kubernetes.io/rack"},
        )
    )
    assert lws["spec"]["rolloutStrategy"]["rollingUpdateConfiguration"] == {
        "maxSurge": 0,
        "maxUnavailable": "100%",
    }
    assert lws["metadata"]["annotations"][EXCLUSIVE_TOPOLOGY_ANNOTATION] == "topology.kubernetes.io/rack"
    assert EXCLUSIVE_TOPOLOGY_ANNOTATION not in group_set(multi_node()).get("metadata", {}).get(
        "annotations", {}
    )


def test_max_tensor_parallel_counts_every_node_and_lmis_split_over_nodes_is_accepted() -> None:
    obj = multi_node(engine={"tensorParallelDegree": "max"})
    assert obj.spec.tensor_parallel_size() == 16 and obj.spec.gpus_per_replica() == 16
    # LMI's multi-node examples: tensor parallel within a node, pipeline parallel across nodes.
    lmi = multi_node(engine={"tensorParallelDegree": 8, "pipelineParallelDegree": 2})
    assert lmi.spec.tensor_parallel_size() * lmi.spec.engine.pipeline_parallel_degree == 16
    # max with a pipeline degree: the group's GPUs over the stages.
    assert (
        multi_node(
            engine={"tensorParallelDegree": "max", "pipelineParallelDegree": 2}
        ).spec.tensor_parallel_size()
        == 8
    )


def test_the_scale_selector_and_the_model_servers_are_the_leaders() -> None:
    leader = {"metadata": {"labels": {WORKER_INDEX_LABEL: "0"}}}
    worker = {"metadata": {"labels": {WORKER_INDEX_LABEL: "1"}}}
    single = {"metadata": {"labels": {}}}
    assert [serves_http(p) for p in (leader, worker, single)] == [True, False, True]


# -- status ----------------------------------------------------------------------------------------


def group_pod(group: int, worker: int, *, ready: bool = True, **status: Any) -> dict[str, Any]:
    """A pod of a two-pod group as LeaderWorkerSet labels and annotates it."""
    base = "big-group"
    name = f"{base}-{group}" if worker == 0 else f"{base}-{group}-{worker}"
    return {
        "metadata": {
            "name": name,
            "namespace": "ns",
            "labels": {MODEL_LABEL: "big", GROUP_INDEX_LABEL: str(group), WORKER_INDEX_LABEL: str(worker)},
            "annotations": {GROUP_SIZE_ANNOTATION: "2", CONFIG_HASH: "h1"},
        },
        "status": {"conditions": [{"type": "Ready", "status": "True" if ready else "False"}], **status},
    }


def group_observed(ready_groups: int, **kw: Any) -> Observed:
    base: dict[str, Any] = {
        "name": "big",
        "namespace": "ns",
        "generation": 1,
        "desired_replicas": 2,
        "gpus_per_replica": 8,
        "gpu_resource": "nvidia.com/gpu",
        "startup_timeout_seconds": 600,
        "nodes_per_replica": 2,
        "deployments": {
            "big-group": {
                "kind": "LeaderWorkerSet",
                "metadata": {"generation": 1},
                "spec": {
                    "leaderWorkerTemplate": {
                        "leaderTemplate": {"metadata": {"annotations": {CONFIG_HASH: "h1"}}}
                    }
                },
                # LeaderWorkerSet counts groups, and a group is ready when every pod of it is; it
                # reports no observedGeneration.
                "status": {
                    "replicas": 2,
                    "readyReplicas": ready_groups,
                    "updatedReplicas": 2,
                    "conditions": [{"type": "Available", "status": "True"}],
                },
            }
        },
        "now": NOW,
    }
    return Observed(**(base | kw))


def ready_of(obs: Observed) -> dict[str, str]:
    return next(c for c in conditions_for(obs) if c["type"] == READY)


def whole(*groups: int) -> list[dict[str, Any]]:
    return [group_pod(g, w) for g in groups for w in (0, 1)]


def test_a_replica_is_ready_only_when_its_whole_group_is() -> None:
    both = ready_of(group_observed(2, pods=whole(0, 1)))
    assert (both["status"], both["message"]) == ("True", "2/2 replicas ready")
    one = ready_of(group_observed(1, pods=whole(0, 1)))
    assert (one["status"], one["reason"]) == ("False", "RolloutInProgress")
    assert one["message"] == "2/2 replicas updated, 1/2 available"
    # The controller still counts two ready groups, but a worker is gone (or not Ready): one is.
    lost = ready_of(group_observed(2, pods=[*whole(0), group_pod(1, 0)]))
    assert (lost["status"], lost["message"]) == ("False", "2/2 replicas updated, 1/2 available")
    unready = ready_of(group_observed(2, pods=[*whole(0), group_pod(1, 0), group_pod(1, 1, ready=False)]))
    assert unready["status"] == "False"
    # Groups still on the template before this generation's are not this generation's replicas,
    # whatever the controller counts (it reports no observedGeneration).
    current = group_observed(2, pods=whole(0, 1), config_hashes={"big-group": "h1"})
    stale = group_observed(2, pods=whole(0, 1), config_hashes={"big-group": "h2"})
    assert (ready_of(current)["status"], ready_of(stale)["status"]) == ("True", "False")


def test_a_group_short_of_gpus_says_how_many_nodes_have_enough_free() -> None:
    pending = {
        "metadata": {"name": "big-group-1", "labels": {GROUP_INDEX_LABEL: "1", WORKER_INDEX_LABEL: "0"}},
        "status": {
            "conditions": [
                {
                    "type": "PodScheduled",
                    "status": "False",
                    "reason": "Unschedulable",
                    "message": "0/4 nodes are available: 2 Insufficient nvidia.com/gpu.",
                }
            ]
        },
    }
    obs = group_observed(
        1, pods=[pending], free_gpus_by_node={"h100-0": 0, "h100-1": 0, "a10g-0": 4, "h100-2": 8}
    )
    problem = problem_of(obs)
    assert problem is not None and problem.reason == INSUFFICIENT_GPU
    assert problem.message == (
        "a replica is 2 pods with 8 nvidia.com/gpu each, on 2 distinct nodes; 1 of the 2 nodes needed "
        "have 8 free (a10g-0=4, h100-0=0, h100-1=0, h100-2=8); scheduler: 0/4 nodes are available: "
        "2 Insufficient nvidia.com/gpu."
    )


def crashed_worker(restarts: int = 1) -> dict[str, Any]:
    return group_pod(
        0,
        1,
        ready=False,
        containerStatuses=[
            {
                "name": "vllm",
                "restartCount": restarts,
                "state": {"running": {"startedAt": "2026-12-01T11:59:50Z"}},
                "lastState": {
                    "terminated": {
                        "exitCode": 1,
                        "reason": "Error",
                        "message": "torch.distributed.DistNetworkError: connection to big-group-0 refused",
                    }
                },
            }
        ],
    )


def test_a_crashed_worker_is_named_with_its_last_words_while_its_group_is_recreated() -> None:
    cache = ModelCache(None, (), on_spec=lambda k: None, on_pods=lambda k: None, on_deleted=lambda k: None)  # type: ignore[arg-type]
    key = ("ns", "big")
    for pod in (group_pod(0, 0), crashed_worker()):
        cache.observe_pod(pod, False)
    st = cache.models[key]
    assert set(st.group_failures) == {"0"}
    # LeaderWorkerSet deletes the group: the pod that said why is gone, its words are kept.
    for name in list(st.pods):
        cache.observe_pod(st.pods[name], True)
    recreated = [group_pod(0, 0, ready=False), group_pod(1, 0), group_pod(1, 1)]
    obs = group_observed(1, pods=recreated, group_failures=st.group_failures)
    problem = problem_of(obs)
    assert problem is not None and problem.reason == WORKER_CRASHED
    assert problem.message == (
        "group 0: worker 1 (pod big-group-0-1) failed, container vllm (last exit: code 1, Error: "
        "torch.distributed.DistNetworkError: connection to big-group-0 refused); LeaderWorkerSet "
        "recreates the whole group"
    )
    assert ready_of(obs)["reason"] == WORKER_CRASHED
    # Whole and Ready again: the failure is no longer reported, and no longer kept.
    assert problem_of(group_observed(2, pods=whole(0, 1), group_failures=st.group_failures)) is None
    for pod in whole(0):
        cache.observe_pod(pod, False)
    assert cache.models[key].group_failures == {}


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        (
            {"resources": {"gpus": 8, "nodes": 2}, "engine": {"tensorParallelDegree": 8}},
            "engine.tensorParallelDegree x engine.pipelineParallelDegree must equal resources.gpus x "
            "resources.nodes",
        ),
        (
            {"resources": {"gpus": 0, "nodes": 2}, "engine": {"tensorParallelDegree": 1}},
            "resources.nodes above 1 needs resources.gpus of at least 1",
        ),
        (
            {
                "resources": {"gpus": 8},
                "engine": {"tensorParallelDegree": 8},
                "scheduling": {"exclusiveTopology": "rack"},
            },
            "scheduling.exclusiveTopology needs resources.nodes above 1",
        ),
    ],
)
def test_group_rules_name_the_fields(patch: dict[str, Any], message: str) -> None:
    body = merged(BASE, {"spec": patch})
    with pytest.raises(api.InvalidLMIModel, match=message.replace(".", r"\.")):
        api.parse_lmimodel(body)


def test_the_missing_prerequisite_says_whether_the_operator_must_be_restarted() -> None:
    # Cluster-wide, kopf watches the CRDs; watching a list of namespaces, the operator does not.
    assert missing_lws_message(2, rescans=True).endswith("; the model is applied once it is served")
    assert missing_lws_message(2, rescans=False).endswith(
        "; then restart the operator: watching a list of namespaces, it sees new APIs at start-up only"
    )


def test_a_replica_larger_than_any_node_is_pointed_to_resources_nodes() -> None:
    pending = {
        "metadata": {"name": "huge-0"},
        "status": {
            "conditions": [
                {
                    "type": "PodScheduled",
                    "status": "False",
                    "reason": "Unschedulable",
                    "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu.",
                }
            ]
        },
    }
    one_pod = {"nodes_per_replica": 1, "gpus_per_replica": 16, "pods": [pending]}
    counted = {"free_gpus_by_node": {"h100-0": 8, "h100-1": 8}}
    problem = problem_of(group_observed(0, **one_pod, **counted, largest_node_gpus=8))
    assert problem is not None and problem.message == (
        "requested 16 nvidia.com/gpu per replica; at most 8 free on one node (h100-0=8, h100-1=8); no node "
        "has 16 (the most is 8): a replica larger than one node needs spec.resources.nodes "
        "(docs/multi-node.md); scheduler: 0/3 nodes are available: 3 Insufficient nvidia.com/gpu."
    )
    # A replica that fits a node is only short of free GPUs: no such advice.
    fits = problem_of(
        group_observed(0, **(one_pod | {"gpus_per_replica": 8}), **counted, largest_node_gpus=8)
    )
    assert fits is not None and "spec.resources.nodes" not in fits.message
