"""A replica's start to Ready on the real local node with the CPU image, cold cache against warm, and
the second of two replicas against the first, in one cluster and run.

    .venv/bin/python bench/cold_start.py      (make bench-cold-start)

One LMIModel serves the tests' tiny Llama from S3 (moto's server on the node's address) with its
cache on a ReadWriteMany claim (a hostPath volume), compiled (not eager), so that the start
downloads the model and torch.compile works: the work a cache keeps. Measured from pod creation to
the pod's Ready condition, with the runtime's own phases (status.startup):
1. cold: the first replica, empty cache;
2. warm: that replica's pod deleted, the Deployment's replacement finds the cache filled;
3. second: replicas 1 -> 2, the new replica beside the first (ReadWriteMany, same cache).
Also counts the object reads S3 answered in each step (0 expected after the first). Prints the
figures and the ratios warm/cold and second/cold."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

from lmi_operator.settings import OperatorSettings
from lmi_operator.status import parse_time
from lmi_operator.testing.cluster import REPO_ROOT, LocalCluster, tools_bin_dir
from lmi_operator.testing.node import NODE_IP
from lmi_operator.testing.operator import OperatorThread
from lmi_operator.testing.product_images import build_runtime_cpu_image, cpu_model
from lmi_operator.testing.s3_server import REGION, read_policy, s3_server
from lmi_operator.testing.tiny_model import build_model
from lmi_operator.testing.volumes import shared_claim

NAME, NAMESPACE, CLAIM = "cold-start", "bench", "models"


def log(message: str) -> None:
    print(f"[cold-start {time.strftime('%H:%M:%S')}] {message}", flush=True)


def kube_json(cluster: LocalCluster, *args: str) -> Any:
    return json.loads(cluster.kubectl(*args, "-o", "json").stdout)


def pods(cluster: LocalCluster) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = kube_json(
        cluster, "get", "pods", "-n", NAMESPACE, "-l", f"app.kubernetes.io/instance={NAME}"
    )["items"]
    return [p for p in items if not p["metadata"].get("deletionTimestamp")]


def seconds_to_ready(pod: dict[str, Any]) -> float | None:
    """From the pod's creation to its Ready condition, or None while it is not ready."""
    ready: dict[str, Any] = next((c for c in pod["status"].get("conditions", []) if c["type"] == "Ready"), {})
    if ready.get("status") != "True":
        return None
    created, became = (
        parse_time(pod["metadata"]["creationTimestamp"]),
        parse_time(ready["lastTransitionTime"]),
    )
    assert created is not None and became is not None
    return (became - created).total_seconds()


def wait_new_ready(cluster: LocalCluster, known: set[str], timeout: float = 900) -> dict[str, Any]:
    """The first pod not in `known` that is Ready (and its model's status once it lists it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pod in pods(cluster):
            if pod["metadata"]["name"] not in known and seconds_to_ready(pod) is not None:
                return pod
        time.sleep(2)
    raise TimeoutError(f"no new ready replica within {timeout}s")


def phases_of(cluster: LocalCluster, pod: str) -> dict[str, int]:
    """The replica's phase durations from the model's status.startup (written within ~10 s)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        status = kube_json(cluster, "get", "lmimodel", NAME, "-n", NAMESPACE).get("status", {})
        for replica in status.get("startup", {}).get("replicas", []):
            if replica["pod"] == pod and replica["phase"] == "Ready":
                seconds: dict[str, int] = replica["seconds"]
                return seconds
        time.sleep(2)
    return {}


def main() -> None:
    """Run the three starts and print their figures and ratios."""
    work = Path(tempfile.mkdtemp(prefix="lmi-cold-start-"))
    cluster = LocalCluster(work / "cluster", tools_bin_dir(), real_node=True)
    log("starting the local cluster with the real node")
    cluster.start()
    operator: OperatorThread | None = None
    try:
        assert cluster.real_node is not None
        build_model(work / "tiny")
        log("building and importing the runtime CPU image (the model comes from S3)")
        image = cluster.real_node.import_image(build_runtime_cpu_image())
        cluster.kubectl("apply", "--server-side", "-f", str(REPO_ROOT / "crds"))
        cluster.kubectl("wait", "--for=condition=Established", "crd/lmimodels.serving.lmi.dev")
        operator = OperatorThread(
            cluster.kubeconfig, OperatorSettings(leader_election=False, metrics_port=0, health_port=0)
        ).start()
        with s3_server(host=NODE_IP, log=work / "moto.log") as server:
            server.upload("models", "tiny", work / "tiny")
            reader = server.user("reader", read_policy("models"))

            def object_reads() -> int:
                return (work / "moto.log").read_text().count('"GET /models/tiny/')

            cache = work / "cache"
            cluster.kubectl("create", "namespace", NAMESPACE)
            secret = {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": "s3"},
                "stringData": reader.env(),
            }
            model = cpu_model(NAME, image, "s3://models/tiny")
            # Compiled, not eager: torch.compile's work is what the compile cache keeps.
            model["spec"]["engine"]["options"] = {}
            model["spec"]["model"]["s3"] = {
                "credentialsSecretRef": {"name": "s3"},
                "endpointUrl": server.endpoint,
                "region": REGION,
            }
            model["spec"]["cache"] = {"persistentVolumeClaim": {"claimName": CLAIM}}
            for doc in (secret, *shared_claim(NAMESPACE, CLAIM, cache, "bench-host"), model):
                cluster.kubectl("apply", "-n", NAMESPACE, "-f", "-", input=json.dumps(doc))

            results: dict[str, dict[str, Any]] = {}
            known: set[str] = set()
            for step in ("cold", "warm", "second"):
                reads = object_reads()
                if step == "warm":
                    cluster.kubectl("delete", "pod", "-n", NAMESPACE, *known, "--wait=true", timeout=300)
                if step == "second":
                    patch = '{"spec":{"replicas":2}}'
                    cluster.kubectl("patch", "lmimodel", NAME, "-n", NAMESPACE, "--type=merge", "-p", patch)
                log(f"{step}: waiting for a new ready replica")
                pod = wait_new_ready(cluster, known)
                name = pod["metadata"]["name"]
                known.add(name)
                results[step] = {
                    "ready_s": seconds_to_ready(pod),
                    "phases_s": phases_of(cluster, name),
                    "s3_object_reads": object_reads() - reads,
                }
                log(f"{step}: {json.dumps(results[step])}")
    finally:
        if operator is not None:
            operator.stop()
        cluster.stop()
    cold = results["cold"]["ready_s"]
    print(json.dumps(results, indent=2))
    print(f"warm / cold:   {results['warm']['ready_s'] / cold:.2f}")
    print(f"second / cold: {results['second']['ready_s'] / cold:.2f}")


if __name__ == "__main__":
    main()
