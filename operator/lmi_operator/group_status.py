"""What the pods of a replica that spans nodes (a LeaderWorkerSet group, render_lws) say. Pure.

A group is one model server: it serves only when every one of its pods is Ready, and it is short of
GPUs unless enough distinct nodes each have a pod's GPUs free. A pod of a group that fails is not
restarted in place: LeaderWorkerSet deletes and recreates the whole group (RecreateGroupOnPodRestart),
so the failed pod, the only one that tells why, is gone within moments. The cache keeps it
(`failed_container` decides which pods to keep) until its group is whole and Ready again, and the
status quotes it (`crash_message`)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from lmi_operator.render import CONFIG_HASH
from lmi_operator.render_lws import GROUP_INDEX_LABEL, GROUP_SIZE_ANNOTATION, WORKER_INDEX_LABEL


def group_of(pod: Mapping[str, Any]) -> str | None:
    """The group index of a pod of a LeaderWorkerSet group, None for any other pod."""
    group = pod.get("metadata", {}).get("labels", {}).get(GROUP_INDEX_LABEL)
    return None if group is None else str(group)


def failed_container(pod: Mapping[str, Any]) -> tuple[str, Mapping[str, Any], int] | None:
    """(container name, its terminated state, restarts) of a container of `pod` that stopped with a
    non-zero exit code, now or before its last restart; None when none did."""
    status = pod.get("status", {})
    for cs in [*status.get("initContainerStatuses", []), *status.get("containerStatuses", [])]:
        for terminated in (cs.get("state", {}).get("terminated"), cs.get("lastState", {}).get("terminated")):
            if terminated and terminated.get("exitCode", 0) != 0:
                return str(cs.get("name")), terminated, int(cs.get("restartCount", 0))
    return None


def _ready(pod: Mapping[str, Any]) -> bool:
    conditions = pod.get("status", {}).get("conditions", [])
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def group_ready(pods: Iterable[Mapping[str, Any]], group: str) -> bool:
    """Whether the group has all its pods (the size LeaderWorkerSet annotates them with), each Ready
    and none being deleted."""
    members = [p for p in pods if group_of(p) == group and not p["metadata"].get("deletionTimestamp")]
    if not members:
        return False
    size = int(members[0]["metadata"].get("annotations", {}).get(GROUP_SIZE_ANNOTATION, len(members)))
    return len(members) >= size and all(map(_ready, members))


def ready_groups(pods: Iterable[Mapping[str, Any]], config_hash: str | None = None) -> int:
    """How many groups among `pods` are whole and Ready, counting only those whose pods all run the
    pod template of `config_hash` when it is given (a group of the template before is not the
    rollout's: LeaderWorkerSet reports no observedGeneration to tell its counts' age by)."""
    pods = list(pods)
    groups = {group_of(p) for p in pods} - {None}
    return sum(
        group_ready(pods, str(group))
        and (
            config_hash is None
            or all(
                p["metadata"].get("annotations", {}).get(CONFIG_HASH) == config_hash
                for p in pods
                if group_of(p) == group
            )
        )
        for group in groups
    )


def crash_message(pod: Mapping[str, Any], describe_exit: Callable[[Mapping[str, Any]], str]) -> str | None:
    """Which pod of which group failed and how (`describe_exit` words a terminated state), or None
    when the pod shows no failed container."""
    failed = failed_container(pod)
    if failed is None:
        return None
    container, terminated, restarts = failed
    meta = pod.get("metadata", {})
    worker = str(meta.get("labels", {}).get(WORKER_INDEX_LABEL, "?"))
    role = "the leader" if worker == "0" else f"worker {worker}"
    return (
        f"group {group_of(pod)}: {role} (pod {meta.get('name', '?')}) failed, container {container} "
        f"({describe_exit(terminated)}); LeaderWorkerSet recreates the whole group"
        + (f" (the pod had restarted {restarts} times)" if restarts > 1 else "")
    )


def shortage_message(gpus: int, nodes: int, resource: str, free_by_node: Mapping[str, int] | None) -> str:
    """Why a group cannot be placed: `nodes` distinct nodes with `gpus` free each are needed; how
    many nodes have that many free (None: not counted)."""
    needed = f"a replica is {nodes} pods with {gpus} {resource} each, on {nodes} distinct nodes"
    if free_by_node is None:
        return needed
    enough = sorted(n for n, free in free_by_node.items() if free >= gpus)
    listed = ", ".join(f"{n}={c}" for n, c in sorted(free_by_node.items())) or "no GPU nodes"
    return f"{needed}; {len(enough)} of the {nodes} nodes needed have {gpus} free ({listed})"
