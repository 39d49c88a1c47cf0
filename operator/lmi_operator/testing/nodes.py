"""Fake nodes for the local cluster: kwok-managed GPU nodes labelled and tainted like real ones."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

KWOK_ANNOTATION = "kwok.x-k8s.io/node"
GPU_TAINT_KEY = "nvidia.com/gpu"


@dataclass(frozen=True)
class FakeNode:
    """One kwok node; `gpus` > 0 makes it a GPU node with the NVIDIA GPU feature discovery labels."""

    name: str
    gpus: int = 0
    product: str = ""
    gpu_memory_mib: int = 0
    family: str = ""
    instance_type: str = ""
    cpu: str = "96"
    memory: str = "1024Gi"
    pods: str = "110"
    extra_labels: dict[str, str] = field(default_factory=dict)

    def labels(self) -> dict[str, str]:
        """The labels a node of this kind carries in a real cluster (GFD, NFD and well-known ones)."""
        labels = {
            "kubernetes.io/hostname": self.name,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": "amd64",
            "type": "kwok",
        }
        if self.instance_type:
            labels["node.kubernetes.io/instance-type"] = self.instance_type
        if self.gpus:
            labels |= {
                "nvidia.com/gpu.present": "true",
                "nvidia.com/gpu.product": self.product,
                "nvidia.com/gpu.count": str(self.gpus),
                "nvidia.com/gpu.memory": str(self.gpu_memory_mib),
                "nvidia.com/gpu.family": self.family,
                "nvidia.com/cuda.driver.major": "580",
                "nvidia.com/mig.capable": "false",
            }
        return labels | self.extra_labels

    def manifest(self) -> dict[str, Any]:
        """The Node object to create; status carries the capacity the scheduler fits pods against."""
        resources = {"cpu": self.cpu, "memory": self.memory, "pods": self.pods}
        if self.gpus:
            resources["nvidia.com/gpu"] = str(self.gpus)
        spec: dict[str, Any] = {}
        if self.gpus:
            # GPU node pools are tainted so that only pods asking for GPUs land there.
            spec["taints"] = [{"key": GPU_TAINT_KEY, "value": "present", "effect": "NoSchedule"}]
        return {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": self.name,
                "labels": self.labels(),
                "annotations": {KWOK_ANNOTATION: "fake", "node.alpha.kubernetes.io/ttl": "0"},
            },
            "spec": spec,
            "status": {"capacity": resources, "allocatable": resources},
        }


def h100_node(name: str, pods: str = "110") -> FakeNode:
    """A p5.48xlarge-like node: 8 H100 80GB GPUs."""
    return FakeNode(
        name=name,
        gpus=8,
        product="NVIDIA-H100-80GB-HBM3",
        gpu_memory_mib=81559,
        family="hopper",
        instance_type="p5.48xlarge",
        cpu="192",
        memory="2048Gi",
        pods=pods,
    )


DEFAULT_NODES: tuple[FakeNode, ...] = (
    h100_node("gpu-h100-0"),
    h100_node("gpu-h100-1"),
    FakeNode(
        name="gpu-a10g-0",
        gpus=4,
        product="NVIDIA-A10G",
        gpu_memory_mib=23028,
        family="ampere",
        instance_type="g5.12xlarge",
        cpu="48",
        memory="192Gi",
    ),
    # Where the operator's own pod (Helm tests) and other CPU workloads are scheduled.
    FakeNode(name="cpu-0", instance_type="m7i.4xlarge", cpu="16", memory="64Gi"),
)


def gpu_deployment(name: str, gpus: int) -> dict[str, Any]:
    """A plain Deployment of one pod asking for `gpus` GPUs (and tolerating the GPU taint): what
    kube-controller-manager and the scheduler handle without any operator."""
    labels = {"app": name}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "tolerations": [{"key": GPU_TAINT_KEY, "operator": "Exists", "effect": "NoSchedule"}],
                    "containers": [
                        {
                            "name": "model-server",
                            "image": "ghcr.io/lmi-operator/lmi-runtime:0.1.0",
                            "resources": {"limits": {"nvidia.com/gpu": str(gpus)}},
                        }
                    ],
                },
            },
        },
    }
