"""The real LeaderWorkerSet controller in the local control plane (`LocalCluster(lws=True)`): one
group of a leader and a worker, each on a whole 8-GPU H100 kwok node, and the group recreated
when one of its pods goes. The ground a multi-node LMIModel replica stands on."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from lmi_operator.testing.cluster import LocalCluster, tools_bin_dir
from lmi_operator.testing.nodes import GPU_TAINT_KEY
from tests.waiting import eventually

pytestmark = pytest.mark.cluster

NAME = "multi"
LEADER, WORKER = f"{NAME}-0", f"{NAME}-0-1"
H100_NODES = {"gpu-h100-0", "gpu-h100-1"}


@pytest.fixture(scope="module")
def lws_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """A control plane of its own (the default nodes) with the LWS manager and its CRDs."""
    local = LocalCluster(tmp_path_factory.mktemp("lws"), tools_bin_dir(), lws=True)
    local.start()
    try:
        yield local
    finally:
        local.stop()


def gpu_pod_template(role: str) -> dict[str, Any]:
    """A pod asking for a whole H100 node's 8 GPUs, tolerating the GPU nodes' taint."""
    return {
        "metadata": {"labels": {"role": role}},
        "spec": {
            "tolerations": [{"key": GPU_TAINT_KEY, "operator": "Exists", "effect": "NoSchedule"}],
            "containers": [
                {
                    "name": "vllm",
                    "image": "registry.invalid/vllm:test",
                    "resources": {"limits": {"nvidia.com/gpu": "8"}},
                }
            ],
        },
    }


def leader_worker_set() -> dict[str, Any]:
    """One group of two pods; the restart policy is left to the API's default."""
    return {
        "apiVersion": "leaderworkerset.x-k8s.io/v1",
        "kind": "LeaderWorkerSet",
        "metadata": {"name": NAME, "namespace": "default"},
        "spec": {
            "replicas": 1,
            "leaderWorkerTemplate": {
                "size": 2,
                "leaderTemplate": gpu_pod_template("leader"),
                "workerTemplate": gpu_pod_template("worker"),
            },
        },
    }


def get(cluster: LocalCluster, kind: str, name: str) -> dict[str, Any]:
    obj: dict[str, Any] = json.loads(cluster.kubectl("get", kind, name, "-n", "default", "-o", "json").stdout)
    return obj


def ready_pods(cluster: LocalCluster) -> dict[str, dict[str, Any]] | None:
    """The group's pods by name once both are Ready (and none is being deleted), else None."""
    out = cluster.kubectl(
        "get", "pods", "-n", "default", "-l", f"leaderworkerset.sigs.k8s.io/name={NAME}", "-o", "json"
    )
    pods = {p["metadata"]["name"]: p for p in json.loads(out.stdout)["items"]}
    if set(pods) != {LEADER, WORKER}:
        return None
    for pod in pods.values():
        conditions = pod["status"].get("conditions", [])
        if pod["metadata"].get("deletionTimestamp") or not any(
            c["type"] == "Ready" and c["status"] == "True" for c in conditions
        ):
            return None
    return pods


def group_ready(cluster: LocalCluster) -> dict[str, Any] | None:
    """The LeaderWorkerSet's status once it reports its one group ready and Available."""
    status: dict[str, Any] = get(cluster, "leaderworkerset", NAME).get("status", {})
    conditions = {c["type"]: c["status"] for c in status.get("conditions", [])}
    if status.get("readyReplicas") == 1 and conditions.get("Available") == "True":
        return status
    return None


def test_leader_and_worker_on_distinct_h100_nodes_and_group_recreated(lws_cluster: LocalCluster) -> None:
    cluster = lws_cluster
    cluster.kubectl("apply", "-f", "-", input=json.dumps(leader_worker_set()))
    # Defaulted on create (the CRD's schema), not set here.
    assert get(cluster, "leaderworkerset", NAME)["spec"]["leaderWorkerTemplate"]["restartPolicy"] == (
        "RecreateGroupOnPodRestart"
    )

    pods = eventually(lambda: ready_pods(cluster), timeout=45, what="the leader and worker pods Ready")
    leader_sts = get(cluster, "statefulset", NAME)
    worker_sts = get(cluster, "statefulset", LEADER)
    assert leader_sts["metadata"]["ownerReferences"][0]["kind"] == "LeaderWorkerSet"
    assert worker_sts["metadata"]["ownerReferences"][0]["name"] == LEADER  # the worker set is the leader's
    # The headless Service the leader address resolves through.
    assert get(cluster, "service", NAME)["spec"]["clusterIP"] == "None"
    leader, worker = pods[LEADER], pods[WORKER]
    assert {leader["spec"]["nodeName"], worker["spec"]["nodeName"]} == H100_NODES
    # What the pod webhook adds, served for real: the group's labels and the LWS_* variables.
    assert leader["metadata"]["labels"]["leaderworkerset.sigs.k8s.io/group-index"] == "0"
    assert worker["metadata"]["labels"]["leaderworkerset.sigs.k8s.io/worker-index"] == "1"
    env = {e["name"]: e.get("value") for e in worker["spec"]["containers"][0]["env"]}
    assert env["LWS_LEADER_ADDRESS"] == f"{LEADER}.{NAME}.default"
    assert env["LWS_GROUP_SIZE"] == "2"
    eventually(lambda: group_ready(cluster), timeout=30, what="the LeaderWorkerSet's group ready")

    before = {name: pod["metadata"]["uid"] for name, pod in pods.items()}
    cluster.kubectl("delete", "pod", WORKER, "-n", "default", "--wait=false")

    def recreated() -> dict[str, dict[str, Any]] | None:
        now = ready_pods(cluster)
        if now is None or any(now[name]["metadata"]["uid"] == uid for name, uid in before.items()):
            return None
        return now

    # RecreateGroupOnPodRestart: losing the worker restarts the whole group, the leader included.
    pods = eventually(recreated, timeout=45, what="a new leader and worker, both Ready")
    assert {p["spec"]["nodeName"] for p in pods.values()} == H100_NODES
    eventually(lambda: group_ready(cluster), timeout=30, what="the recreated group ready")
