"""`make demo`: the main job end to end on the local control plane with fake GPU nodes and a real
CPU node.

Starts the control plane and the real node, installs the CRD, runs `lmi-operator run` as its own
process, applies several examples (and one model that asks for more GPUs than any node has) plus a
CPU model on the real node (the runtime's CPU image serving a tiny model baked into it), shows a
live table until every model settles, prints a summary and a real completion from the CPU model
through its Service, then stops everything (DEMO_KEEP=1 keeps it running until Ctrl-C)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from lmi_operator.testing.cluster import REPO_ROOT, ClusterError, LocalCluster, free_port, tools_bin_dir
from lmi_operator.testing.images import ImageBuildError
from lmi_operator.testing.node import NodeError, RealNode
from lmi_operator.testing.product_images import build_model_image, cpu_model

NAMESPACE = "lmi-demo"
EXAMPLES = ("llama-3-8b.yaml", "mistral-7b.yaml", "gpt-neox-20b.yaml", "lora.yaml", "autoscaling.yaml")
TOO_BIG_NAME = "llama-3-405b-too-big"
TOO_BIG = {
    "apiVersion": "serving.lmi.dev/v1alpha1",
    "kind": "LMIModel",
    "metadata": {"name": TOO_BIG_NAME},
    "spec": {
        "model": {"id": "meta-llama/Llama-3.1-405B-Instruct"},
        "engine": {"tensorParallelDegree": 16},
        "resources": {"gpus": 16},
    },
}
CPU_NAME = "tiny-cpu"
CPU_MODEL_PATH = "/opt/models/tiny"
PROMPT = "the model serves"


def _cpu_image(node: RealNode, workdir: Path) -> str:
    from lmi_operator.testing.tiny_model import build_model

    context = workdir / "model-image"
    print("building the tiny model and the CPU model image (the runtime CPU image + the model)")
    build_model(context / "tiny")
    image = build_model_image(context, {"tiny": CPU_MODEL_PATH}, "lmi/demo-models:local")
    return node.import_image(image)


def _completion(cluster: LocalCluster) -> str:
    """A completion from the CPU model through its Service (kubectl port-forward svc/...)."""
    with cluster.port_forward(NAMESPACE, f"svc/{CPU_NAME}") as port:
        body = json.dumps({"model": "tiny", "prompt": PROMPT, "max_tokens": 12, "temperature": 0}).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/completions", data=body, headers={"content-type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=120) as response:
            answer: dict[str, Any] = json.loads(response.read())
    return str(answer["choices"][0]["text"])


SETTLED = {"Available", "InsufficientGPU", "InvalidSpec", "CrashLoop", "ImagePullFailed", "OOMKilled"}


def _models(cluster: LocalCluster) -> list[dict[str, Any]]:
    out = cluster.kubectl("get", "lmimodels", "-n", NAMESPACE, "-o", "json").stdout
    items: list[dict[str, Any]] = json.loads(out)["items"]
    return items


def _ready(obj: dict[str, Any]) -> dict[str, Any]:
    return next((c for c in obj.get("status", {}).get("conditions", []) if c["type"] == "Ready"), {})


def _table(models: list[dict[str, Any]], started: float) -> str:
    rows = [f"{'NAME':<22} {'MODEL':<38} {'GPUS':>4} {'READY':>5}  STATUS", "-" * 90]
    for obj in sorted(models, key=lambda o: o["metadata"]["name"]):
        spec, status = obj["spec"], obj.get("status", {})
        rows.append(
            f"{obj['metadata']['name']:<22} {spec['model']['id'][:38]:<38} {spec['resources']['gpus']:>4} "
            f"{status.get('ready', '-'):>5}  {_ready(obj).get('reason', 'Pending')}"
        )
    rows.append(f"[{time.monotonic() - started:5.1f}s]")
    return "\n".join(rows)


def _apply_examples(cluster: LocalCluster, cpu_image: str) -> list[str]:
    names = []
    model = cpu_model(CPU_NAME, cpu_image, CPU_MODEL_PATH, startup={"timeoutSeconds": 600})
    model["spec"]["model"]["servedModelName"] = "tiny"
    cluster.kubectl("apply", "-n", NAMESPACE, "-f", "-", input=json.dumps(model))
    names.append(CPU_NAME)
    for example in EXAMPLES:
        cluster.kubectl("apply", "-n", NAMESPACE, "-f", str(REPO_ROOT / "examples" / example))
        doc = next(d for d in yaml.safe_load_all((REPO_ROOT / "examples" / example).read_text()) if d)
        names.append(doc["metadata"]["name"])
    cluster.kubectl("apply", "-n", NAMESPACE, "-f", "-", input=json.dumps(TOO_BIG))
    return [*names, TOO_BIG_NAME]


def _watch(
    cluster: LocalCluster, expected: int, timeout: float = 600.0
) -> tuple[list[dict[str, Any]], float]:
    started = time.monotonic()
    live = sys.stdout.isatty()
    last = ""
    models: list[dict[str, Any]] = []
    while time.monotonic() - started < timeout:
        models = _models(cluster)
        table = _table(models, started)
        body = table.rsplit("\n", 1)[0]
        if live:
            print("\033[2J\033[H" + table, flush=True)
        elif body != last:
            print(table, flush=True)
        last = body
        settled = [m for m in models if _ready(m).get("reason") in SETTLED]
        if len(models) == expected and len(settled) == expected:
            return models, time.monotonic() - started
        time.sleep(1)
    return models, time.monotonic() - started


def main() -> int:
    """Run the demo; exit non-zero when a model did not reach the state the demo expects."""
    keep = os.environ.get("DEMO_KEEP") == "1"
    workdir = Path(tempfile.mkdtemp(prefix="lmi-demo-"))
    cluster = LocalCluster(workdir, tools_bin_dir(), real_node=True)
    t0 = time.monotonic()
    print("starting the local control plane, kwok's fake GPU nodes and the real CPU node")
    try:
        cluster.start()
    except (ClusterError, NodeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    operator: subprocess.Popen[bytes] | None = None
    try:
        print(
            f"local control plane with fake GPU nodes and a real node ready in {time.monotonic() - t0:.1f}s"
        )
        print(cluster.kubectl("get", "nodes", "-L", "nvidia.com/gpu.product,nvidia.com/gpu.count").stdout)
        cluster.kubectl("apply", "--server-side", "-f", str(REPO_ROOT / "crds"))
        cluster.kubectl(
            "wait", "--for=condition=Established", "crd/lmimodels.serving.lmi.dev", "--timeout=60s"
        )
        cluster.kubectl("create", "namespace", NAMESPACE)
        # Model servers must pass the restricted Pod Security Standard.
        cluster.kubectl("label", "namespace", NAMESPACE, "pod-security.kubernetes.io/enforce=restricted")
        env = os.environ | {
            "KUBECONFIG": str(cluster.kubeconfig),
            "LMI_OPERATOR_LEASE_NAMESPACE": "default",
            "LMI_OPERATOR_METRICS_PORT": str(free_port()),
            "LMI_OPERATOR_HEALTH_PORT": str(free_port()),
        }
        log = (workdir / "operator.log").open("wb")
        operator = subprocess.Popen(
            [sys.executable, "-m", "lmi_operator.cli", "run"], env=env, stdout=log, stderr=subprocess.STDOUT
        )
        print(f"operator running (pid {operator.pid}, log {workdir / 'operator.log'})")
        assert cluster.real_node is not None
        try:
            cpu_image = _cpu_image(cluster.real_node, workdir)
        except (ImageBuildError, NodeError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        names = _apply_examples(cluster, cpu_image)
        print(f"applied {len(names)} LMIModels to namespace {NAMESPACE}\n")
        models, took = _watch(cluster, len(names))
        reasons = {m["metadata"]["name"]: _ready(m).get("reason") for m in models}
        ok = reasons.get(TOO_BIG_NAME) == "InsufficientGPU" and all(
            reasons.get(n) == "Available" for n in names[:-1]
        )
        ready = sum(r == "Available" for r in reasons.values())
        print(f"\nsummary: {ready}/{len(names) - 1} models Ready {took:.1f}s after apply")
        too_big = next((m for m in models if m["metadata"]["name"] == TOO_BIG_NAME), {})
        print(f"  {TOO_BIG_NAME}: {reasons.get(TOO_BIG_NAME)}: {_ready(too_big).get('message', '')[:200]}")
        if reasons.get(CPU_NAME) == "Available":
            text = _completion(cluster)
            print(f"\n{CPU_NAME} (real pod on the real node) completes {PROMPT!r} with: {text!r}")
            ok = ok and bool(text)
        if keep:
            print(f"kept running: export KUBECONFIG={cluster.kubeconfig}  (operator pid {operator.pid})")
            print("press Ctrl-C to stop everything")
            with contextlib.suppress(KeyboardInterrupt):
                while True:
                    time.sleep(3600)
        return 0 if ok else 1
    finally:
        if operator is not None:
            operator.terminate()
            operator.wait(timeout=30)
        cluster.stop()


if __name__ == "__main__":
    sys.exit(main())
