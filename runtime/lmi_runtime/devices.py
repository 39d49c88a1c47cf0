"""Count the GPUs this process may use, for tensor_parallel_degree=max."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path


def dev_nvidia_count(dev: Path = Path("/dev")) -> int:
    """GPUs the container can open (/dev/nvidia0, /dev/nvidia1, ...), without importing torch."""
    return sum(1 for entry in dev.glob("nvidia*") if entry.name[len("nvidia") :].isdigit())


def _listed(value: str) -> int:
    items = [item.strip() for item in value.split(",") if item.strip()]
    # "-1" is CUDA's way to hide every device.
    return 0 if items[:1] == ["-1"] else len(items)


def visible_gpu_count(environ: Mapping[str, str], device_count: Callable[[], int] = dev_nvidia_count) -> int:
    """GPUs visible to CUDA: CUDA_VISIBLE_DEVICES, then NVIDIA_VISIBLE_DEVICES, then the devices."""
    cuda = environ.get("CUDA_VISIBLE_DEVICES")
    if cuda is not None:
        return _listed(cuda)
    nvidia = environ.get("NVIDIA_VISIBLE_DEVICES")
    if nvidia is not None:
        lowered = nvidia.strip().lower()
        if lowered in ("none", "void", ""):
            return 0
        if lowered != "all":
            return _listed(nvidia)
    return device_count()


def max_tensor_parallel(gpus: int, pipeline_parallel: int) -> int:
    """LMI's `max`: all visible GPUs divided by the pipeline degree, at least 1 (CPU)."""
    return max(1, gpus // max(1, pipeline_parallel))


def device_product(proc: Path = Path("/proc")) -> str:
    """The accelerator's product name (compile artefacts are only valid on the same one): the GPUs'
    models from the NVIDIA driver's /proc files, else the CPU's model name. No CUDA is initialised."""
    gpus = sorted(
        line.split(":", 1)[1].strip()
        for info in proc.glob("driver/nvidia/gpus/*/information")
        for line in info.read_text(errors="replace").splitlines()
        if line.startswith("Model:")
    )
    if gpus:
        # The first model: a pod's GPUs are of one product (the count is the parallelism's business).
        return gpus[0]
    cpuinfo = proc / "cpuinfo"
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return "cpu: " + line.split(":", 1)[1].strip()
    return "cpu"
