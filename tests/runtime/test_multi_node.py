"""A replica across nodes: LeaderWorkerSet's environment to vLLM's multi-node arguments, through the
installed vLLM's real argument parser and validation (runtime/lmi_runtime/multi_node.py)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lmi_runtime.errors import RuntimeConfigError
from lmi_runtime.multi_node import MASTER_PORT, group_of
from tests.runtime.test_config import resolved

GROUP = {"LWS_GROUP_SIZE": "2", "LWS_LEADER_ADDRESS": "m-0.m.ns"}


def test_the_leader_and_a_worker_of_a_group_are_nodes_of_one_engine(tmp_path: Path) -> None:
    options = {"option.model_id": str(tmp_path), "option.tensor_parallel_degree": "4"}
    leader = resolved(tmp_path, options, {**GROUP, "LWS_WORKER_INDEX": "0"})
    worker = resolved(tmp_path, options, {**GROUP, "LWS_WORKER_INDEX": "1"})
    for config, rank in ((leader, 0), (worker, 1)):
        ns = config.namespace
        assert (ns.nnodes, ns.node_rank, ns.master_addr, ns.master_port) == (2, rank, "m-0.m.ns", MASTER_PORT)
        assert ns.distributed_executor_backend == "mp"
        assert ns.tensor_parallel_size == 4
    assert not leader.headless and worker.headless


def test_max_tensor_parallel_spans_the_gpus_of_every_node(tmp_path: Path) -> None:
    options = {"option.model_id": str(tmp_path), "option.tensor_parallel_degree": "max"}
    config = resolved(tmp_path, options, {**GROUP, "LWS_WORKER_INDEX": "0"}, gpus=8)
    assert config.namespace.tensor_parallel_size == 16


def test_a_pod_outside_a_group_is_a_replica_of_its_own(tmp_path: Path) -> None:
    assert group_of({}) is None and group_of({"LWS_GROUP_SIZE": "1", "LWS_WORKER_INDEX": "0"}) is None
    config = resolved(tmp_path, {"option.model_id": str(tmp_path)}, {})
    assert config.namespace.nnodes == 1 and not config.headless


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"LWS_GROUP_SIZE": "two"}, "LWS_GROUP_SIZE='two': expected an integer of at least 1"),
        ({**GROUP, "LWS_WORKER_INDEX": "2"}, "LWS_WORKER_INDEX=2: expected below LWS_GROUP_SIZE=2"),
        ({**GROUP}, "LWS_WORKER_INDEX='': expected an integer of at least 0"),
        (
            {"LWS_GROUP_SIZE": "2", "LWS_WORKER_INDEX": "1"},
            "LWS_LEADER_ADDRESS is empty: a group of 2 pods needs its leader's address",
        ),
    ],
)
def test_a_broken_group_environment_is_named(env: dict[str, str], message: str) -> None:
    with pytest.raises(RuntimeConfigError, match="^" + re.escape(message)):
        group_of(env)


def test_the_group_settings_are_the_runtimes_not_options(tmp_path: Path) -> None:
    with pytest.raises(RuntimeConfigError, match=re.escape("option.nnodes=2: set by the runtime")):
        resolved(tmp_path, {"option.model_id": str(tmp_path), "option.nnodes": "2"}, {})
