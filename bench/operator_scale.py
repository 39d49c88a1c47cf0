"""Operator convergence at scale against the built-in Deployment controller, in one cluster and run.

    .venv/bin/python bench/operator_scale.py --n 100     (make bench-operator)

Baseline: N plain Deployments (the same pod shape, one GPU each) turned into ReplicaSets and Ready
pods by kube-controller-manager. Ours: N LMIModels turned into ConfigMaps, Deployments and Services
by lmi-operator (a real `lmi-operator run` process), then reported Ready. Both on the same local
control plane with enough kwok GPU nodes. Prints the measurements and the ratios ours/baseline.
With --adapters, ours runs twice against the one baseline: without adapters, then with that many
adapters per model, so that what the adapters add is read in one run rather than across runs."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmi_operator.api import API_VERSION, KIND
from lmi_operator.kube import Credentials, KubeClient, load_credentials, object_path
from lmi_operator.testing.cluster import REPO_ROOT, LocalCluster, free_port, tools_bin_dir
from lmi_operator.testing.nodes import FakeNode, gpu_deployment, h100_node

GPUS_PER_NODE = 8


def lmimodel(name: str, adapters: int = 0) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "model": {"id": "Qwen/Qwen2.5-0.5B-Instruct"},
        "engine": {"tensorParallelDegree": 1},
        "resources": {"gpus": 1},
    }
    if adapters:
        listed = [{"name": f"a{i:02d}", "source": f"org/adapter-{i:02d}"} for i in range(adapters)]
        spec["lora"] = {"enabled": True, "adapters": listed}
    return {"apiVersion": API_VERSION, "kind": KIND, "metadata": {"name": name}, "spec": spec}


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(p / 100 * len(ordered)) - 1))]


@dataclass
class Sampler:
    """Samples a process's RSS (MiB) and CPU seconds from /proc in a background thread."""

    pid: int
    interval: float = 0.5
    rss: list[float] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def _rss(self) -> float:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def run(self) -> None:
        while not self._stop.wait(self.interval):
            self.rss.append(self._rss())

    def window(self, seconds: float) -> tuple[float, float]:
        """(CPU percent of one core, peak RSS MiB) over the next `seconds`."""
        self.rss.clear()
        thread = threading.Thread(target=self.run, daemon=True)
        self._stop.clear()
        cpu0, t0 = self.cpu_seconds(), time.monotonic()
        thread.start()
        time.sleep(seconds)
        self._stop.set()
        thread.join()
        return 100 * (self.cpu_seconds() - cpu0) / (time.monotonic() - t0), max(self.rss, default=self._rss())


async def create_all(client: KubeClient, namespace: str, docs: list[dict[str, Any]]) -> dict[str, float]:
    """Create every object (32 at a time, as kubectl apply of a big list would); name -> created at."""
    created: dict[str, float] = {}
    gate = asyncio.Semaphore(32)

    async def one(doc: dict[str, Any]) -> None:
        async with gate:
            await client.request("POST", object_path(doc["apiVersion"], doc["kind"], namespace), body=doc)
            created[doc["metadata"]["name"]] = time.monotonic()

    await asyncio.gather(*(one(d) for d in docs))
    return created


async def watch_until(
    client: KubeClient, path: str, names: set[str], done: Callable[[dict[str, Any]], bool], timeout: float
) -> dict[str, float]:
    """Watch a collection until every name in `names` satisfied `done`; name -> first time it did."""
    seen: dict[str, float] = {}

    async def stream() -> None:
        while len(seen) < len(names):
            async for event in client.watch(path, timeoutSeconds="60"):
                obj = event["object"]
                name = obj.get("metadata", {}).get("name")
                if name in names and name not in seen and event["type"] != "DELETED" and done(obj):
                    seen[name] = time.monotonic()
                    if len(seen) == len(names):
                        return

    await asyncio.wait_for(stream(), timeout)
    return seen


def deployment_available(obj: dict[str, Any]) -> bool:
    return int(obj.get("status", {}).get("availableReplicas", 0)) >= 1


def model_ready(obj: dict[str, Any]) -> bool:
    return any(
        c["type"] == "Ready" and c["status"] == "True" for c in obj.get("status", {}).get("conditions", [])
    )


