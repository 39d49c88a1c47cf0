"""`python -m lmi_operator.testing up|down|status|images`: the local control plane for people (make
cluster-up), and the operator and runtime CPU images that its real node runs (make images)."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from lmi_operator.testing.cluster import ClusterError, LocalCluster, tools_bin_dir
from lmi_operator.testing.images import ImageBuilder, ImageBuildError
from lmi_operator.testing.product_images import build_operator_image, build_runtime_cpu_image

DEFAULT_DIR = Path(os.environ.get("LMI_CLUSTER_DIR", Path(tempfile.gettempdir()) / "lmi-operator-cluster"))


def main(argv: list[str] | None = None) -> int:
    """Bring the local cluster up (detached), tear it down, or show what runs."""
    parser = argparse.ArgumentParser(prog="python -m lmi_operator.testing", description=__doc__)
    parser.add_argument("action", choices=["up", "down", "status", "images"])
    parser.add_argument(
        "--dir", type=Path, default=DEFAULT_DIR, help=f"cluster folder (default {DEFAULT_DIR})"
    )
    args = parser.parse_args(argv)
    if args.action == "images":
        for what, build in (
            ("operator image", build_operator_image),
            ("runtime CPU image", build_runtime_cpu_image),
        ):
            started = time.monotonic()
            try:
                image = build()
            except ImageBuildError as err:
                print(f"error: {err}", file=sys.stderr)
                return 1
            print(f"{what} {image.reference} ready in {time.monotonic() - started:.1f}s")
        if removed := ImageBuilder().prune():
            print(f"removed {len(removed)} cached layers no built image uses")
        return 0
    cluster = LocalCluster(args.dir, tools_bin_dir())

    if args.action == "up":
        if cluster.running():
            print(f"already running in {args.dir}", file=sys.stderr)
        else:
            started = time.monotonic()
            try:
                cluster.start(detach=True)
            except ClusterError as err:
                print(f"error: {err}", file=sys.stderr)
                return 1
            print(f"local control plane up in {time.monotonic() - started:.1f}s; logs in {cluster.logs}")
        print(f"export KUBECONFIG={cluster.kubeconfig}")
    elif args.action == "down":
        cluster.stop()
        print(f"stopped the local control plane in {args.dir}")
    else:
        running = cluster.running()
        for name, pid in running.items():
            print(f"{name:<26} pid {pid}")
        if not running:
            print("not running")
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
