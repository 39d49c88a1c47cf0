"""Whether a model fits a GPU, estimated from its facts (lmi_runtime.model_facts) before any pod runs.

Per GPU of one replica: the weights (after runtime quantization, split by tensor and pipeline
parallelism) + the KV cache of one sequence of maxModelLen + the LoRA slots + an overhead for
activations, CUDA graphs and memory outside torch, against the GPU's memory times
gpuMemoryUtilization. This is how vLLM itself budgets: it loads the weights, profiles a forward pass
for the activation peak, and gives the rest to the KV cache, refusing to start when the rest cannot
hold one sequence of max_model_len ("No available memory for the cache blocks").

The overhead is calibrated on vLLM 0.26 on an H200 with a Llama-3-8B-shaped model (docs/capacity.md):
1.78 GiB activation peak at vLLM's default batch of tokens, 0.22 GiB outside torch, about 1 GiB of
CUDA graphs. The activation part is scaled by the MLP width per GPU, which dominates it. Pure."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

from lmi_runtime import options as lmi
from lmi_runtime.model_facts import ModelFacts

GiB = 2**30
# Measured on the H200 (docs/capacity.md): activation peak of an MLP 14336 wide, non-torch, graphs.
ACTIVATION_BYTES = int(1.78 * GiB)
ACTIVATION_MLP_WIDTH = 14336
NON_TORCH_BYTES = int(0.25 * GiB)
CUDA_GRAPH_BYTES = 1 * GiB
# Runtime quantization: bytes per weight of the layers' linear matrices (the rest stays 16-bit).
QUANTIZED_WEIGHT_BYTES = {"fp8": 1.0, "int8": 1.0, "bitsandbytes": 0.5}
KV_DTYPE_BYTES = {"auto": 2, "bfloat16": 2, "float16": 2, "fp8": 1, "fp8_e4m3": 1, "fp8_e5m2": 1}
# LoRA targets of a decoder layer as vLLM sizes its slots: q, k, v, o and the MLP's matrices.
LORA_DTYPE_BYTES = 2


@dataclass(frozen=True)
class Engine:
    """The engine settings the estimate depends on (spec.engine and spec.lora, as the runtime
    passes them to vLLM); max_model_len None means the model's max_position_embeddings."""

    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    quantize: str | None = None
    max_model_len: int | None = None
    kv_cache_dtype: str = "auto"
    gpu_memory_utilization: float = 0.9
    max_loras: int = 0
    max_lora_rank: int = 16
    enforce_eager: bool = False


