"""Adding LoRA adapters to a running model on the real local node, against a rollout, in one run.

    .venv/bin/python bench/adapters.py      (make bench-adapters)

One LMIModel serves the tests' tiny Llama from the runtime CPU image (with the model and adapters
baked in) on 2 replicas. Measured, each from the spec change to the moment it is observed:
1. ours: a spec change that adds 10 adapters, to AdaptersReady=True on both replicas (polled every
   0.2 s), with the operator's Kubernetes API writes and management PUTs for that change, and
   whether any pod restarted;
2. baseline: what a restart-based approach costs for the same change: a spec change that rolls the
   Deployment (an env var), to Ready=True with both new replicas serving.
Prints the figures and the ratio ours/baseline."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

from lmi_operator.settings import OperatorSettings
from lmi_operator.testing.cluster import REPO_ROOT, LocalCluster, tools_bin_dir
from lmi_operator.testing.operator import OperatorThread
from lmi_operator.testing.product_images import build_model_image, cpu_model
from lmi_operator.testing.tiny_model import build_adapter, build_model

NAME, NAMESPACE, ADAPTERS = "adapters", "bench", 10
MODEL_PATH, ADAPTER_DIR = "/opt/models/tiny", "/opt/models/adapters"


def log(message: str) -> None:
    print(f"[adapters {time.strftime('%H:%M:%S')}] {message}", flush=True)


def model(cluster: LocalCluster) -> dict[str, Any]:
    return json.loads(cluster.kubectl("get", "lmimodel", NAME, "-n", NAMESPACE, "-o", "json").stdout)


def condition(obj: dict[str, Any], kind: str) -> dict[str, Any]:
    return next((c for c in obj.get("status", {}).get("conditions", []) if c["type"] == kind), {})


def pod_state(cluster: LocalCluster) -> dict[str, int]:
    """Pod uid -> restarts of its containers, for the model's pods that are not going away."""
    out = cluster.kubectl(
        "get", "pods", "-n", NAMESPACE, "-l", f"app.kubernetes.io/instance={NAME}", "-o", "json"
    )
    return {
        p["metadata"]["uid"]: sum(c["restartCount"] for c in p["status"].get("containerStatuses", []))
        for p in json.loads(out.stdout)["items"]
        if not p["metadata"].get("deletionTimestamp")
    }


def wait_for(what: str, done: Any, timeout: float = 900, interval: float = 0.2) -> float:
    """Seconds until `done()` holds."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if done():
            return time.monotonic() - start
        time.sleep(interval)
    raise TimeoutError(f"{what} not within {timeout}s")


def apply(cluster: LocalCluster, doc: dict[str, Any]) -> None:
    cluster.kubectl("apply", "-n", NAMESPACE, "-f", "-", input=json.dumps(doc))


def writes(operator: OperatorThread) -> int:
    """The operator's Kubernetes API writes so far."""
    assert operator.reconciler is not None
    return sum(n for verb, n in operator.reconciler.client.requests.items() if verb != "GET")


def main() -> None:
    """Run both changes and print their figures and the ratio."""
    work = Path(tempfile.mkdtemp(prefix="lmi-adapters-"))
    cluster = LocalCluster(work / "cluster", tools_bin_dir(), real_node=True)
    log("starting the local cluster with the real node")
    cluster.start()
    operator: OperatorThread | None = None
    try:
        assert cluster.real_node is not None
        build_model(work / "tiny")
        for i in range(ADAPTERS):
            build_adapter(work / "tiny", work / "adapters" / f"b{i:02d}", seed=10 + i)
        log("building and importing the model image")
        image = cluster.real_node.import_image(
            build_model_image(work, {"tiny": MODEL_PATH, "adapters": ADAPTER_DIR}, "lmi/bench-adapters:test")
        )
        cluster.kubectl("apply", "--server-side", "-f", str(REPO_ROOT / "crds"))
        cluster.kubectl("wait", "--for=condition=Established", "crd/lmimodels.serving.lmi.dev")
        operator = OperatorThread(
            cluster.kubeconfig, OperatorSettings(leader_election=False, metrics_port=0, health_port=0)
        ).start()
        cluster.kubectl("create", "namespace", NAMESPACE)
        doc = cpu_model(
            NAME, image, MODEL_PATH, replicas=2, lora={"enabled": True, "maxLoraRank": 8, "adapters": []}
        )
        # Half a core each: the rollout's surge replica must fit beside the two on the 2-core node.
        doc["spec"]["resources"] |= {"cpu": "500m", "memory": "5Gi"}
        apply(cluster, doc)
        log("waiting for 2 ready replicas")
        wait_for("Ready", lambda: condition(model(cluster), "Ready").get("status") == "True", interval=2)
        wait_for("AdaptersReady", lambda: condition(model(cluster), "AdaptersReady").get("status") == "True")
        pods_before = pod_state(cluster)
        assert operator.reconciler is not None
        sync = operator.reconciler.status.adapters
        writes0, puts0 = writes(operator), sync.updates

        log(f"ours: adding {ADAPTERS} adapters")
        doc["spec"]["lora"]["adapters"] = [
            {"name": f"b{i:02d}", "source": f"{ADAPTER_DIR}/b{i:02d}"} for i in range(ADAPTERS)
        ]
        apply(cluster, doc)

        def converged() -> bool:
            obj = model(cluster)
            ready = condition(obj, "AdaptersReady")
            return (
                ready.get("status") == "True"
                and ready.get("observedGeneration") == obj["metadata"]["generation"]
            )

        ours = wait_for("AdaptersReady after the change", converged)
        time.sleep(3)  # the writes that follow the last observation (status) are part of the change
        ours_writes, ours_puts = writes(operator) - writes0, sync.updates - puts0
        restarted = pod_state(cluster) != pods_before
        log(
            f"ours: {ours:.1f}s, {ours_writes} API writes, {ours_puts} management PUTs, restarts: {restarted}"
        )

        log("baseline: a change that rolls both replicas")
        doc["spec"]["env"] = [*doc["spec"]["env"], {"name": "BENCH_ROLL", "value": "1"}]
        apply(cluster, doc)
        writes1 = writes(operator)

        def rolled() -> bool:
            obj = model(cluster)
            ready = condition(obj, "Ready")
            fresh = not set(pod_state(cluster)) & set(pods_before)
            return (
                fresh
                and ready.get("status") == "True"
                and ready.get("observedGeneration") == obj["metadata"]["generation"]
            )

        baseline = wait_for("Ready after the rollout", rolled, interval=1)
        baseline_writes = writes(operator) - writes1
        log(f"baseline: {baseline:.1f}s, {baseline_writes} API writes")
    finally:
        if operator is not None:
            operator.stop()
        cluster.stop()
    result = {
        "adapters_added": ADAPTERS,
        "replicas": 2,
        "ours_to_adapters_ready_s": round(ours, 2),
        "ours_api_writes": ours_writes,
        "ours_management_puts": ours_puts,
        "ours_pod_restarts": restarted,
        "baseline_rollout_to_ready_s": round(baseline, 2),
        "baseline_api_writes": baseline_writes,
    }
    print(json.dumps(result, indent=2))
    print(f"ours / baseline (time to serve the change): {ours / baseline:.3f}")


if __name__ == "__main__":
    main()