async def burst(
    creds: Credentials, namespace: str, n: int, ours: bool, timeout: float, adapters: int = 0
) -> dict[str, Any]:
    """Create N objects at once; when each Deployment exists, and when each is Ready."""
    client = KubeClient(creds)
    names = {f"m{i:04d}" for i in range(n)}
    deployments = object_path("apps/v1", "Deployment", namespace)
    ready_path = object_path(API_VERSION, KIND, namespace) if ours else deployments
    ready_when = model_ready if ours else deployment_available
    exists = asyncio.create_task(watch_until(client, deployments, names, lambda _: True, timeout))
    ready = asyncio.create_task(watch_until(client, ready_path, names, ready_when, timeout))
    await asyncio.sleep(0.2)  # let both watches open before the first create
    docs = [lmimodel(n, adapters) if ours else gpu_deployment(n, 1) for n in sorted(names)]
    start = time.monotonic()
    created = await create_all(client, namespace, docs)
    exists_at, ready_at = await exists, await ready
    latencies = [1000 * (exists_at[name] - created[name]) for name in names]
    await client.close()
    return {
        "all_deployments_s": max(exists_at.values()) - start,
        "all_ready_s": max(ready_at.values()) - start,
        "create_to_deployment_p50_ms": percentile(latencies, 50),
        "create_to_deployment_p99_ms": percentile(latencies, 99),
    }


async def singles(creds: Credentials, namespace: str, count: int) -> dict[str, float]:
    """Create-to-Deployment latency of single LMIModels on an otherwise idle cluster."""
    client = KubeClient(creds)
    latencies = []
    deployments = object_path("apps/v1", "Deployment", namespace)
    for i in range(count):
        name = f"single-{i:03d}"
        waiter = asyncio.create_task(watch_until(client, deployments, {name}, lambda _: True, 30))
        await asyncio.sleep(0.1)
        t0 = time.monotonic()
        await client.request("POST", object_path(API_VERSION, KIND, namespace), body=lmimodel(name))
        got = await waiter
        latencies.append(1000 * (got[name] - t0))
    await client.close()
    return {"p50_ms": percentile(latencies, 50), "p99_ms": percentile(latencies, 99)}


