"""GPU profiles with fallback (spec.profiles) on the local control plane's kwok GPU nodes, with the
real lmi-operator: replicas go to the A10G profile, with its settings, while the H100s are full, and
move back once they free up without a moment below the desired ready count."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from lmi_operator.render import MODEL_LABEL, PROFILE_LABEL, config_map_name
from lmi_operator.testing.cluster import LocalCluster
from lmi_operator.testing.nodes import FakeNode, gpu_deployment
from lmi_operator.testing.operator import OperatorThread
from tests.test_operator import apply, condition, get, model_doc, wait_ready
from tests.waiting import eventually

H100 = "NVIDIA-H100-80GB-HBM3"
A10G = "NVIDIA-A10G"


@pytest.fixture
def pool(cluster: LocalCluster, namespace: str) -> Iterator[dict[str, str]]:
    """One H100 node (8 GPUs) and one A10G node (4 GPUs) of this test's own, and their label."""
    label = {"lmi.test/pool": namespace}
    nodes = [
        FakeNode(f"{namespace}-h100", 8, H100, 81559, "hopper", "p5.48xlarge", extra_labels=label),
        FakeNode(f"{namespace}-a10g", 4, A10G, 23028, "ampere", "g5.12xlarge", extra_labels=label),
    ]
    cluster.add_nodes(nodes)
    try:
        yield label
    finally:
        cluster.kubectl("delete", "node", *(n.name for n in nodes), "--wait=false", check=False)


def profiles(label: dict[str, str]) -> list[dict[str, Any]]:
    return [
        {"name": "h100", "gpu": {"product": H100, "nodeSelector": label}},
        {
            "name": "a10g",
            "gpu": {"product": A10G, "nodeSelector": label},
            "resources": {"gpus": 2},
            "engine": {"tensorParallelDegree": 2, "quantize": "fp8", "maxModelLen": 4096},
        },
    ]


def filler(namespace: str, label: dict[str, str]) -> dict[str, Any]:
    """A plain Deployment that takes every GPU of the test's H100 node."""
    doc = gpu_deployment("filler", 8)
    doc["spec"]["template"]["spec"]["nodeSelector"] = {**label, "nvidia.com/gpu.product": H100}
    return doc


def pod_ready(pod: dict[str, Any]) -> bool:
    return any(c["type"] == "Ready" and c["status"] == "True" for c in pod["status"].get("conditions", []))


def ready_pods(cluster: LocalCluster, namespace: str, name: str) -> list[dict[str, Any]]:
    """The model's pods that are ready and not terminating."""
    out = cluster.kubectl("get", "pods", "-n", namespace, "-l", f"{MODEL_LABEL}={name}", "-o", "json").stdout
    return [
        p for p in json.loads(out)["items"] if pod_ready(p) and not p["metadata"].get("deletionTimestamp")
    ]


def rows(obj: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {row["name"]: row for row in obj["status"].get("profiles", [])}


def test_replicas_fall_back_to_a10g_while_the_h100s_are_full_and_move_back_without_a_dip(
    cluster: LocalCluster, operator: OperatorThread, namespace: str, pool: dict[str, str]
) -> None:
    apply(cluster, namespace, filler(namespace, pool))
    cluster.kubectl("rollout", "status", "-n", namespace, "deployment/filler", "--timeout=60s")
    apply(cluster, namespace, model_doc("fallback", replicas=2, profiles=profiles(pool)))

    def on(profile: str) -> dict[str, Any] | None:
        obj = get(cluster, namespace, "lmimodel", "fallback")
        placed = (obj or {}).get("status", {}).get("profile") == profile
        ready = condition(obj, "Ready").get("status") == "True"
        return obj if placed and ready and rows(obj)[profile]["readyReplicas"] == 2 else None

    obj = eventually(lambda: on("a10g"), timeout=90, interval=1, what="both replicas on the A10G profile")
    assert rows(obj) == {
        "h100": {"name": "h100", "replicas": 0, "readyReplicas": 0, "reason": "NoFreeGPUs"},
        "a10g": {"name": "a10g", "replicas": 2, "readyReplicas": 2, "reason": "Placed"},
    }
    header, row = cluster.kubectl("get", "lmimodel", "fallback", "-n", namespace).stdout.splitlines()
    # Columns are aligned to the header; empty ones (no quantize) print nothing.
    assert row[header.index("PROFILE") :].split()[0] == "a10g", "the Profile column"
    # The A10G profile's replicas run with its own settings, on its nodes, behind the one Service.
    a10g = get(cluster, namespace, "deployment", "fallback-a10g")
    assert a10g is not None and a10g["spec"]["replicas"] == 2
    pod = a10g["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {**pool, "nvidia.com/gpu.product": A10G}
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "2"
    properties = get(cluster, namespace, "configmap", config_map_name("fallback-a10g"))
    assert properties is not None
    served = properties["data"]["serving.properties"]
    assert "option.quantize=fp8" in served and "option.max_model_len=4096" in served
    assert "option.tensor_parallel_degree=2" in served
    h100 = get(cluster, namespace, "deployment", "fallback-h100")
    assert h100 is not None and h100["spec"]["replicas"] == 0
    service = get(cluster, namespace, "service", "fallback")
    assert service is not None and PROFILE_LABEL not in service["spec"]["selector"]
    for p in ready_pods(cluster, namespace, "fallback"):
        assert p["metadata"]["labels"][PROFILE_LABEL] == "a10g"

    # Free the H100 node and watch the ready replicas, as the Service sees them, all along the move.
    lowest = [len(ready_pods(cluster, namespace, "fallback"))]
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            lowest[0] = min(lowest[0], len(ready_pods(cluster, namespace, "fallback")))
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        cluster.kubectl("delete", "deployment", "filler", "-n", namespace)
        obj = eventually(lambda: on("h100"), timeout=120, interval=1, what="both replicas back on H100")
    finally:
        stop.set()
        watcher.join()
    assert lowest[0] >= 2, f"the ready replicas dropped to {lowest[0]} while moving back"
    obj = wait_ready(cluster, namespace, "fallback")
    assert rows(obj)["h100"] == {"name": "h100", "replicas": 2, "readyReplicas": 2, "reason": "Placed"}
    assert rows(obj)["a10g"]["replicas"] == 0
    assert {p["metadata"]["labels"][PROFILE_LABEL] for p in ready_pods(cluster, namespace, "fallback")} == {
        "h100"
    }


def test_removing_the_profiles_deletes_their_deployments_and_serves_from_the_models_own(
    cluster: LocalCluster, operator: OperatorThread, namespace: str, pool: dict[str, str]
) -> None:
    apply(cluster, namespace, model_doc("switch", profiles=profiles(pool)))
    obj = wait_ready(cluster, namespace, "switch")
    assert obj["status"]["profile"] == "h100"
    assert get(cluster, namespace, "deployment", "switch") is None
    apply(cluster, namespace, model_doc("switch"))
    obj = wait_ready(cluster, namespace, "switch")
    assert "profiles" not in obj["status"] and "profile" not in obj["status"]
    gone = [("deployment", "switch-h100"), ("deployment", "switch-a10g")]
    gone += [("configmap", config_map_name(name)) for _, name in gone]
    eventually(
        lambda: all(get(cluster, namespace, kind, name) is None for kind, name in gone),
        what="the profiles' Deployments and ConfigMaps deleted",
    )
    assert get(cluster, namespace, "deployment", "switch") is not None
