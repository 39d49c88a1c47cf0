"""Churn: 2,000 LMIModels created and deleted in waves against a real `lmi-operator run` process; its
state follows the live models (a deleted model's entry goes once its children are gone) and its
resident memory after the churn is where it was before it."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from lmi_operator.render import MANAGED_SELECTOR
from lmi_operator.testing.cluster import LocalCluster
from tests.kubeapi import Api
from tests.operator_process import OperatorProcess
from tests.waiting import eventually

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

WAVES = 4
PER_WAVE = 500
CACHED = "lmi_operator_cached_models"
MODELS = "/apis/serving.lmi.dev/v1alpha1/namespaces/{ns}/lmimodels"
# What the garbage collector would delete after the models (at kube-controller-manager's 20 requests
# a second: minutes per wave); the test deletes them by collection, as deletions the operator sees.
CHILDREN = (
    "/apis/apps/v1/namespaces/{ns}/deployments",
    "/apis/apps/v1/namespaces/{ns}/replicasets",
    "/api/v1/namespaces/{ns}/configmaps",
    "/api/v1/namespaces/{ns}/services",
)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def model(name: str) -> dict[str, Any]:
    """A model without pods (replicas 0): the churn is of the operator's objects, not of pods."""
    return {
        "apiVersion": "serving.lmi.dev/v1alpha1",
        "kind": "LMIModel",
        "metadata": {"name": name},
        "spec": {"model": {"id": "Qwen/Qwen2.5-0.5B-Instruct"}, "replicas": 0, "resources": {"gpus": 0}},
    }


def wave(api: Api, namespace: str, proc: OperatorProcess, prefix: str, count: int) -> float:
    """Create `count` models, wait until each has a status, delete them and their children, wait
    until the operator holds no state; returns the peak RSS seen (MiB)."""
    path = MODELS.format(ns=namespace)
    with ThreadPoolExecutor(8) as pool:
        created = list(pool.map(lambda i: api.request("POST", path, model(f"{prefix}-{i}"))[0], range(count)))
    assert set(created) == {201}, created
    peak = [rss_mib(proc.pid)]

    def reported() -> bool:
        peak.append(rss_mib(proc.pid))
        status, listed = api.request("GET", path)
        return status == 200 and sum(1 for m in listed["items"] if m.get("status")) == count

    eventually(reported, timeout=600, interval=1, what=f"{count} models of wave {prefix} with a status")
    assert api.request("DELETE", path)[0] == 200
    for children in CHILDREN:
        status, answer = api.request(
            "DELETE", f"{children.format(ns=namespace)}?labelSelector={quote(MANAGED_SELECTOR)}"
        )
        assert status == 200, answer
    eventually(
        lambda: proc.metrics().get(CACHED) == 0.0,
        timeout=300,
        interval=1,
        what=f"the operator's state for wave {prefix} dropped",
    )
    return max(peak)


def test_operator_memory_returns_after_2000_models_come_and_go(
    cluster: LocalCluster, lmi_crd: str, namespace: str, tmp_path: Path
) -> None:
    env = {"LMI_OPERATOR_LEADER_ELECTION": "false", "LMI_OPERATOR_NAMESPACES": namespace}
    proc = OperatorProcess(cluster.kubeconfig, tmp_path / "operator.log", "churn", env).start()
    api = Api(cluster.kubeconfig)
    try:
        proc.wait_ready()
        started = rss_mib(proc.pid)
        # The level in service: after a first wave of the churn's size. CPython and malloc keep the
        # pages of a burst's peak (measured: 85 MiB before 500 models, 110 after them and 110 after
        # 500 more; tracemalloc finds no objects left), so the question is whether 2,000 more grow it.
        warm_peak = wave(api, namespace, proc, "warm", PER_WAVE)
        time.sleep(25)  # the operator trims freed memory once its cache held still for 10 s
        before = rss_mib(proc.pid)
        peaks = [wave(api, namespace, proc, f"w{n}", PER_WAVE) for n in range(WAVES)]

        def settled() -> float | None:
            now = rss_mib(proc.pid)
            return now if now <= before * 1.10 else None

        after = eventually(settled, timeout=60, interval=2, what=f"RSS within 10% of {before:.1f} MiB")
        print(
            f"operator RSS (MiB): {started:.1f} at start, {warm_peak:.1f} peak of the first wave, "
            f"{before:.1f} before the churn, peaks {[round(p, 1) for p in peaks]}, {after:.1f} after"
        )
        assert proc.metrics().get(CACHED) == 0.0
    finally:
        proc.kill()