def operator_requests(port: int) -> dict[str, float]:
    """The operator's API requests by method, from its /metrics."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("lmi_operator_api_requests_total{"):
            method = line.split('method="', 1)[1].split('"', 1)[0]
            out[method] = float(line.rsplit(" ", 1)[1])
    return out


def wait_http(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(url)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=100, help="objects created at once (default 100)")
    parser.add_argument("--singles", type=int, default=20, help="single creates on an idle cluster")
    parser.add_argument("--idle", type=float, default=60.0, help="seconds of idle sampling after the burst")
    parser.add_argument("--timeout", type=float, default=900.0, help="give up on a phase after this long")
    parser.add_argument(
        "--adapters",
        type=int,
        default=0,
        help="also run the burst with this many LoRA adapters per LMIModel (the kwok pods' management "
        "ports never answer: each model's adapters are reported Unreachable, which costs a look per "
        "replica)",
    )
    args = parser.parse_args()

    # One GPU per object: the burst's and the single creates', plus a spare node.
    count = math.ceil((args.n + args.singles) / GPUS_PER_NODE) + 1
    nodes = [h100_node(f"gpu-{i:03d}", pods="250") for i in range(count)]
    # The GPU nodes are tainted: the models' inspection pods (CPU only) run on an untainted node, as
    # in any real cluster (docs/capacity.md).
    nodes.append(FakeNode(name="cpu-0", instance_type="m7i.4xlarge", cpu="16", memory="64Gi", pods="250"))
    workdir = Path(tempfile.mkdtemp(prefix="lmi-bench-"))
    cluster = LocalCluster(workdir, tools_bin_dir(), nodes=nodes)
    t0 = time.monotonic()
    cluster.start(timeout=300)
    print(f"cluster with {len(nodes)} kwok GPU nodes up in {time.monotonic() - t0:.1f}s", flush=True)
    operator: subprocess.Popen[bytes] | None = None
    try:
        cluster.kubectl("apply", "--server-side", "-f", str(REPO_ROOT / "crds"))
        cluster.kubectl(
            "wait", "--for=condition=Established", "crd/lmimodels.serving.lmi.dev", "--timeout=60s"
        )
        for ns in ("baseline", "singles"):
            cluster.kubectl("create", "namespace", ns)
        creds = load_credentials(str(cluster.kubeconfig))

        base = asyncio.run(burst(creds, "baseline", args.n, ours=False, timeout=args.timeout))
        print(f"baseline (kube-controller-manager): {json.dumps(base)}", flush=True)
        cluster.kubectl("delete", "namespace", "baseline", "--timeout=600s")

        metrics_port, health_port = free_port(), free_port()
        env = os.environ | {
            "KUBECONFIG": str(cluster.kubeconfig),
            "LMI_OPERATOR_LEASE_NAMESPACE": "default",
            "LMI_OPERATOR_METRICS_PORT": str(metrics_port),
            "LMI_OPERATOR_HEALTH_PORT": str(health_port),
        }
        log = (workdir / "operator.log").open("wb")
        operator = subprocess.Popen(
            [sys.executable, "-m", "lmi_operator.cli", "run"], env=env, stdout=log, stderr=subprocess.STDOUT
        )
        wait_http(f"http://127.0.0.1:{health_port}/healthz")
        sampler = Sampler(operator.pid)
        rss_start = sampler.window(1.0)[1]
        single = asyncio.run(singles(creds, "singles", args.singles))
        print(f"single creates on an idle cluster: {json.dumps(single)}", flush=True)
        ratios: dict[int, float] = {}
        variants = [0, *([args.adapters] if args.adapters else [])]
        for adapters in variants:
            namespace = f"ours-{adapters}"
            cluster.kubectl("create", "namespace", namespace)
            before = operator_requests(metrics_port)
            cpu0, c0 = sampler.cpu_seconds(), time.monotonic()
            sampler.rss.clear()
            sampler._stop.clear()
            sampling = threading.Thread(target=sampler.run, daemon=True)
            sampling.start()
            result = asyncio.run(
                burst(creds, namespace, args.n, ours=True, timeout=args.timeout, adapters=adapters)
            )
            sampler._stop.set()
            sampling.join()
            burst_cpu = 100 * (sampler.cpu_seconds() - cpu0) / (time.monotonic() - c0)
            after = operator_requests(metrics_port)
            print(f"ours (lmi-operator, {adapters} adapters each): {json.dumps(result)}", flush=True)
            per_object = {m: (after.get(m, 0) - before.get(m, 0)) / args.n for m in sorted(after)}
            rows = [
                (
                    "time until every Deployment exists (s)",
                    base["all_deployments_s"],
                    result["all_deployments_s"],
                ),
                ("time until every object is Ready (s)", base["all_ready_s"], result["all_ready_s"]),
                ("create-to-Deployment p50 in the burst (ms)", None, result["create_to_deployment_p50_ms"]),
                ("create-to-Deployment p99 in the burst (ms)", None, result["create_to_deployment_p99_ms"]),
                ("create-to-Deployment p50, single on idle cluster (ms)", None, single["p50_ms"]),
                ("create-to-Deployment p99, single on idle cluster (ms)", None, single["p99_ms"]),
            ]
            print(
                f"\n## N = {args.n}, {adapters} adapters each "
                f"(nodes: {len(nodes)}, load average before: {os.getloadavg()[0]:.2f})\n"
            )
            print("| measurement | baseline | lmi-operator | ratio |\n|---|---|---|---|")
            for label, b, o in rows:
                ratio = f"{o / b:.2f}x" if b else "-"
                print(f"| {label} | {f'{b:.2f}' if b is not None else '-'} | {o:.2f} | {ratio} |")
            print(
                f"| operator RSS at start / peak in burst (MiB) | - | "
                f"{rss_start:.0f} / {max(sampler.rss, default=0):.0f} | - |"
            )
            print(f"| operator CPU in burst (% of one core) | - | {burst_cpu:.1f} | - |")
            print(
                f"| operator API requests per object in the burst | - | "
                f"{', '.join(f'{m} {v:.2f}' for m, v in per_object.items())} | - |"
            )
            ratios[adapters] = result["all_ready_s"] / base["all_ready_s"]
            if adapters != variants[-1]:
                # The next burst starts on a cluster as empty as this one did.
                cluster.kubectl("delete", "namespace", namespace, "--timeout=600s")
        after = operator_requests(metrics_port)
        idle_cpu, idle_rss = sampler.window(args.idle)
        idle_requests = sum(operator_requests(metrics_port).values()) - sum(after.values())
        print(
            f"\noperator over {args.idle:.0f}s idle: CPU {idle_cpu:.2f}% of one core, "
            f"peak RSS {idle_rss:.0f} MiB, {idle_requests:.0f} API requests"
        )
        for adapters, ratio in ratios.items():
            print(
                f"ratio of convergence (every object Ready), {adapters} adapters each: "
                f"{ratio:.2f}x of the built-in controller"
            )
        return 0
    finally:
        if operator is not None:
            operator.terminate()
            operator.wait(timeout=30)
        cluster.stop()


if __name__ == "__main__":
    sys.exit(main())
