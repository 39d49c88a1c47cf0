"""The one table of LMI names: options and their renames to vLLM, aliases, LMI defaults, LMI-only
keys, the environment variables and files the runtime reads, and the container's port.

Everything that knows an LMI name lives here, so the resolver, the CLI table, the docs and the
operator (which imports this module to write what the runtime reads) agree. It imports nothing
heavy: the operator image has no vLLM, FastAPI or torch.
"""

from __future__ import annotations

from typing import Final

# LMI option name -> the AsyncEngineArgs field it sets. The vLLM field name is accepted as an
# option too (it is the "vLLM alias" of LMI's docs); giving both with different values is an error.
RENAMED: Final[dict[str, str]] = {
    "model_id": "model",
    "tensor_parallel_degree": "tensor_parallel_size",
    "pipeline_parallel_degree": "pipeline_parallel_size",
    "quantize": "quantization",
    "max_rolling_batch_size": "max_num_seqs",
    "max_rolling_batch_prefill_tokens": "max_num_batched_tokens",
    "cpu_offload_gb_per_gpu": "cpu_offload_gb",
}

# LMI's dtype spellings -> vLLM's (vLLM's own names pass unchanged and are checked by its parser).
DTYPE_ALIASES: Final[dict[str, str]] = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}

# Options that recent vLLM removed: accepted with a warning when the installed vLLM lacks them.
REMOVED_IN_VLLM: Final[dict[str, str]] = {
    "lora_extra_vocab_size": "vLLM removed LoRA extra vocabulary support; adapters use the base vocabulary",
}

# LMI-only keys that choose the serving mode: read by the runtime, never passed to vLLM.
MODE_KEYS: Final[tuple[str, ...]] = ("engine", "entrypoint", "async_mode", "rolling_batch", "task")

# LMI-only keys that steer DJL Serving's Java front end or other LMI engines: consumed and logged.
IGNORED_LMI_KEYS: Final[dict[str, str]] = {
    "model_loading_timeout": "start-up time is bounded by the pod's probes",
    "predict_timeout": "requests are bounded by the client and vLLM",
    "job_queue_size": "vLLM queues requests itself",
    "batch_size": "vLLM batches continuously",
    "max_batch_delay": "vLLM batches continuously",
    "max_idle_time": "vLLM batches continuously",
    "enable_streaming": 'streaming is chosen per request with "stream": true',
    "device_map": "vLLM places the model itself",
    "load_on_devices": "vLLM places the model itself",
    "mpi_mode": "vLLM starts its own workers",
    "parallel_loading": "vLLM starts its own workers",
    "enable_venv": "the image carries its dependencies",
    "fail_fast": "the runtime always fails fast",
    "enable_stateful_sessions": "stateful sessions are not implemented",
}

# LMI-only keys that shape the answers of the LMI routes: read by the runtime, never passed to vLLM.
OUTPUT_FORMATTER: Final = "output_formatter"
TGI_COMPAT: Final = "tgi_compat"
RESPONSE_KEYS: Final[tuple[str, ...]] = (OUTPUT_FORMATTER, TGI_COMPAT)
# LMI's built-in output formatters ("json" is the default of an answer that does not stream).
OUTPUT_FORMATTER_VALUES: Final[tuple[str, ...]] = ("json", "jsonlines", "sse")

# LMI-only keys whose behaviour this runtime does not implement: consumed with a warning.
UNSUPPORTED_LMI_KEYS: Final[dict[str, str]] = {
    "input_formatter": "write a custom handler (model.py) instead",
}

# Top-level serving.properties keys of DJL Serving's model server (no "option." prefix).
TOP_LEVEL_KEYS: Final[frozenset[str]] = frozenset(
    {
        "engine",
        "minworkers",
        "maxworkers",
        "gpu.minworkers",
        "gpu.maxworkers",
        "batch_size",
        "max_batch_delay",
        "max_idle_time",
        "job_queue_size",
        "load_on_devices",
        "translatorfactory",
        "fail_fast",
    }
)

# vLLM serve arguments the runtime owns: a person cannot set them through LMI options.
RUNTIME_OWNED: Final[dict[str, str]] = {
    "host": "the runtime listens on all interfaces",
    "port": "use `lmi-runtime serve --port`",
    "uds": "the runtime listens on TCP",
    "model_tag": "use option.model_id or HF_MODEL_ID",
    "config": "give the options themselves",
    "headless": "the runtime runs a group's workers headless (LeaderWorkerSet's LWS_WORKER_INDEX)",
    "nnodes": "set from LeaderWorkerSet's LWS_GROUP_SIZE (spec.resources.nodes)",
    "node_rank": "set from LeaderWorkerSet's LWS_WORKER_INDEX",
    "master_addr": "set from LeaderWorkerSet's LWS_LEADER_ADDRESS",
    "master_port": "the runtime names the leader's rendezvous port",
    "api_server_count": "the runtime runs one API server",
    "grpc": "the runtime serves HTTP",
    "middleware": "the runtime builds the HTTP application",
}

# The LMI container's layout: the model directory holds serving.properties, an optional custom
# handler and adapters/; the server listens on one HTTP port.
MODEL_DIR: Final = "/opt/ml/model"
PORT: Final = 8080
PROPERTIES_FILE: Final = "serving.properties"
HANDLER_FILE: Final = "model.py"

ASYNC_ENTRYPOINT: Final = "djl_python.lmi_vllm.vllm_async_service"

