"""Free GPUs per node, for the InsufficientGPU message ("node a: 2 free, node b: 0 free").

Only a model short of GPUs needs it, and it lists every node and every running pod: the answer is
kept for a few seconds so that a burst of such models costs one listing."""

from __future__ import annotations

import time

from lmi_operator.kube import KubeClient

# How long one listing answers for.
FRESH_SECONDS = 10.0


class GpuCapacity:
    """Unallocated GPUs of one extended resource per schedulable node."""

    def __init__(self, client: KubeClient) -> None:
        self.client = client
        self._last: dict[str, tuple[float, dict[str, int]]] = {}

    async def free_by_node(self, gpu_resource: str) -> dict[str, int]:
        """Allocatable `gpu_resource` minus what running pods request, per schedulable node with any."""
        now = time.monotonic()
        if (last := self._last.get(gpu_resource)) is not None and now - last[0] < FRESH_SECONDS:
            return last[1]
        free: dict[str, int] = {}
        for node in await self.client.list("/api/v1/nodes"):
            gpus = int(node.get("status", {}).get("allocatable", {}).get(gpu_resource, "0") or 0)
            if gpus and not node.get("spec", {}).get("unschedulable"):
                free[node["metadata"]["name"]] = gpus
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
