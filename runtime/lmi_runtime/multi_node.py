"""A replica across nodes: the LeaderWorkerSet group's environment to vLLM's multi-node settings.

LeaderWorkerSet sets LWS_LEADER_ADDRESS, LWS_GROUP_SIZE and LWS_WORKER_INDEX in every pod of a group
(one leader, index 0, and size - 1 workers). In a group of more than one pod, the runtime runs vLLM's
own multi-process backend across nodes, as vLLM documents multi-node serving without Ray: every pod
gets the same engine arguments plus --nnodes, --node-rank, --master-addr and --master-port; the
leader serves HTTP and runs the engine's API, the workers run headless (their GPUs join the leader's
engine through torch.distributed). A pod outside a group (no LWS_GROUP_SIZE, or 1) is a replica of
its own. Pure."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from lmi_runtime.errors import RuntimeConfigError

LEADER_ADDRESS_ENV = "LWS_LEADER_ADDRESS"
GROUP_SIZE_ENV = "LWS_GROUP_SIZE"
WORKER_INDEX_ENV = "LWS_WORKER_INDEX"
# The leader's torch.distributed rendezvous port (vLLM's default master port is taken by nothing
# else in the pod, but naming it keeps leader and workers in step whatever the default becomes).
MASTER_PORT = 29501


@dataclass(frozen=True)
class Group:
    """This pod's place in its replica's group."""

    size: int
    rank: int
    leader: str

    @property
    def worker(self) -> bool:
        """Whether this pod is a worker: it serves no HTTP, its GPUs join the leader's engine."""
        return self.rank > 0

    def engine_settings(self) -> dict[str, str]:
        """vLLM serve arguments (dest: value) that make this pod its group's node `rank`."""
        return {
            "nnodes": str(self.size),
            "node_rank": str(self.rank),
            "master_addr": self.leader,
            "master_port": str(MASTER_PORT),
            "distributed_executor_backend": "mp",
        }


def _int(environ: Mapping[str, str], name: str, lowest: int) -> int:
    value = environ.get(name, "")
    try:
        number = int(value)
    except ValueError:
        number = lowest - 1
    if number < lowest:
        raise RuntimeConfigError(
            f"{name}={value!r}: expected an integer of at least {lowest} (set by LeaderWorkerSet)"
        )
    return number


def group_of(environ: Mapping[str, str]) -> Group | None:
    """This pod's group from LeaderWorkerSet's environment, or None for a replica of one pod."""
    if not environ.get(GROUP_SIZE_ENV, "").strip():
        return None
    size = _int(environ, GROUP_SIZE_ENV, 1)
    if size == 1:
        return None
    rank = _int(environ, WORKER_INDEX_ENV, 0)
    if rank >= size:
        raise RuntimeConfigError(f"{WORKER_INDEX_ENV}={rank}: expected below {GROUP_SIZE_ENV}={size}")
    leader = environ.get(LEADER_ADDRESS_ENV, "").strip()
    if not leader:
        raise RuntimeConfigError(
            f"{LEADER_ADDRESS_ENV} is empty: a group of {size} pods needs its leader's address"
        )
    return Group(size=size, rank=rank, leader=leader)
