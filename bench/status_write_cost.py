"""The API server's CPU per status write of an LMIModel, by what the object carries.

    .venv/bin/python bench/status_write_cost.py --writes 300

One local control plane with the CRD from crds/. Two models, one without LoRA and one with 20
adapters in spec.lora.adapters; each is sent `--writes` status applies (a changed message each time,
so each is a real write), without rows and with 20 status.adapters rows. The figure is the
kube-apiserver process's CPU seconds (from /proc) per write; the first case is the baseline of the
ratios. Each case runs twice, interleaved, to show the noise."""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from lmi_operator.api import API_VERSION, KIND
from lmi_operator.kube import STATUS_FIELD_MANAGER, KubeClient, load_credentials, object_path
from lmi_operator.testing.cluster import REPO_ROOT, LocalCluster, tools_bin_dir

sys.path.insert(0, str(Path(__file__).parent))
from operator_scale import Sampler, lmimodel  # the scale bench's model shapes and /proc reader

ADAPTERS = 20
ROWS = [
    {"name": f"a{i:02d}", "source": f"org/adapter-{i:02d}", "loaded": "0/1", "reason": "Unreachable"}
    for i in range(ADAPTERS)
]
CASES: list[tuple[str, str, list[dict[str, Any]] | None]] = [
    ("no LoRA, no rows", "plain", None),
    (f"{ADAPTERS} adapters in spec, no rows", "lora", None),
    (f"{ADAPTERS} adapters in spec, {ADAPTERS} rows", "lora", ROWS),
]


async def write(client: KubeClient, name: str, count: int, rows: list[dict[str, Any]] | None) -> None:
    for i in range(count):
        ready = {"type": "Ready", "status": "False", "reason": "Loading", "message": f"write {i}"}
        status: dict[str, Any] = {"observedGeneration": 1, "conditions": [ready]}
        if rows is not None:
            status |= {"adapters": rows, "adaptersLoaded": f"0/{ADAPTERS}"}
        body = {"apiVersion": API_VERSION, "kind": KIND, "metadata": {"name": name, "namespace": "default"}}
        applied = body | {"status": status}
        await client.apply(applied, field_manager=STATUS_FIELD_MANAGER, subresource="status")


async def measure(cluster: LocalCluster, writes: int) -> None:
    client = KubeClient(load_credentials(str(cluster.kubeconfig)))
    try:
        for name, adapters in (("plain", 0), ("lora", ADAPTERS)):
            doc = lmimodel(name, adapters)
            await client.request("POST", object_path(API_VERSION, KIND, "default"), body=doc)
        apiserver = Sampler(cluster.pid("kube-apiserver"))
        figures: dict[str, list[float]] = {label: [] for label, _, _ in CASES}
        for _ in range(2):
            for label, name, rows in CASES:
                cpu0, t0 = apiserver.cpu_seconds(), time.monotonic()
                await write(client, name, writes, rows)
                figures[label].append(1000 * (apiserver.cpu_seconds() - cpu0) / writes)
                print(f"[bench] {label}: {time.monotonic() - t0:.1f}s", flush=True)
        base = sum(figures[CASES[0][0]]) / 2
        print("\n| status write of | kube-apiserver CPU per write (ms), two runs | ratio |\n|---|---|---|")
        for label, runs in figures.items():
            print(f"| {label} | {runs[0]:.2f} / {runs[1]:.2f} | {sum(runs) / 2 / base:.2f}x |")
    finally:
        await client.close()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--writes", type=int, default=300, help="status writes per case and run")
    args = parser.parse_args()
    cluster = LocalCluster(Path(tempfile.mkdtemp(prefix="lmi-bench-")), tools_bin_dir())
    print("[bench] starting the local control plane", flush=True)
    cluster.start(timeout=300)
    try:
        cluster.kubectl("apply", "--server-side", "-f", str(REPO_ROOT / "crds"))
        crd = "crd/lmimodels.serving.lmi.dev"
        cluster.kubectl("wait", "--for=condition=Established", crd, "--timeout=60s")
        asyncio.run(measure(cluster, args.writes))
    finally:
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
