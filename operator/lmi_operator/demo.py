"""`make demo`: the local control plane with fake GPU nodes, and what it can schedule."""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

from lmi_operator.testing.cluster import ClusterError, LocalCluster, tools_bin_dir


def main() -> int:
    """Bring the local cluster up, show its GPU nodes and their capacity, then stop (unless DEMO_KEEP=1)."""
    keep = os.environ.get("DEMO_KEEP") == "1"
    workdir = Path(tempfile.mkdtemp(prefix="lmi-demo-"))
    cluster = LocalCluster(workdir, tools_bin_dir())
    started = time.monotonic()
    try:
        cluster.start(detach=keep)
    except ClusterError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    try:
        print(f"local control plane ready in {time.monotonic() - started:.1f}s ({workdir})")
        nodes = json.loads(cluster.kubectl("get", "nodes", "-o", "json").stdout)["items"]
        print(f"{'NODE':<12} {'GPU':<24} {'GPUS':>4}  SCHEDULABLE")
        for node in nodes:
            labels = node["metadata"]["labels"]
            gpus = node["status"]["allocatable"].get("nvidia.com/gpu", "0")
            ready = any(c["type"] == "Ready" and c["status"] == "True" for c in node["status"]["conditions"])
            product = labels.get("nvidia.com/gpu.product", "-")
            print(f"{node['metadata']['name']:<12} {product:<24} {gpus:>4}  {'yes' if ready else 'no'}")
        if keep:
            print(f"kept running: export KUBECONFIG={cluster.kubeconfig}")
    finally:
        if not keep:
            cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
