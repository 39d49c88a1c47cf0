"""What vLLM itself measures of a model's GPU memory, to validate lmi_operator.capacity's estimate.

Runs on the lent GPU machine (../shared/gpu/README.md: the vLLM bundle and make_model.py's random
Llama-3-8B-shaped model). For each case (quantization x max_model_len) it starts vLLM's offline engine
in a process of its own, at gpu_memory_utilization 0.9, and reads from its log what vLLM says it
took: the weights ("Model loading took X GiB"), the memory left for the KV cache and how many tokens
that holds, and the CUDA graphs' memory. Prints one JSON line per case (prefix RESULT).

usage: python3 bench/gpu_capacity.py MODEL_DIR OUT_DIR CASE [CASE ...]   (CASE: bf16:2048, fp8:8192, ...)
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

GiB = r"([0-9.]+) ?GiB"
PATTERNS = {
    "weights_gib": re.compile(r"Model loading took " + GiB),
    "kv_available_gib": re.compile(r"Available KV cache memory: " + GiB),
    "kv_tokens": re.compile(r"GPU KV cache size: ([0-9,]+) tokens"),
    "cuda_graph_gib": re.compile(r"Graph capturing finished in [0-9.]+ secs?, took " + GiB),
}
ENGINE = """
import sys
from vllm import LLM
quant = None if sys.argv[2] == "bf16" else sys.argv[2]
LLM(model=sys.argv[1], quantization=quant, max_model_len=int(sys.argv[3]), gpu_memory_utilization=0.9,
    seed=0)
print("ENGINE READY", flush=True)
"""


def parse(log: str) -> dict[str, float]:
    """The figures the engine logged (the last of each: the engine core logs once)."""
    out: dict[str, float] = {}
    for key, pattern in PATTERNS.items():
        found = pattern.findall(log)
        if found:
            out[key] = float(found[-1].replace(",", ""))
    return out


def main() -> int:
    model, out_dir, cases = sys.argv[1], sys.argv[2], sys.argv[3:]
    os.makedirs(out_dir, exist_ok=True)
    for case in cases:
        quant, length = case.split(":")
        t0 = time.time()
        proc = subprocess.run(
            [sys.executable, "-c", ENGINE, model, quant, length],
            capture_output=True,
            text=True,
            timeout=600,
            env=os.environ | {"VLLM_LOGGING_LEVEL": "INFO"},
        )
        log = proc.stdout + proc.stderr
        with open(os.path.join(out_dir, f"capacity-{quant}-{length}.log"), "w") as f:
            f.write(log)
        figures = parse(log)
        result = {"quantization": quant, "max_model_len": int(length), "rc": proc.returncode, **figures}
        result["seconds"] = round(time.time() - t0, 1)
        if "kv_available_gib" in figures and "kv_tokens" in figures:
            result["kv_bytes_per_token"] = round(figures["kv_available_gib"] * 2**30 / figures["kv_tokens"])
        print("RESULT " + json.dumps(result), flush=True)
        if proc.returncode != 0:
            print(log[-3000:], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
