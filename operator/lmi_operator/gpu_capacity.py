"""The GPUs of the cluster's nodes: free GPUs per node, for the InsufficientGPU message ("node a:
2 free, node b: 0 free"), and the GPU types a model may land on, for the memory fit (fit_status).

Only models short of GPUs and models being judged need them, and they list every node (and every
running pod): an answer is kept for a few seconds so that a burst of such models costs one listing."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from lmi_operator.capacity import GPU_PRODUCT_LABEL, gpu_memory_of
from lmi_operator.fit_status import GpuType
from lmi_operator.kube import KubeClient

# How long one listing answers for.
FRESH_SECONDS = 10.0


def _admits(node_selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    """Whether a node with `labels` is one `node_selector` selects."""
    return all(labels.get(k) == v for k, v in node_selector.items())


class GpuCapacity:
    """Unallocated GPUs of one extended resource per schedulable node, and the GPU types."""

    def __init__(self, client: KubeClient) -> None:
        self.client = client
        self._nodes: tuple[float, list[dict[str, Any]]] | None = None
        self._last: dict[str, tuple[float, dict[str, int]]] = {}

    async def _schedulable(self, gpu_resource: str) -> list[tuple[dict[str, Any], int]]:
        now = time.monotonic()
        if self._nodes is None or now - self._nodes[0] >= FRESH_SECONDS:
            self._nodes = (now, await self.client.list("/api/v1/nodes"))
        found = []
        for node in self._nodes[1]:
            gpus = int(node.get("status", {}).get("allocatable", {}).get(gpu_resource, "0") or 0)
            if gpus and not node.get("spec", {}).get("unschedulable"):
                found.append((node, gpus))
        return found

    async def free_by_node(self, gpu_resource: str) -> dict[str, int]:
        """Allocatable `gpu_resource` minus what running pods request, per schedulable node with any."""
        now = time.monotonic()
        if (last := self._last.get(gpu_resource)) is not None and now - last[0] < FRESH_SECONDS:
            return last[1]
        free = {node["metadata"]["name"]: gpus for node, gpus in await self._schedulable(gpu_resource)}
        pods = await self.client.list(
            "/api/v1/pods", fieldSelector="status.phase!=Succeeded,status.phase!=Failed"
        )
        for pod in pods:
            node_name = pod.get("spec", {}).get("nodeName")
            if node_name not in free:
                continue
            for c in pod["spec"].get("containers", []):
                free[node_name] -= int(c.get("resources", {}).get("requests", {}).get(gpu_resource, "0") or 0)
        self._last[gpu_resource] = (now, free)
        return free

    async def largest_node(self, gpu_resource: str) -> int:
        """The most `gpu_resource` one schedulable node has (0: none has any)."""
        return max((gpus for _, gpus in await self._schedulable(gpu_resource)), default=0)

    async def free_slots(self, gpu_resource: str, node_labels: Mapping[str, str], gpus: int) -> int:
        """Replicas of `gpus` GPUs each that the free GPUs of the nodes with `node_labels` still hold."""
        labels = {
            node["metadata"]["name"]: node["metadata"].get("labels", {})
            for node, _ in await self._schedulable(gpu_resource)
        }
        return sum(
            free // gpus
            for name, free in (await self.free_by_node(gpu_resource)).items()
            if free > 0 and _admits(node_labels, labels.get(name, {}))
        )

    async def gpu_types(self, gpu_resource: str, node_selector: Mapping[str, str]) -> list[GpuType]:
        """The GPU products of the schedulable nodes with `gpu_resource` that `node_selector` admits,
        with the memory of one GPU (labels of GPU feature discovery, else a table by product); nodes
        whose GPU memory nothing tells are left out."""
        types: dict[str, GpuType] = {}
        for node, gpus in await self._schedulable(gpu_resource):
            labels = node["metadata"].get("labels", {})
            memory = gpu_memory_of(labels)
            if memory is None or not _admits(node_selector, labels):
                continue
            product = labels.get(GPU_PRODUCT_LABEL) or f"{memory // 2**20} MiB GPU"
            known = types.get(product)
            types[product] = GpuType(product, memory, max(gpus, known.per_node if known else 0))
        return list(types.values())