@dataclass(frozen=True)
class Estimate:
    """Bytes per GPU of one replica."""

    weights: int
    kv_bytes_per_token: int
    max_model_len: int
    lora: int
    overhead: int
    usable: int

    @property
    def kv_cache(self) -> int:
        """The KV cache of one sequence of max_model_len."""
        return self.kv_bytes_per_token * self.max_model_len

    @property
    def needed(self) -> int:
        """What one GPU must hold for the engine to start."""
        return self.weights + self.kv_cache + self.lora + self.overhead

    @property
    def headroom(self) -> int:
        """Usable memory left after one full-length sequence (negative: does not fit)."""
        return self.usable - self.needed

    @property
    def fits(self) -> bool:
        """Whether vLLM can start: the KV cache holds at least one sequence of max_model_len."""
        return self.headroom >= 0

    @property
    def kv_available(self) -> int:
        """Memory left for the KV cache once weights, LoRA slots and overhead are in."""
        return self.usable - self.weights - self.lora - self.overhead

    @property
    def full_sequences(self) -> int:
        """How many sequences of max_model_len the KV cache holds at once."""
        return max(0, self.kv_available // self.kv_cache) if self.kv_cache else 0


def _on(value: str | None) -> bool:
    return (value or "").strip().lower() in ("true", "1", "yes", "on")


def engine_of(options: Mapping[str, str], gpus: int) -> Engine:
    """The engine settings of the LMI options a replica is given (status.engineOptions: the spec's
    fields, engine.options and defaults, as `properties.lmi_options` renders them) on `gpus` GPUs."""
    pp = int(options.get("pipeline_parallel_degree") or 1)
    tp_value = options.get("tensor_parallel_degree") or lmi.DEFAULT_TENSOR_PARALLEL_DEGREE
    tp = max(1, gpus // pp) if tp_value == lmi.TENSOR_PARALLEL_MAX else int(tp_value)
    lora = _on(options.get("enable_lora"))
    return Engine(
        tensor_parallel=tp,
        pipeline_parallel=pp,
        quantize=options.get("quantize") or None,
        max_model_len=int(options["max_model_len"]) if options.get("max_model_len") else None,
        kv_cache_dtype=options.get("kv_cache_dtype") or "auto",
        gpu_memory_utilization=float(options.get("gpu_memory_utilization") or 0.9),
        max_loras=int(options.get("max_loras") or lmi.DEFAULT_MAX_LORAS) if lora else 0,
        max_lora_rank=int(options.get("max_lora_rank") or 16),
        enforce_eager=_on(options.get("enforce_eager")),
    )


def weight_bytes(facts: ModelFacts, quantize: str | None) -> int:
    """All weights after runtime quantization (a pre-quantized checkpoint is counted as stored)."""
    stored = sum(facts.weight_bytes.values())
    if quantize is None or facts.quantization:
        return stored
    per_weight = QUANTIZED_WEIGHT_BYTES.get(quantize)
    if per_weight is None:
        return stored
    linear = facts.linear_parameters
    rest = max(0, facts.parameters - linear)
    return int(linear * per_weight + rest * 2)


def estimate(facts: ModelFacts, engine: Engine, gpu_memory: int) -> Estimate:
    """The per-GPU estimate of `facts` served with `engine` on GPUs of `gpu_memory` bytes."""
    tp, pp = engine.tensor_parallel, engine.pipeline_parallel
    kv_heads = max(1, facts.kv_heads // tp)  # fewer KV heads than GPUs: vLLM replicates them
    layers = -(-facts.layers // pp)
    kv_per_token = 2 * layers * kv_heads * facts.head_size * KV_DTYPE_BYTES.get(engine.kv_cache_dtype, 2)
    lora = 0
    if engine.max_loras:
        mlp = (3 if facts.gated_mlp else 2) * (facts.hidden_size + facts.intermediate_size)
        attention = 4 * facts.hidden_size + facts.head_size * (2 * facts.attention_heads + 2 * facts.kv_heads)
        per_adapter = engine.max_lora_rank * (attention + mlp) * layers * LORA_DTYPE_BYTES
        lora = engine.max_loras * per_adapter // tp
    width = facts.intermediate_size / tp
    overhead = int(ACTIVATION_BYTES * max(1.0, width / ACTIVATION_MLP_WIDTH)) + NON_TORCH_BYTES
    overhead += 0 if engine.enforce_eager else CUDA_GRAPH_BYTES
    return Estimate(
        weights=weight_bytes(facts, engine.quantize) // (tp * pp),
        kv_bytes_per_token=kv_per_token,
        max_model_len=engine.max_model_len or facts.max_position_embeddings,
        lora=lora,
        overhead=overhead,
        usable=int(gpu_memory * engine.gpu_memory_utilization),
    )


def what_fits(facts: ModelFacts, engine: Engine, gpu_memory: int, gpus_per_node: int = 8) -> list[str]:
    """Changes of the spec that would make a model that does not fit fit, most direct first."""
    options: list[str] = []
    for tp in (2, 4, 8):
        possible = engine.tensor_parallel < tp <= gpus_per_node and facts.attention_heads % tp == 0
        if possible and estimate(facts, replace(engine, tensor_parallel=tp), gpu_memory).fits:
            options.append(f"tensorParallelDegree {tp}")
            break
    unquantized = engine.quantize is None and not facts.quantization
    if unquantized and estimate(facts, replace(engine, quantize="fp8"), gpu_memory).fits:
        options.append("quantize fp8")
    rest = estimate(facts, engine, gpu_memory)
    if rest.kv_available > 0 and rest.kv_bytes_per_token:
        longest = rest.kv_available // rest.kv_bytes_per_token // 256 * 256
        if 0 < longest < rest.max_model_len:
            options.append(f"maxModelLen {longest}")
    return options


def explain(est: Estimate, gpu: str, options: list[str]) -> str:
    """The message of a model that does not fit, or of the headroom of one that does."""
    if est.fits:
        return (
            f"fits {gpu}: needs {est.needed / GiB:.1f} GiB per GPU of {est.usable / GiB:.1f} GiB usable, "
            f"{est.full_sequences} sequences of {est.max_model_len} tokens at once"
        )
    return f"{needs(est)}, {short_of(est, gpu, options)}"


def needs(est: Estimate) -> str:
    """What one GPU must hold, with its parts."""
    parts = (
        f"weights {est.weights / GiB:.1f} + KV cache {est.kv_cache / GiB:.1f} + LoRA {est.lora / GiB:.1f} "
        f"+ overhead {est.overhead / GiB:.1f}"
    )
    return f"needs {est.needed / GiB:.1f} GiB per GPU ({parts})"


def short_of(est: Estimate, gpu: str, options: list[str]) -> str:
    """What a GPU that is too small has, and what would fit it."""
    fix = f": {' or '.join(options)} would fit" if options else ""
    return f"{gpu} has {est.usable / GiB:.1f} GiB usable{fix}"


# GPU memory (MiB) by the product name GPU feature discovery labels a node with, for nodes that carry
# nvidia.com/gpu.product but not nvidia.com/gpu.memory (the figures nvidia-smi reports as total).
GPU_MEMORY_MIB = {
    "NVIDIA-A10G": 23028,
    "NVIDIA-A100-SXM4-40GB": 40960,
    "NVIDIA-A100-SXM4-80GB": 81920,
    "NVIDIA-H100-80GB-HBM3": 81559,
    "NVIDIA-H200": 143155,  # 139.8 GiB, as vLLM saw it on the lent H200
    "NVIDIA-L4": 23034,
    "NVIDIA-L40S": 46068,
    "Tesla-T4": 15360,
    "Tesla-V100-SXM2-16GB": 16384,
}
GPU_MEMORY_LABEL = "nvidia.com/gpu.memory"
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"


def gpu_memory_of(labels: dict[str, str]) -> int | None:
    """Bytes of one GPU of a node with these labels: nvidia.com/gpu.memory (MiB), else the table by
    nvidia.com/gpu.product; None when neither says."""
    mib = labels.get(GPU_MEMORY_LABEL, "")
    if mib.isdigit() and int(mib) > 0:
        return int(mib) * 2**20
    known = GPU_MEMORY_MIB.get(labels.get(GPU_PRODUCT_LABEL, ""))
    return known * 2**20 if known else None
