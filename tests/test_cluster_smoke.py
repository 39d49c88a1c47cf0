"""The local control plane behaves like a real cluster: scheduling on GPU capacity, garbage
collection, CRDs and pod security admission."""

from __future__ import annotations

import json
from typing import Any

import pytest

from lmi_operator.testing.cluster import LocalCluster
from lmi_operator.testing.nodes import gpu_deployment
from tests.waiting import eventually

pytestmark = pytest.mark.cluster


def pods(cluster: LocalCluster, namespace: str, selector: str) -> list[dict[str, Any]]:
    out = cluster.kubectl("get", "pods", "-n", namespace, "-l", selector, "-o", "json").stdout
    items: list[dict[str, Any]] = json.loads(out)["items"]
    return items


def test_fake_gpu_nodes_advertise_capacity(cluster: LocalCluster) -> None:
    nodes = json.loads(cluster.kubectl("get", "nodes", "-o", "json").stdout)["items"]
    gpus = {n["metadata"]["name"]: n["status"]["allocatable"].get("nvidia.com/gpu") for n in nodes}
    assert {name: gpus[name] for name in ("gpu-h100-0", "gpu-h100-1", "gpu-a10g-0", "cpu-0")} == {
        "gpu-h100-0": "8",
        "gpu-h100-1": "8",
        "gpu-a10g-0": "4",
        "cpu-0": None,
    }
    assert set(gpus.values()) <= {"8", "4", None}
    h100 = next(n for n in nodes if n["metadata"]["name"] == "gpu-h100-0")
    assert h100["metadata"]["labels"]["nvidia.com/gpu.product"] == "NVIDIA-H100-80GB-HBM3"


def test_one_gpu_deployment_gets_a_ready_pod_on_a_gpu_node(cluster: LocalCluster, namespace: str) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(gpu_deployment("one", 1)))

    def ready_pod() -> dict[str, Any] | None:
        for pod in pods(cluster, namespace, "app=one"):
            conditions = pod["status"].get("conditions", [])
            if any(c["type"] == "Ready" and c["status"] == "True" for c in conditions):
                return pod
        return None

    pod = eventually(ready_pod, timeout=60, what="a Ready pod")
    assert pod["spec"]["nodeName"].startswith("gpu-")
    cluster.kubectl("wait", "-n", namespace, "--for=condition=Available", "deployment/one", "--timeout=30s")


def test_a_pod_marked_unready_by_the_node_controller_is_reported_ready_again(
    cluster: LocalCluster, namespace: str
) -> None:
    # What the node lifecycle controller writes when a node misses its heartbeats (after an API
    # outage kwok's heartbeats lag); a kubelet's next status sync reports the pod Ready again.
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(gpu_deployment("again", 1)))

    def ready() -> str | None:
        for pod in pods(cluster, namespace, "app=again"):
            conditions = pod["status"].get("conditions", [])
            if any(c["type"] == "Ready" and c["status"] == "True" for c in conditions):
                return str(pod["metadata"]["name"])
        return None

    name = eventually(ready, timeout=60, what="a Ready pod")
    unready = {"status": {"conditions": [{"type": "Ready", "status": "False", "reason": "NodeNotReady"}]}}
    cluster.kubectl("patch", "pod", name, "-n", namespace, "--subresource=status", "-p", json.dumps(unready))
    assert eventually(ready, timeout=30, what="the pod Ready again") == name


def test_nine_gpus_stay_pending_with_the_schedulers_reason(cluster: LocalCluster, namespace: str) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(gpu_deployment("nine", 9)))

    def unschedulable_message() -> str | None:
        for pod in pods(cluster, namespace, "app=nine"):
            for c in pod["status"].get("conditions", []):
                if c["type"] == "PodScheduled" and c.get("reason") == "Unschedulable":
                    return str(c["message"])
        return None

    message = eventually(unschedulable_message, timeout=60, what="an Unschedulable pod")
    assert "Insufficient nvidia.com/gpu" in message
    (pod,) = pods(cluster, namespace, "app=nine")
    assert pod["status"]["phase"] == "Pending"
    events = cluster.kubectl(
        "get", "events", "-n", namespace, "--field-selector", f"involvedObject.name={pod['metadata']['name']}"
    ).stdout
    assert "FailedScheduling" in events and "Insufficient nvidia.com/gpu" in events


def test_deleting_an_owner_deletes_what_it_owns(cluster: LocalCluster, namespace: str) -> None:
    cluster.kubectl("create", "configmap", "owner", "-n", namespace)
    uid = cluster.kubectl(
        "get", "configmap", "owner", "-n", namespace, "-o", "jsonpath={.metadata.uid}"
    ).stdout
    child = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": "child",
            "ownerReferences": [{"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": uid}],
        },
    }
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(child))
    cluster.kubectl("delete", "configmap", "owner", "-n", namespace)

    def child_gone() -> bool:
        return cluster.kubectl("get", "configmap", "child", "-n", namespace, check=False).returncode != 0

    eventually(child_gone, timeout=60, what="the garbage collector to delete the child")


def test_a_crd_becomes_served(cluster: LocalCluster, namespace: str) -> None:
    crd = {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": "widgets.smoke.example.com"},
        "spec": {
            "group": "smoke.example.com",
            "names": {"kind": "Widget", "plural": "widgets", "singular": "widget"},
            "scope": "Namespaced",
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "properties": {
                                "spec": {"type": "object", "properties": {"size": {"type": "integer"}}}
                            },
                        }
                    },
                }
            ],
        },
    }
    cluster.kubectl("apply", "-f", "-", input=json.dumps(crd))
    cluster.kubectl("wait", "--for=condition=Established", "crd/widgets.smoke.example.com", "--timeout=60s")
    widget = {
        "apiVersion": "smoke.example.com/v1",
        "kind": "Widget",
        "metadata": {"name": "w"},
        "spec": {"size": 3},
    }
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(widget))
    got = json.loads(cluster.kubectl("get", "widget", "w", "-n", namespace, "-o", "json").stdout)
    assert got["spec"] == {"size": 3}


def test_restricted_namespace_rejects_a_privileged_pod(cluster: LocalCluster, namespace: str) -> None:
    cluster.kubectl("label", "namespace", namespace, "pod-security.kubernetes.io/enforce=restricted")
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "privileged"},
        "spec": {
            "containers": [
                {"name": "main", "image": "example.invalid/x:1", "securityContext": {"privileged": True}}
            ]
        },
    }
    proc = cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(pod), check=False)
    assert proc.returncode != 0
    assert 'violates PodSecurity "restricted:latest"' in proc.stderr
    assert "privileged" in proc.stderr