ENGINE_VALUES: Final[tuple[str, ...]] = ("Python",)
ROLLING_BATCH_VALUES: Final[tuple[str, ...]] = ("auto", "vllm", "disable")
ENTRYPOINT_VALUES: Final[tuple[str, ...]] = (ASYNC_ENTRYPOINT, "djl_python.huggingface", HANDLER_FILE)
TASK_VALUES: Final[tuple[str, ...]] = ("text-generation", "auto")

# The tensor parallel degree that means "every visible GPU over the pipeline stages".
TENSOR_PARALLEL_MAX: Final = "max"

# LMI defaults that differ from vLLM's.
DEFAULT_TENSOR_PARALLEL_DEGREE: Final = TENSOR_PARALLEL_MAX
DEFAULT_MAX_NUM_SEQS_ASYNC: Final[int] = 32
DEFAULT_MAX_NUM_SEQS_ROLLING_BATCH: Final[int] = 256
DEFAULT_MAX_LORAS: Final[int] = 4
# LMI's vLLM service answers under this name when option.served_model_name is not given (the
# operator always gives it: spec.model.servedModelName, else spec.model.id).
DEFAULT_SERVED_MODEL_NAME: Final[str] = "lmi"

# Environment variables the runtime reads as model configuration. OPTION_<NAME> is option.<name>.
OPTION_ENV_PREFIX: Final = "OPTION_"
MODEL_ID_ENV: Final = "HF_MODEL_ID"
# The cache folder the model and adapters are fetched into (a volume the operator mounts), and how
# long a download may go without progress (model_store).
CACHE_ENV: Final = "LMI_CACHE_DIR"
STALL_ENV: Final = "LMI_DOWNLOAD_STALL_SECONDS"
# The route that reports the start-up phases and their durations (the operator reads it).
STARTUP_PATH: Final = "/startup"
# Exit statuses of `lmi-runtime fetch` that the operator names status reasons after.
EXIT_DOWNLOAD_FAILED: Final = 3
EXIT_DOWNLOAD_STALLED: Final = 4
REVISION_ENV: Final = "HF_REVISION"
TENSOR_PARALLEL_DEGREE_ENV: Final = "TENSOR_PARALLEL_DEGREE"
# Not LMI's: the adapters to serve as a JSON object {name: source}, in the variable or (what the
# operator mounts: a file the kubelet refreshes, so the pod template does not change) in the file.
ADAPTERS_ENV: Final = "LMI_ADAPTERS"
ADAPTERS_FILE_ENV: Final = "LMI_ADAPTERS_FILE"
# The adapter management port (not in the model's Service), the file of public keys whose
# signatures it accepts (admin_auth), and its route.
ADMIN_PORT_ENV: Final = "LMI_ADMIN_PORT"
ADMIN_KEYS_ENV: Final = "LMI_ADMIN_KEYS_FILE"
ADMIN_PORT: Final = 8081
ADMIN_ADAPTERS_PATH: Final = "/lmi/adapters"
# LMI's /adapters routes on the serving port (anyone who reaches the Service may load any path): off
# unless this is "true".
ADAPTER_ROUTES_ENV: Final = "LMI_ADAPTER_ROUTES"

# Container-level environment aliases, applied only when the target is unset:
# source variable -> (target variable, inverted boolean).
ENV_ALIASES: Final[dict[str, tuple[str, bool]]] = {
    "HF_MODEL_QUANTIZE": ("OPTION_QUANTIZE", False),
    "HF_MODEL_TRUST_REMOTE_CODE": ("OPTION_TRUST_REMOTE_CODE", False),
    "SM_NUM_GPUS": (TENSOR_PARALLEL_DEGREE_ENV, False),
    "MAX_BATCH_PREFILL_TOKENS": ("OPTION_MAX_ROLLING_BATCH_PREFILL_TOKENS", False),
    "MAX_BATCH_SIZE": ("OPTION_MAX_ROLLING_BATCH_SIZE", False),
    "ENABLE_CUDA_GRAPHS": ("OPTION_ENFORCE_EAGER", True),
    "CUDA_MEMORY_FRACTION": ("OPTION_GPU_MEMORY_UTILIZATION", False),
}

# Every variable besides OPTION_* that the runtime reads as model configuration.
CONFIG_ENV: Final[tuple[str, ...]] = (
    MODEL_ID_ENV,
    REVISION_ENV,
    TENSOR_PARALLEL_DEGREE_ENV,
    *ENV_ALIASES,
    ADAPTERS_ENV,
    ADAPTERS_FILE_ENV,
    ADMIN_PORT_ENV,
    ADMIN_KEYS_ENV,
    ADAPTER_ROUTES_ENV,
)

# Runtime quantization methods LMI documents; pre-quantized models need no option at all.
RUNTIME_QUANTIZATION: Final[tuple[str, ...]] = ("fp8", "bitsandbytes")
BITSANDBYTES_PLUGIN: Final[str] = "vllm-bnb-plugin"


def lmi_option_names() -> list[str]:
    """Every option name the LMI layer itself understands (for suggestions and the table)."""
    return sorted(
        {
            *RENAMED,
            *REMOVED_IN_VLLM,
            *MODE_KEYS,
            *RESPONSE_KEYS,
            *IGNORED_LMI_KEYS,
            *UNSUPPORTED_LMI_KEYS,
            "entryPoint",
        }
        - {"entrypoint"}
    )
