"""Rendering a replica of several nodes (spec.resources.nodes above 1) as a LeaderWorkerSet group.

One LeaderWorkerSet (leaderworkerset.x-k8s.io/v1) instead of the Deployment: `replicas` groups of
`size` = nodes pods, created, scheduled, restarted and rolled as a unit by the LeaderWorkerSet
controller. Every pod runs the same model server; the runtime reads the group's place from the
LWS_* variables LeaderWorkerSet sets (lmi_runtime.multi_node): the leader (worker index 0) serves
HTTP, the workers run headless, so they have no HTTP port and no HTTP probes (a worker is ready once
it runs; a worker that fails restarts the whole group: RecreateGroupOnPodRestart). The group starts
once its leader pod exists (LeaderCreated: the workers need the leader's address to rendezvous).
The model's Service selects leaders only (LEADER_SELECTOR). The LeaderWorkerSet is named
`<model>-group`: LeaderWorkerSet names the headless Service its pods resolve each other through
after itself, and `<model>` is the model's own Service. Pure."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

LWS_API_VERSION = "leaderworkerset.x-k8s.io/v1"
LWS_KIND = "LeaderWorkerSet"
WORKER_INDEX_LABEL = "leaderworkerset.sigs.k8s.io/worker-index"
GROUP_INDEX_LABEL = "leaderworkerset.sigs.k8s.io/group-index"
# LeaderWorkerSet's annotation on every pod of a group: how many pods the group has.
GROUP_SIZE_ANNOTATION = "leaderworkerset.sigs.k8s.io/size"
# Each group's pods in one domain of this node label, no other group in it (LeaderWorkerSet's own).
EXCLUSIVE_TOPOLOGY_ANNOTATION = "leaderworkerset.sigs.k8s.io/exclusive-topology"
# Added to the Service's selector: the leader is the group's pod of worker index 0.
LEADER_SELECTOR = {WORKER_INDEX_LABEL: "0"}
PROBES = ("startupProbe", "readinessProbe", "livenessProbe")
# vLLM's processes on each node announce this address to the others (the pod's, not a guess).
HOST_IP_ENV = {"name": "VLLM_HOST_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}


def group_set_name(model: str) -> str:
    """The name of a model's LeaderWorkerSet (its leaders are `<name>-<group>`, workers
    `<name>-<group>-<worker>`)."""
    return f"{model}-group"


def serves_http(pod: Mapping[str, Any]) -> bool:
    """Whether a model's pod runs the HTTP server: any pod outside a group, a group's leader."""
    return str(pod.get("metadata", {}).get("labels", {}).get(WORKER_INDEX_LABEL, "0")) == "0"


def _with_host_ip(pod: dict[str, Any]) -> dict[str, Any]:
    pod = copy.deepcopy(pod)
    # The init container too: it reads the same settings from the same environment.
    for container in [*pod.get("initContainers", []), *pod["containers"]]:
        container["env"] = [*container.get("env", []), HOST_IP_ENV]
    return pod


def worker_pod(leader: dict[str, Any]) -> dict[str, Any]:
    """The workers' pod spec: the leader's, without the HTTP ports and probes (workers serve none)."""
    pod = copy.deepcopy(leader)
    for container in pod["containers"]:
        for probe in PROBES:
            container.pop(probe, None)
        container.pop("ports", None)
    return pod


def leader_worker_set(
    metadata: dict[str, Any],
    template_metadata: dict[str, Any],
    pod: dict[str, Any],
    replicas: int,
    nodes: int,
    rolling: Mapping[str, int | str],
    exclusive_topology: str | None = None,
) -> dict[str, Any]:
    """The LeaderWorkerSet of `replicas` groups of `nodes` pods each, from the leader's pod spec,
    rolled group by group within `rolling` (maxSurge and maxUnavailable, in groups)."""
    leader = _with_host_ip(pod)
    if exclusive_topology is not None:
        metadata = metadata | {
            "annotations": {
                **metadata.get("annotations", {}),
                EXCLUSIVE_TOPOLOGY_ANNOTATION: exclusive_topology,
            }
        }
    return {
        "apiVersion": LWS_API_VERSION,
        "kind": LWS_KIND,
        "metadata": metadata,
        "spec": {
            "replicas": replicas,
            "startupPolicy": "LeaderCreated",
            "rolloutStrategy": {"type": "RollingUpdate", "rollingUpdateConfiguration": dict(rolling)},
            "leaderWorkerTemplate": {
                "size": nodes,
                "restartPolicy": "RecreateGroupOnPodRestart",
                "leaderTemplate": {"metadata": copy.deepcopy(template_metadata), "spec": leader},
                "workerTemplate": {"metadata": copy.deepcopy(template_metadata), "spec": worker_pod(leader)},
            },
            "networkConfig": {"subdomainPolicy": "Shared"},
        },
    }
