"""Churn: 2,000 LMIModels created and deleted in waves against a real `lmi-operator run` process; its
state follows the live models (a deleted model's entry goes once its children are gone) and its
resident memory comes back to where it was before the churn."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lmi_operator.testing.cluster import LocalCluster
from tests.operator_process import OperatorProcess
from tests.waiting import eventually

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

WAVES = 4
PER_WAVE = 500
CACHED = "lmi_operator_cached_models"


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def models(prefix: str, count: int) -> str:
    """`count` models without pods (replicas 0): the churn is of the operator's objects, not pods."""
    docs = [
        {
            "apiVersion": "serving.lmi.dev/v1alpha1",
            "kind": "LMIModel",
            "metadata": {"name": f"{prefix}-{i}"},
            "spec": {"model": {"id": "Qwen/Qwen2.5-0.5B-Instruct"}, "replicas": 0, "resources": {"gpus": 0}},
        }
        for i in range(count)
    ]
    return yaml.safe_dump_all(docs)


def wave(cluster: LocalCluster, namespace: str, proc: OperatorProcess, prefix: str, count: int) -> float:
    """Create `count` models, wait until each has its Deployment and a status, delete them all, wait
    until the operator holds no state; returns the peak RSS seen (MiB)."""
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=models(prefix, count), timeout=600)
    peak = [rss_mib(proc.pid)]

    def reported() -> bool:
        peak.append(rss_mib(proc.pid))
        out = cluster.kubectl(
            "get", "lmimodels", "-n", namespace, "-o", "jsonpath={.items[*].status.observedGeneration}"
        ).stdout.split()
        return len(out) == count

    eventually(reported, timeout=600, interval=2, what=f"{count} models of wave {prefix} reported")
    cluster.kubectl("delete", "lmimodels", "--all", "-n", namespace, "--wait=false", timeout=600)
    eventually(
        lambda: proc.metrics().get(CACHED) == 0.0,
        timeout=600,
        interval=2,
        what=f"the operator's state for wave {prefix} dropped (children deleted by the garbage collector)",
    )
    return max(peak)


def test_operator_memory_returns_after_2000_models_come_and_go(
    cluster: LocalCluster, lmi_crd: str, namespace: str, tmp_path: Path
) -> None:
    env = {"LMI_OPERATOR_LEADER_ELECTION": "false", "LMI_OPERATOR_NAMESPACES": namespace}
    proc = OperatorProcess(cluster.kubeconfig, tmp_path / "operator.log", "churn", env).start()
    try:
        proc.wait_ready()
        # A first small wave warms up what stays for the process's life (imports, kopf's watchers,
        # the metric series of every reason): "before" is the operator in service, not at start.
        wave(cluster, namespace, proc, "warm", 50)
        before = rss_mib(proc.pid)
        peaks = [wave(cluster, namespace, proc, f"w{n}", PER_WAVE) for n in range(WAVES)]
        after = rss_mib(proc.pid)
        print(
            f"operator RSS: {before:.1f} MiB before, peaks {[round(p) for p in peaks]}, {after:.1f} MiB after"
        )
        assert after <= before * 1.10, f"RSS {after:.1f} MiB after the churn, {before:.1f} MiB before"
        assert proc.metrics().get(CACHED) == 0.0
    finally:
        proc.kill()
