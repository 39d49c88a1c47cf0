"""The LMIModel API (serving.lmi.dev/v1alpha1): pydantic models of the spec and the status.

These models are the single source of the API: `crd` derives the CRD's OpenAPI schema and CEL rules
from them, `apidocs` the reference in docs/api.md, and the operator reads objects with
`parse_lmimodel`. Every cross-field check is one `Rule`: its CEL expression runs in the API server,
its Python predicate in `parse_lmimodel`, and both report the same message, naming the field.

Python attributes are snake_case; the wire names (aliases) are the camelCase ones users write.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, ClassVar, Literal, Self, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, model_validator
from pydantic.alias_generators import to_camel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError

from lmi_operator.capacity import GPU_PRODUCT_LABEL
from lmi_runtime import options as lmi

GROUP = "serving.lmi.dev"
VERSION = "v1alpha1"
KIND = "LMIModel"
PLURAL = "lmimodels"
SINGULAR = "lmimodel"
SHORT = "lmi"
API_VERSION = f"{GROUP}/{VERSION}"

# engine.mode: LMI's async service or the legacy rolling-batch configuration.
EngineMode = Literal["async", "rollingBatch"]
# LMI's default batch size (max_num_seqs) of each engine.mode, from the runtime's table.
LMI_DEFAULT_BATCH_SIZE: dict[EngineMode, int] = {
    "async": lmi.DEFAULT_MAX_NUM_SEQS_ASYNC,
    "rollingBatch": lmi.DEFAULT_MAX_NUM_SEQS_ROLLING_BATCH,
}
_BATCH_SIZE_DEFAULTS = (
    f"{lmi.DEFAULT_MAX_NUM_SEQS_ASYNC} in async mode, "
    f"{lmi.DEFAULT_MAX_NUM_SEQS_ROLLING_BATCH} in rollingBatch mode"
)
# The cost of async mode's small default, said where users choose the mode and the batch size. The
# operator keeps LMI's default (an LMI user gets what LMI would run) but reports it in the status.
_ASYNC_DEFAULT_COST = (
    f"In async mode, LMI's default batch size of {lmi.DEFAULT_MAX_NUM_SEQS_ASYNC} caps throughput: "
    "on an H200 with an 8B model (vLLM 0.26) async mode at 32 reached 5.2-5.7k tokens/s where vLLM's "
    "engine reached 15.7k at 256. Set engine.maxRollingBatchSize (e.g. 256) to raise it; while it is "
    "unset in async mode the status carries the condition BatchSizeDefaulted (reason LMIAsyncDefault)"
)

Quantize = Literal[
    # Runtime quantization: the weights are quantized while loading.
    "fp8",
    "bitsandbytes",
    # Pre-quantized checkpoints; vLLM normally detects them from config.json, so these are only
    # needed to force a kernel.
    "awq",
    "awq_marlin",
    "gptq",
    "gptq_marlin",
    "compressed-tensors",
    "fbgemm_fp8",
    "modelopt",
    "modelopt_fp4",
    "experts_int8",
    "quark",
    "moe_wna16",
    "torchao",
    "mxfp4",
    "gguf",
]

# Keys of engine.options that have a first-class field (LMI and vLLM spellings), and the field.
FIRST_CLASS_OPTIONS: dict[str, str] = {
    "tensor_parallel_degree": "engine.tensorParallelDegree",
    "tensor_parallel_size": "engine.tensorParallelDegree",
    "pipeline_parallel_degree": "engine.pipelineParallelDegree",
    "pipeline_parallel_size": "engine.pipelineParallelDegree",
    "quantize": "engine.quantize",
    "quantization": "engine.quantize",
    "max_rolling_batch_size": "engine.maxRollingBatchSize",
    "max_num_seqs": "engine.maxRollingBatchSize",
    "max_rolling_batch_prefill_tokens": "engine.maxRollingBatchPrefillTokens",
    "max_num_batched_tokens": "engine.maxRollingBatchPrefillTokens",
    "max_model_len": "engine.maxModelLen",
    "dtype": "engine.dtype",
    "gpu_memory_utilization": "engine.gpuMemoryUtilization",
    "cpu_offload_gb_per_gpu": "engine.cpuOffloadGbPerGpu",
    "cpu_offload_gb": "engine.cpuOffloadGbPerGpu",
    "enable_prefix_caching": "engine.enablePrefixCaching",
    "speculative_config": "engine.speculativeConfig",
    "async_mode": "engine.mode",
    "rolling_batch": "engine.mode",
    "enable_lora": "lora.enabled",
    "max_loras": "lora.maxLoras",
    "max_lora_rank": "lora.maxLoraRank",
    "lora_extra_vocab_size": "lora.loraExtraVocabSize",
    "max_cpu_loras": "lora.maxCpuLoras",
    "revision": "model.revision",
    "trust_remote_code": "model.trustRemoteCode",
    "tokenizer": "model.tokenizer",
    "served_model_name": "model.servedModelName",
    "model_loading_timeout": "startup.timeoutSeconds",
}
# Keys of engine.options that the operator sets itself.
OPERATOR_OPTIONS: tuple[str, ...] = ("model_id", "model", "port", "host", "engine", "entryPoint")

# A Hugging Face hub id (org/name), an s3:// URL, or an absolute path. RE2 and Python agree on it.
SOURCE_PATTERN = (
    r"^([A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*"
    r"|s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?"
    r"|/.+)$"
)
# The name becomes the Service's name, so it must be a DNS-1035 label.
DNS1035_PATTERN = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
DNS1123_SUBDOMAIN_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
# A label key: an optional DNS subdomain prefix and a slash, then a name of letters, digits, -_.
LABEL_KEY_PATTERN = (
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
)
QUANTITY_PATTERN = (
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]"
    r"|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)
PERCENT_PATTERN = r"^(100|[1-9]?[0-9])%$"

Reason = Literal["FieldValueInvalid", "FieldValueForbidden", "FieldValueRequired", "FieldValueDuplicate"]


def _cel_list(items: tuple[str, ...] | list[str]) -> str:
    return "[" + ", ".join(f"'{item}'" for item in items) + "]"


def _cel_map(items: dict[str, str]) -> str:
    return "{" + ", ".join(f"'{key}': '{value}'" for key, value in items.items()) + "}"


_FIRST_CLASS = _cel_list(list(FIRST_CLASS_OPTIONS))


@dataclass(frozen=True)
class Rule:
    """One validation rule of an object, enforced by the API server and by `parse_lmimodel`.

    `cel` is the CEL expression (None when the schema itself enforces the rule, e.g. unique keys of
    a list-map, and Python only mirrors it); `check` is its Python twin on the model instance.
    `message_expression`/`explain` build a message naming the offending values, in CEL and Python.
    `field_path` is relative to the object (".engine.options"), as CEL's fieldPath."""

    cel: str | None
    message: str
    check: Callable[[Any], bool]
    field_path: str = ""
    reason: Reason = "FieldValueInvalid"
    message_expression: str | None = None
    explain: Callable[[Any], str] | None = None

    def to_validation(self) -> dict[str, str]:
        """The rule as an x-kubernetes-validations entry."""
        assert self.cel is not None
        out = {"rule": self.cel, "message": self.message}
        if self.message_expression:
            out["messageExpression"] = self.message_expression
        if self.field_path:
            out["fieldPath"] = self.field_path
        if self.reason != "FieldValueInvalid":
            out["reason"] = self.reason
        return out


def _add_rules(schema: dict[str, Any], cls: type[Any]) -> None:
    validations = [rule.to_validation() for rule in getattr(cls, "lmi_rules", ()) if rule.cel]
    if validations:
        schema["x-kubernetes-validations"] = validations


class _Object(BaseModel):
    """Base of every API object: strict types (like the API server), camelCase names, rules."""

    model_config = ConfigDict(
        extra="forbid",
        populate_by_name=True,
        alias_generator=to_camel,
        strict=True,
        protected_namespaces=(),
        json_schema_extra=_add_rules,
    )
    lmi_rules: ClassVar[tuple[Rule, ...]] = ()

    @model_validator(mode="after")
    def _check_rules(self) -> Self:
        for rule in self.lmi_rules:
            if not rule.check(self):
                message = rule.explain(self) if rule.explain else rule.message
                # Passed as context, not as the template, so that braces in it stay as they are.
                raise PydanticCustomError(
                    "lmi_rule", "{message}", {"message": message, "field_path": rule.field_path}
                )
        return self


def _unique(items: list[Any], key: str) -> bool:
    values = [getattr(item, key) for item in items]
    return len(values) == len(set(values))


# An explicit `default: {}` in the CRD makes the API server fill in the nested defaults, so rules can
# read e.g. self.engine.pipelineParallelDegree without has() checks.
_OBJECT_DEFAULT: dict[str, Any] = {"default": {}}


# int | str unions become x-kubernetes-int-or-string fields in the CRD.
Quantity = StrictInt | Annotated[str, Field(pattern=QUANTITY_PATTERN, max_length=64)]
IntOrPercent = Annotated[int, Field(ge=0)] | Annotated[str, Field(pattern=PERCENT_PATTERN, max_length=4)]
ResourceName = Annotated[str, Field(pattern=DNS1123_SUBDOMAIN_PATTERN, max_length=253)]
TensorParallelDegree = Annotated[int, Field(ge=1)] | Literal["max"]


# --- spec.model --------------------------------------------------------------------------------


class SecretKeyRef(_Object):
    """A key of a Secret in the LMIModel's namespace."""

    name: ResourceName = Field(description="Name of the Secret.")
    key: str = Field("token", max_length=253, description="Key in the Secret that holds the value.")


class SecretRef(_Object):
    """A Secret in the LMIModel's namespace."""

    name: ResourceName = Field(description="Name of the Secret.")


class S3Access(_Object):
    """How the pods reach S3 for s3:// sources (model.id and lora.adapters[].source), which are
    downloaded into the cache before the server starts. Without credentialsSecretRef the AWS SDK's
    default chain applies: the pod's service account (IRSA, EKS pod identity; spec.serviceAccountName)
    or AWS_* variables in spec.env."""

    credentials_secret_ref: SecretRef | None = Field(
        None,
        description="Secret with the keys AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and, optionally, "
        "AWS_SESSION_TOKEN), passed to the pods by reference.",
    )
    endpoint_url: str | None = Field(
        None,
        max_length=1024,
        pattern=r"^https?://[^\s/]+(/.*)?$",
        description="S3 API endpoint other than AWS's (MinIO, a local S3): AWS_ENDPOINT_URL_S3.",
    )
    region: str | None = Field(
        None, max_length=64, pattern=r"^[a-z0-9-]+$", description="Region of the bucket (AWS_REGION)."
    )


class ModelSource(_Object):
    """Which model to serve (LMI option.model_id, option.revision, ...)."""

    lmi_rules = (
        Rule(
            cel=f"self.id.matches('{SOURCE_PATTERN}')",
            message="model.id must be a Hugging Face hub id (org/name), an s3:// URL or an absolute path",
            check=lambda m: re.fullmatch(SOURCE_PATTERN, m.id) is not None,
            field_path=".id",
        ),
    )

    id: str = Field(
        min_length=1,
        max_length=512,
        description=(
            "The model: a Hugging Face hub id (org/name), an s3:// URL or an absolute path in the container "
            "(LMI HF_MODEL_ID / option.model_id)."
        ),
    )
    revision: str | None = Field(
        None, max_length=256, description="Branch, tag or commit of the hub model (LMI option.revision)."
    )
    trust_remote_code: bool = Field(
        False, description="Run the model's own Python code from the hub (LMI option.trust_remote_code)."
    )
    tokenizer: str | None = Field(
        None, max_length=512, description="Tokenizer to use instead of the model's own (hub id or path)."
    )
    served_model_name: str | None = Field(
        None,
        max_length=256,
        description=(
            "The name clients put in the model field of OpenAI requests, also the key of /ping's answer. "
            "The operator always writes option.served_model_name: this value, else model.id. (The runtime "
            "image alone, without option.served_model_name, answers under "
            f"'{lmi.DEFAULT_SERVED_MODEL_NAME}', as LMI does.)"
        ),
    )
    hf_token_secret_ref: SecretKeyRef | None = Field(
        None, description="Secret holding a Hugging Face token (HF_TOKEN) for gated or private models."
    )
    s3: S3Access | None = Field(None, description=S3Access.__doc__)


# --- spec.engine -------------------------------------------------------------------------------


class Engine(_Object):
    """vLLM engine settings, under their LMI names (serving.properties option.<name>)."""

    lmi_rules = (
        Rule(
            cel=f"!has(self.options) || !{_FIRST_CLASS}.exists(k, k in self.options)",
            message=(
                "engine.options may not repeat a first-class field (LMI or vLLM spelling): "
                "set it under spec.model, spec.engine, spec.lora or spec.startup"
            ),
            # Names the first offending key; a join() of all of them is beyond CEL's cost budget.
            message_expression=(
                f"'engine.options.' + {_FIRST_CLASS}.filter(k, k in self.options)[0] + "
                f"' repeats a first-class field: use spec.' + "
                f"{_cel_map(FIRST_CLASS_OPTIONS)}[{_FIRST_CLASS}.filter(k, k in self.options)[0]]"
            ),
            check=lambda e: not any(k in e.options for k in FIRST_CLASS_OPTIONS),
            explain=lambda e: next(
                f"engine.options.{k} repeats a first-class field: use spec.{field}"
                for k, field in FIRST_CLASS_OPTIONS.items()
                if k in e.options
            ),
            field_path=".options",
        ),
        Rule(
            cel=f"!has(self.options) || !{_cel_list(OPERATOR_OPTIONS)}.exists(k, k in self.options)",
            message="engine.options may not set keys the operator owns: " + ", ".join(OPERATOR_OPTIONS),
            message_expression=(
                f"'engine.options.' + {_cel_list(OPERATOR_OPTIONS)}.filter(k, k in self.options)[0] + "
                "' is set by the operator'"
            ),
            check=lambda e: not any(k in e.options for k in OPERATOR_OPTIONS),
            explain=lambda e: next(
                f"engine.options.{k} is set by the operator" for k in OPERATOR_OPTIONS if k in e.options
            ),
            field_path=".options",
            reason="FieldValueForbidden",
        ),
        Rule(
            cel="!has(self.options) || self.options.all(k, !k.startsWith('option.'))",
            message="engine.options keys are written without the 'option.' prefix (e.g. enforce_eager)",
            check=lambda e: not any(k.startswith("option.") for k in e.options),
            field_path=".options",
        ),
        Rule(
            cel=(
                "!has(self.maxRollingBatchPrefillTokens) || self.maxRollingBatchPrefillTokens >= "
                "(has(self.maxRollingBatchSize) ? self.maxRollingBatchSize : "
                f"(self.mode == 'rollingBatch' ? {LMI_DEFAULT_BATCH_SIZE['rollingBatch']} "
                f": {LMI_DEFAULT_BATCH_SIZE['async']}))"
            ),
            message=(
                "engine.maxRollingBatchPrefillTokens must be at least engine.maxRollingBatchSize "
                f"(default {_BATCH_SIZE_DEFAULTS})"
            ),
            check=lambda e: (
                e.max_rolling_batch_prefill_tokens is None
                or e.max_rolling_batch_prefill_tokens >= e.effective_max_rolling_batch_size()
            ),
            field_path=".maxRollingBatchPrefillTokens",
        ),
    )

    tensor_parallel_degree: TensorParallelDegree = Field(
        lmi.DEFAULT_TENSOR_PARALLEL_DEGREE,
        description=(
            "GPUs one model copy is split across (LMI option.tensor_parallel_degree, vLLM "
            "tensor_parallel_size): a positive integer, or max for resources.gpus / pipelineParallelDegree."
        ),
    )
    pipeline_parallel_degree: int = Field(
        1,
        ge=1,
        description="Pipeline stages (LMI option.pipeline_parallel_degree, vLLM pipeline_parallel_size).",
    )
    quantize: Quantize | None = Field(
        None,
        description=(
            "Quantization (LMI option.quantize, vLLM quantization). fp8 and bitsandbytes quantize at load "
            "time; for pre-quantized checkpoints (AWQ, GPTQ, FP8, compressed-tensors ...) leave it unset: "
            "vLLM reads the method from config.json and picks the fastest kernel."
        ),
    )
    max_rolling_batch_size: int | None = Field(
        None,
        ge=1,
        le=4096,
        description=(
            "Most sequences in one batch (LMI option.max_rolling_batch_size, vLLM max_num_seqs); "
            f"LMI's default is {_BATCH_SIZE_DEFAULTS}. {_ASYNC_DEFAULT_COST}."
        ),
    )
    max_rolling_batch_prefill_tokens: int | None = Field(
        None,
        ge=1,
        description=(
            "Most tokens scheduled in one step (LMI option.max_rolling_batch_prefill_tokens, vLLM "
            "max_num_batched_tokens)."
        ),
    )
    max_model_len: int | None = Field(
        None, ge=1, description="Context length (prompt + output); defaults to the model's own."
    )
    dtype: Literal["auto", "fp16", "bf16", "fp32", "float16", "bfloat16", "float32"] | None = Field(
        None, description="Weight and activation type (LMI option.dtype); vLLM's default is auto."
    )
    gpu_memory_utilization: float | None = Field(
        None,
        gt=0,
        le=1,
        description="Fraction of each GPU's memory vLLM may use, in (0, 1]; vLLM's default is 0.9.",
    )
    cpu_offload_gb_per_gpu: float | None = Field(
        None,
        ge=0,
        description=(
            "GiB of weights per GPU kept in CPU memory (LMI option.cpu_offload_gb_per_gpu, vLLM "
            "cpu_offload_gb); raise resources.memory to match."
        ),
    )
    enable_prefix_caching: bool | None = Field(
        None, description="Reuse the KV cache of shared prompt prefixes (LMI option.enable_prefix_caching)."
    )
    speculative_config: dict[str, Any] | None = Field(
        None,
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
        description=(
            "Speculative decoding, passed to vLLM's speculative_config as is, e.g. "
            "{method: ngram, num_speculative_tokens: 5, prompt_lookup_max: 4} or "
            "{model: <draft model>, num_speculative_tokens: 3}."
        ),
    )
    mode: EngineMode = Field(
        "async",
        description=(
            "async: LMI's recommended vLLM async service (option.async_mode=true); rollingBatch: the "
            "legacy option.rolling_batch=vllm configuration. Both run the vLLM async engine. "
            f"{_ASYNC_DEFAULT_COST}."
        ),
    )
    options: dict[str, Annotated[str, Field(max_length=4096)]] = Field(
        default_factory=dict,
        max_length=64,
        description=(
            "Any other vLLM engine argument, written as in serving.properties without the option. prefix "
            "(enforce_eager: 'true', tokenizer_mode: mistral, limit_mm_per_prompt: '{\"image\": 1}'), "
            "or an argument of `vllm serve` itself (ssl_keyfile and ssl_certfile, which also switch the "
            "probes to HTTPS; tool_call_parser; h11_max_header_count) or an LMI option (output_formatter, "
            "tgi_compat). Values are strings; the runtime converts them and rejects unknown names."
        ),
    )

    def effective_max_rolling_batch_size(self) -> int:
        """maxRollingBatchSize, or LMI's default for the mode."""
        if self.max_rolling_batch_size is not None:
            return self.max_rolling_batch_size
        return LMI_DEFAULT_BATCH_SIZE[self.mode]


# --- spec.lora ---------------------------------------------------------------------------------


class Adapter(_Object):
    """A LoRA adapter every replica serves under `name`."""

    lmi_rules = (
        Rule(
            cel=f"self.source.matches('{SOURCE_PATTERN}')",
            message="lora.adapters[].source must be a Hugging Face hub id (org/name), an s3:// URL or an "
            "absolute path",
            check=lambda a: re.fullmatch(SOURCE_PATTERN, a.source) is not None,
            field_path=".source",
        ),
    )

    name: str = Field(
        min_length=1,
        max_length=63,
        pattern=r"^[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?$",
        description="Name requests use to pick the adapter (X-Amzn-SageMaker-Adapter-Identifier header or "
        "adapters field).",
    )
    source: str = Field(
        min_length=1,
        max_length=512,
        description="Where the adapter is: hub id (org/name), s3:// URL (fetched into the model cache) or an "
        "absolute path in the pod, such as one on the model cache volume (/opt/ml/cache/...).",
    )


_LORA_TUNABLES = ("maxLoras", "maxLoraRank", "loraExtraVocabSize", "maxCpuLoras")


class LoRA(_Object):
    """Multi-LoRA serving (LMI option.enable_lora and its tunables)."""

    lmi_rules = (
        Rule(
            cel=(
                "self.enabled || !("
                + " || ".join(f"has(self.{name})" for name in _LORA_TUNABLES)
                + " || (has(self.adapters) && size(self.adapters) > 0))"
            ),
            message="lora.maxLoras, lora.maxLoraRank, lora.loraExtraVocabSize, lora.maxCpuLoras and "
            "lora.adapters need lora.enabled: true",
            check=lambda lo: (
                lo.enabled
                or (
                    all(
                        v is None
                        for v in (lo.max_loras, lo.max_lora_rank, lo.lora_extra_vocab_size, lo.max_cpu_loras)
                    )
                    and not lo.adapters
                )
            ),
            reason="FieldValueForbidden",
        ),
        Rule(
            cel=(
                "!has(self.maxCpuLoras) || self.maxCpuLoras >= "
                f"(has(self.maxLoras) ? self.maxLoras : {lmi.DEFAULT_MAX_LORAS})"
            ),
            message=f"lora.maxCpuLoras must be at least lora.maxLoras (default {lmi.DEFAULT_MAX_LORAS})",
            check=lambda lo: lo.max_cpu_loras is None or lo.max_cpu_loras >= lo.effective_max_loras(),
            field_path=".maxCpuLoras",
        ),
        Rule(
            cel=None,  # x-kubernetes-list-type=map with key name
            message="lora.adapters names must be unique",
            check=lambda lo: _unique(lo.adapters, "name"),
            field_path=".adapters",
            reason="FieldValueDuplicate",
        ),
    )

    enabled: bool = Field(False, description="Serve LoRA adapters (LMI option.enable_lora).")
    max_loras: int | None = Field(
        None,
        ge=1,
        le=256,
        description=f"Adapters in one batch (LMI option.max_loras, default {lmi.DEFAULT_MAX_LORAS}).",
    )
    max_lora_rank: int | None = Field(
        None, ge=1, le=512, description="Highest adapter rank to support (LMI option.max_lora_rank)."
    )
    lora_extra_vocab_size: int | None = Field(
        None,
        ge=0,
        description="Extra vocabulary of adapters (LMI option.lora_extra_vocab_size); newer vLLM ignores it.",
    )
    max_cpu_loras: int | None = Field(
        None, ge=1, le=1024, description="Adapters cached in CPU memory (LMI option.max_cpu_loras)."
    )
    adapters: list[Adapter] = Field(
        default_factory=list,
        max_length=32,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
        description="Adapters every replica serves. Adding, changing or removing one does not restart "
        "anything: the operator brings each ready replica to the list through the runtime's management "
        "port, and a replica that starts loads the list before it reports ready. status.adapters shows "
        "where each is loaded, or why not.",
    )
    adapter_routes: bool = Field(
        False,
        description="Also serve LMI's /adapters routes (register, update, delete) on the model's port. "
        "Off by default: whoever reaches the model's Service could then load an adapter from any path or "
        "URL the pod can read; adapters changed this way are not in status.adapters.",
    )

    def effective_max_loras(self) -> int:
        """maxLoras, or LMI's default."""
        return self.max_loras if self.max_loras is not None else lmi.DEFAULT_MAX_LORAS


# --- spec.handler ------------------------------------------------------------------------------


class ConfigMapKeyRef(_Object):
    """A key of a ConfigMap in the LMIModel's namespace."""

    name: ResourceName = Field(description="Name of the ConfigMap.")
    key: str = Field(lmi.HANDLER_FILE, max_length=253, description="Key in the ConfigMap holding model.py.")


class Handler(_Object):
    """A custom model.py (LMI custom handler with `async def handle(inputs)`)."""

    lmi_rules = (
        Rule(
            cel="has(self.modelPy) != has(self.configMapRef)",
            message="handler needs exactly one of handler.modelPy and handler.configMapRef",
            check=lambda h: (h.model_py is None) != (h.config_map_ref is None),
        ),
    )

    model_py: str | None = Field(
        None, min_length=1, max_length=262144, description="model.py source, inline."
    )
    config_map_ref: ConfigMapKeyRef | None = Field(None, description="model.py from a ConfigMap key.")


# --- spec.resources ----------------------------------------------------------------------------


class Resources(_Object):
    """Compute of one pod of a replica: GPUs, CPU, memory and shared memory; and the pods (nodes) of
    one replica."""

    gpus: int = Field(
        1,
        ge=0,
        le=64,
        description=(
            "GPUs of one pod (requests = limits of gpuResourceName); gpus x nodes must equal "
            "engine.tensorParallelDegree x engine.pipelineParallelDegree. 0 runs vLLM on CPU."
        ),
    )
    nodes: int = Field(
        1,
        ge=1,
        le=16,
        description=(
            "Pods of one replica, each with `gpus` GPUs on a node of its own: above 1, a replica is a "
            "LeaderWorkerSet group (one leader serving HTTP, nodes - 1 workers joining its engine), "
            "which needs the LeaderWorkerSet controller in the cluster (docs/multi-node.md)."
        ),
    )
    gpu_resource_name: str | None = Field(
        None,
        max_length=253,
        pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?/[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$",
        description=(
            "Extended resource that counts GPUs on the nodes (e.g. amd.com/gpu); defaults to the "
            "operator's setting, nvidia.com/gpu unless configured otherwise."
        ),
    )
    cpu: Quantity | None = Field(None, description="CPU request of the container (a quantity: 8, 500m).")
    memory: Quantity | None = Field(
        None, description="Memory request and limit of the container (a quantity: 64Gi)."
    )
    shm_size: Quantity | None = Field(
        None,
        description="Size of the memory-backed /dev/shm; NCCL needs several GiB with more than one GPU.",
    )


# --- spec.scheduling ---------------------------------------------------------------------------


class Toleration(_Object):
    """A toleration of node taints (the core/v1 Toleration fields)."""

    lmi_rules = (
        Rule(
            cel="self.operator != 'Exists' || !has(self.value) || self.value == ''",
            message="scheduling.tolerations[].value must be empty when operator is Exists",
            check=lambda t: t.operator != "Exists" or not t.value,
            field_path=".value",
        ),
    )

    key: str | None = Field(None, max_length=316, description="Taint key; empty with Exists matches all.")
    operator: Literal["Exists", "Equal"] = Field("Equal", description="How key and value are matched.")
    value: str | None = Field(None, max_length=63, description="Taint value for operator Equal.")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        None, description="Taint effect to tolerate; empty matches all."
    )
    toleration_seconds: int | None = Field(
        None, description="How long a NoExecute taint is tolerated before eviction."
    )


class Scheduling(_Object):
    """Where replicas may run."""

    node_selector: dict[str, Annotated[str, Field(max_length=63)]] = Field(
        default_factory=dict, max_length=32, description="Node labels the pods require."
    )
    tolerations: list[Toleration] = Field(
        default_factory=list,
        max_length=32,
        json_schema_extra={"x-kubernetes-list-type": "atomic"},
        description="Taints the pods tolerate (GPU nodes are often tainted nvidia.com/gpu).",
    )
    affinity: dict[str, Any] | None = Field(
        None,
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
        description="A core/v1 Affinity, copied to the pods as is.",
    )
    priority_class_name: str | None = Field(None, max_length=253, description="PriorityClass of the pods.")
    exclusive_topology: str | None = Field(
        None,
        max_length=316,
        pattern=LABEL_KEY_PATTERN,
        description=(
            "With resources.nodes above 1: a node label key (a rack, a block of nodes on one fabric); "
            "the pods of each replica go into one domain of this label, which no other replica shares "
            "(LeaderWorkerSet's exclusive-topology)."
        ),
    )


# --- spec.profiles -------------------------------------------------------------------------------

# A profile's name ends its Deployment's name (<model>-<name>), so it is a short DNS label.
PROFILE_NAME_PATTERN = r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$"
LABEL_VALUE_PATTERN = r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"


class ProfileGPU(_Object):
    """The nodes of the profile: those with a GPU product, those with some labels, or both."""

    lmi_rules = (
        Rule(
            cel="has(self.product) || (has(self.nodeSelector) && size(self.nodeSelector) > 0)",
            message="profiles[].gpu needs product or nodeSelector",
            check=lambda g: g.product is not None or bool(g.node_selector),
            reason="FieldValueRequired",
        ),
        Rule(
            cel=(
                "!has(self.product) || !has(self.nodeSelector) || "
                f"!('{GPU_PRODUCT_LABEL}' in self.nodeSelector)"
            ),
            message=f"profiles[].gpu.nodeSelector may not set {GPU_PRODUCT_LABEL}: profiles[].gpu.product "
            "sets it",
            check=lambda g: g.product is None or GPU_PRODUCT_LABEL not in g.node_selector,
            field_path=".nodeSelector",
            reason="FieldValueForbidden",
        ),
    )

    product: str | None = Field(
        None,
        min_length=1,
        max_length=63,
        pattern=LABEL_VALUE_PATTERN,
        description=f"The GPU type: the value of the node label {GPU_PRODUCT_LABEL} (set by GPU feature "
        "discovery), e.g. NVIDIA-H100-80GB-HBM3.",
    )
    node_selector: dict[str, Annotated[str, Field(max_length=63)]] = Field(
        default_factory=dict,
        max_length=32,
        description="Node labels the profile's pods require, on top of spec.scheduling.nodeSelector (a key "
        "in both takes this value).",
    )

    def node_labels(self) -> dict[str, str]:
        """The node labels the profile's pods require: nodeSelector and the product label."""
        product = {GPU_PRODUCT_LABEL: self.product} if self.product is not None else {}
        return {**self.node_selector, **product}


class ProfileResources(_Object):
    """GPUs of one replica on the profile."""

    gpus: int | None = Field(
        None,
        ge=1,
        le=64,
        description="GPUs of one replica on the profile, in place of spec.resources.gpus; must equal "
        "tensorParallelDegree x engine.pipelineParallelDegree (the profile's, else the spec's).",
    )


def _engine_field(name: str) -> Any:
    """spec.engine's field `name` as a profile override: the same bounds and description, unset by
    default (the spec's value applies)."""
    return FieldInfo.merge_field_infos(Engine.model_fields[name], default=None)


class ProfileEngine(_Object):
    """Engine settings of the profile's replicas, in place of spec.engine's (unset: spec.engine's)."""

    tensor_parallel_degree: TensorParallelDegree | None = _engine_field("tensor_parallel_degree")
    quantize: Quantize | None = _engine_field("quantize")
    max_model_len: int | None = _engine_field("max_model_len")
    max_rolling_batch_size: int | None = _engine_field("max_rolling_batch_size")
    gpu_memory_utilization: float | None = _engine_field("gpu_memory_utilization")


class Profile(_Object):
    """A GPU type the model may run on, with the settings that suit it."""

    name: str = Field(
        min_length=1,
        max_length=20,
        pattern=PROFILE_NAME_PATTERN,
        description="Name of the profile (lowercase letters, digits and '-'); the Deployment of its "
        "replicas is named <model>-<name>.",
    )
    gpu: ProfileGPU = Field(description=ProfileGPU.__doc__)
    resources: ProfileResources = Field(
        default_factory=ProfileResources, description=ProfileResources.__doc__
    )
    engine: ProfileEngine = Field(default_factory=ProfileEngine, description=ProfileEngine.__doc__)


# --- spec.env ----------------------------------------------------------------------------------


class KeyRef(_Object):
    """A key of a Secret or ConfigMap in the LMIModel's namespace."""

    name: ResourceName = Field(description="Name of the object.")
    key: str = Field(max_length=253, pattern=r"^[-._a-zA-Z0-9]+$", description="Key in the object.")
    optional: bool | None = Field(None, description="Start even when the object or key is missing.")


class EnvVarSource(_Object):
    """Where an environment variable's value comes from."""

    lmi_rules = (
        Rule(
            cel="has(self.secretKeyRef) != has(self.configMapKeyRef)",
            message="env[].valueFrom needs exactly one of secretKeyRef and configMapKeyRef",
            check=lambda s: (s.secret_key_ref is None) != (s.config_map_key_ref is None),
        ),
    )

    secret_key_ref: KeyRef | None = Field(None, description="A key of a Secret.")
    config_map_key_ref: KeyRef | None = Field(None, description="A key of a ConfigMap.")


_USE_THE_SPEC = "use spec.model, spec.engine, spec.lora and spec.engine.options"


class EnvVar(_Object):
    """An environment variable of the model server container."""

    lmi_rules = (
        Rule(
            cel=(
                f"!self.name.startsWith('{lmi.OPTION_ENV_PREFIX}') && "
                f"!(self.name in {_cel_list(lmi.CONFIG_ENV)})"
            ),
            message=f"env may not set {lmi.OPTION_ENV_PREFIX}* or LMI configuration variables "
            f"({lmi.MODEL_ID_ENV}, {lmi.ADAPTERS_ENV}, ...): {_USE_THE_SPEC}",
            message_expression=f"'env ' + self.name + ' is LMI configuration: {_USE_THE_SPEC}'",
            check=lambda e: not e.name.startswith(lmi.OPTION_ENV_PREFIX) and e.name not in lmi.CONFIG_ENV,
            explain=lambda e: f"env {e.name} is LMI configuration: {_USE_THE_SPEC}",
            field_path=".name",
            reason="FieldValueForbidden",
        ),
        Rule(
            cel="!(has(self.value) && has(self.valueFrom))",
            message="env[].value and env[].valueFrom are mutually exclusive",
            check=lambda e: e.value is None or e.value_from is None,
        ),
    )

    name: str = Field(
        min_length=1, max_length=256, pattern=r"^[-._a-zA-Z][-._a-zA-Z0-9]*$", description="Variable name."
    )
    value: str | None = Field(None, max_length=32768, description="Literal value.")
    value_from: EnvVarSource | None = Field(None, description="Value from a Secret or ConfigMap key.")


# --- spec.startup, spec.autoscaling, spec.rollout ------------------------------------------------


class Startup(_Object):
    """Start-up budget: download and load of the weights, then engine warm-up."""

    timeout_seconds: int = Field(
        3600,
        ge=60,
        le=86400,
        description=(
            "Seconds a replica may take from container start to ready before it is restarted (the startup "
            "probe's budget; LMI option.model_loading_timeout). The default fits a 70B download and load."
        ),
    )
    download_stall_seconds: int = Field(
        600,
        ge=30,
        le=86400,
        description=(
            "A download into the cache that makes no progress for this long is stopped and reported "
            "(status reason DownloadStalled) instead of waiting for the start-up budget."
        ),
    )


class PodMetric(_Object):
    """A per-pod metric from the custom metrics API (e.g. vLLM's, through prometheus-adapter)."""

    name: str = Field(
        min_length=1,
        max_length=253,
        pattern=r"^[a-zA-Z_:][a-zA-Z0-9_:]*$",
        description="Metric name, e.g. vllm:num_requests_waiting.",
    )
    target_average_value: Quantity = Field(description="Target average of the metric over the replicas.")


class Autoscaling(_Object):
    """A HorizontalPodAutoscaler for the model's replicas (it drives spec.replicas through /scale)."""

    lmi_rules = (
        Rule(
            cel="self.minReplicas <= self.maxReplicas",
            message="autoscaling.minReplicas must not exceed autoscaling.maxReplicas",
            check=lambda a: a.min_replicas <= a.max_replicas,
            field_path=".minReplicas",
        ),
        Rule(
            cel="has(self.targetCPUUtilizationPercentage) || (has(self.metrics) && size(self.metrics) > 0)",
            message="autoscaling needs targetCPUUtilizationPercentage or at least one "
            "autoscaling.metrics entry",
            check=lambda a: a.target_cpu_utilization_percentage is not None or bool(a.metrics),
            reason="FieldValueRequired",
        ),
        Rule(
            cel=None,  # x-kubernetes-list-type=map with key name
            message="autoscaling.metrics names must be unique",
            check=lambda a: _unique(a.metrics, "name"),
            field_path=".metrics",
            reason="FieldValueDuplicate",
        ),
    )

    min_replicas: int = Field(1, ge=1, le=1000, description="Fewest replicas.")
    max_replicas: int = Field(ge=1, le=1000, description="Most replicas.")
    target_cpu_utilization_percentage: int | None = Field(
        None,
        ge=1,
        le=100,
        alias="targetCPUUtilizationPercentage",
        description="Target average CPU utilization of the CPU request.",
    )
    metrics: list[PodMetric] = Field(
        default_factory=list,
        max_length=8,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
        description="Per-pod metrics to scale on, such as queue length (vllm:num_requests_waiting).",
    )
    scale_down_stabilization_seconds: int = Field(
        600,
        ge=0,
        le=3600,
        description="How long load must stay low before scaling down; replicas are slow to start.",
    )


class Rollout(_Object):
    """How a changed spec replaces the running replicas."""

    lmi_rules = (
        Rule(
            cel="self.strategy == 'RollingUpdate' || !(has(self.maxSurge) || has(self.maxUnavailable))",
            message="rollout.maxSurge and rollout.maxUnavailable apply only to strategy RollingUpdate",
            check=lambda r: (
                r.strategy == "RollingUpdate" or (r.max_surge is None and r.max_unavailable is None)
            ),
            reason="FieldValueForbidden",
        ),
        Rule(
            cel=(
                "!(has(self.maxSurge) && (self.maxSurge == 0 || self.maxSurge == '0%')"
                " && (!has(self.maxUnavailable) || self.maxUnavailable == 0 || self.maxUnavailable == '0%'))"
            ),
            message="rollout.maxSurge and rollout.maxUnavailable may not both be 0",
            check=lambda r: not (r.max_surge in (0, "0%") and r.max_unavailable in (None, 0, "0%")),
            field_path=".maxSurge",
        ),
    )

    strategy: Literal["RollingUpdate", "Recreate"] = Field(
        "RollingUpdate",
        description=(
            "RollingUpdate starts a new replica before stopping an old one (needs spare GPUs); Recreate "
            "stops the old replicas first (downtime, but no extra GPUs)."
        ),
    )
    max_surge: IntOrPercent | None = Field(
        None, description="Extra replicas during a RollingUpdate (number or percent; default 1)."
    )
    max_unavailable: IntOrPercent | None = Field(
        None, description="Replicas that may be down during a RollingUpdate (number or percent; default 0)."
    )

    def effective_max_surge(self) -> int | str:
        """maxSurge, or the default (1) for RollingUpdate."""
        return self.max_surge if self.max_surge is not None else 1

    def effective_max_unavailable(self) -> int | str:
        """maxUnavailable, or the default (0) for RollingUpdate."""
        return self.max_unavailable if self.max_unavailable is not None else 0


# --- spec.cache -----------------------------------------------------------------------------------

AccessMode = Literal["ReadWriteOnce", "ReadWriteMany", "ReadWriteOncePod"]
_SHARED_ACCESS: AccessMode = "ReadWriteMany"


class EmptyDirCache(_Object):
    """A folder that lives and dies with the pod: every replica downloads and compiles anew."""

    size_limit: Quantity | None = Field(None, description="Most the folder may hold (emptyDir sizeLimit).")


class ClaimRef(_Object):
    """A PersistentVolumeClaim you made in the model's namespace. ReadWriteMany lets every replica
    (and other models) share it; ReadWriteOnce serves the replicas of one node."""

    claim_name: ResourceName = Field(description="Name of the PersistentVolumeClaim.")


class ClaimTemplate(_Object):
    """A PersistentVolumeClaim the operator creates for this model, named <model>-cache, deleted with the
    model. Its storage class and access mode cannot change once created (Kubernetes refuses)."""

    size: Quantity = Field(
        description="Storage requested: the weights plus vLLM's compile cache (a few GiB per configuration)."
    )
    storage_class_name: str | None = Field(
        None, max_length=253, description="StorageClass of the claim; the cluster's default when unset."
    )
    access_mode: AccessMode = Field(
        "ReadWriteOnce",
        description="ReadWriteMany for more than one replica; ReadWriteOnce and ReadWriteOncePod serve one.",
    )


class Cache(_Object):
    """Where the weights and vLLM's caches live. The model (s3:// or hub id) and s3:// adapters are
    downloaded into it once, before the server starts; vLLM's compile cache sits in a sub-folder keyed
    by the vLLM version, model, revision, parallelism, quantization, dtype and device, so a changed spec
    never reuses a wrong artefact. Set at most one of emptyDir (the default), persistentVolumeClaim and
    claimTemplate; the operator's defaultCache setting applies when spec.cache is unset."""

    lmi_rules = (
        Rule(
            cel="(has(self.emptyDir) ? 1 : 0) + (has(self.persistentVolumeClaim) ? 1 : 0) + "
            "(has(self.claimTemplate) ? 1 : 0) <= 1",
            message="cache.emptyDir, cache.persistentVolumeClaim and cache.claimTemplate: set at most one; "
            "the operator's defaultCache applies when none is set",
            check=lambda c: (
                sum(x is not None for x in (c.empty_dir, c.persistent_volume_claim, c.claim_template)) <= 1
            ),
        ),
    )

    empty_dir: EmptyDirCache | None = Field(None, description=EmptyDirCache.__doc__)
    persistent_volume_claim: ClaimRef | None = Field(None, description=ClaimRef.__doc__)
    claim_template: ClaimTemplate | None = Field(None, description=ClaimTemplate.__doc__)


def _single_replica_claim(spec: LMIModelSpec) -> bool:
    template = spec.cache.claim_template if spec.cache else None
    if template is None or template.access_mode == _SHARED_ACCESS:
        return True
    return spec.replicas <= 1 and (spec.autoscaling is None or spec.autoscaling.max_replicas <= 1)


def _parallelism_fills_gpus(spec: LMIModelSpec) -> bool:
    """engine.tensorParallelDegree x engine.pipelineParallelDegree == resources.gpus x resources.nodes
    (GPU models, integer tensorParallelDegree)."""
    tp = spec.engine.tensor_parallel_degree
    pp = spec.engine.pipeline_parallel_degree
    return spec.resources.gpus == 0 or isinstance(tp, str) or tp * pp == spec.gpus_per_replica()


def _gpus_split_into_stages(spec: LMIModelSpec) -> bool:
    """resources.gpus x resources.nodes is a multiple of engine.pipelineParallelDegree (GPU models with
    tensorParallelDegree max)."""
    return (
        spec.resources.gpus == 0
        or isinstance(spec.engine.tensor_parallel_degree, int)
        or spec.gpus_per_replica() % spec.engine.pipeline_parallel_degree == 0
    )


_ProfileCheck = Callable[["LMIModelSpec", "Profile"], bool]


def _profiles_breaking(spec: LMIModelSpec, holds: _ProfileCheck) -> list[str]:
    """Names of the profiles of `spec` for which `holds` is false."""
    return [profile.name for profile in spec.profiles if not holds(spec, profile)]


# CEL of profile p's value of a field: its own, else the spec's (p.engine and p.resources may be absent).
_PROFILE_TP = (
    "((has(p.engine) && has(p.engine.tensorParallelDegree)) ? p.engine.tensorParallelDegree "
    ": self.engine.tensorParallelDegree)"
)
_PROFILE_GPUS = "((has(p.resources) && has(p.resources.gpus)) ? p.resources.gpus : self.resources.gpus)"
# The spec's rules on parallelism with the profile's values, guards included (as _parallelism_fills_gpus
# and _gpus_split_into_stages).
_PROFILE_TP_FILLS_GPUS = (
    f"{_PROFILE_GPUS} == 0 || type({_PROFILE_TP}) == string || "
    f"{_PROFILE_TP} * self.engine.pipelineParallelDegree == {_PROFILE_GPUS}"
)
_PROFILE_GPUS_SPLIT = (
    f"{_PROFILE_GPUS} == 0 || type({_PROFILE_TP}) == int || "
    f"{_PROFILE_GPUS} % self.engine.pipelineParallelDegree == 0"
)
_PROFILE_BATCH_FITS_PREFILL = (
    "!has(p.engine) || !has(p.engine.maxRollingBatchSize) || "
    "p.engine.maxRollingBatchSize <= self.engine.maxRollingBatchPrefillTokens"
)
_OWN_ELSE_SPEC = "(the profile's own values, else the spec's)"


def _profile_rule(cel: str, problem: str, holds: _ProfileCheck) -> Rule:
    """A rule every profile must keep: `cel` checks one profile `p` in CEL, `holds` in Python; the
    message is `problem` after profiles[]. A messageExpression naming the first offender (a filter
    over the profiles) is beyond the API server's estimated cost budget for a CRD (measured: it
    refused the CRD), so the message names the field, not the profile."""
    return Rule(
        cel=f"!has(self.profiles) || self.profiles.all(p, {cel})",
        message=f"profiles[].{problem}",
        check=lambda s: not _profiles_breaking(s, holds),
        field_path=".profiles",
    )


# --- spec ----------------------------------------------------------------------------------------


class LMIModelSpec(_Object):
    """What to serve and how: the model, the vLLM engine settings, and the Kubernetes workload."""

    lmi_rules = (
        Rule(
            cel=(
                "self.resources.gpus == 0 || type(self.engine.tensorParallelDegree) == string || "
                "self.engine.tensorParallelDegree * self.engine.pipelineParallelDegree == "
                "self.resources.gpus * self.resources.nodes"
            ),
            message="engine.tensorParallelDegree x engine.pipelineParallelDegree must equal resources.gpus "
            "x resources.nodes",
            check=_parallelism_fills_gpus,
            field_path=".engine.tensorParallelDegree",
        ),
        Rule(
            cel=(
                "self.resources.gpus == 0 || type(self.engine.tensorParallelDegree) == int || "
                "(self.resources.gpus * self.resources.nodes) % self.engine.pipelineParallelDegree == 0"
            ),
            message="resources.gpus x resources.nodes must be a multiple of engine.pipelineParallelDegree "
            "when engine.tensorParallelDegree is max",
            check=_gpus_split_into_stages,
            field_path=".engine.pipelineParallelDegree",
        ),
        Rule(
            cel=(
                "self.resources.gpus > 0 || ((self.engine.tensorParallelDegree == "
                f"'{lmi.TENSOR_PARALLEL_MAX}' || "
                "self.engine.tensorParallelDegree == 1) && self.engine.pipelineParallelDegree == 1)"
            ),
            message="resources.gpus 0 (vLLM on CPU) allows only engine.tensorParallelDegree 1 or max and "
            "engine.pipelineParallelDegree 1",
            check=lambda s: (
                s.resources.gpus > 0
                or (
                    s.engine.tensor_parallel_degree in (lmi.TENSOR_PARALLEL_MAX, 1)
                    and s.engine.pipeline_parallel_degree == 1
                )
            ),
            field_path=".resources.gpus",
        ),
        Rule(
            cel=(
                "self.resources.gpus > 0 || !has(self.engine.quantize) || "
                f"!(self.engine.quantize in {_cel_list(lmi.RUNTIME_QUANTIZATION)})"
            ),
            message="engine.quantize fp8 and bitsandbytes need resources.gpus of at least 1 "
            "(vLLM on CPU rejects them)",
            check=lambda s: s.resources.gpus > 0 or s.engine.quantize not in lmi.RUNTIME_QUANTIZATION,
            field_path=".engine.quantize",
        ),
        Rule(
            cel=(
                "!has(self.cache) || !has(self.cache.claimTemplate) || "
                f"self.cache.claimTemplate.accessMode == '{_SHARED_ACCESS}' || "
                "(self.replicas <= 1 && (!has(self.autoscaling) || self.autoscaling.maxReplicas <= 1))"
            ),
            message="cache.claimTemplate.accessMode other than ReadWriteMany mounts the claim for one "
            "replica: set it to ReadWriteMany for spec.replicas or spec.autoscaling.maxReplicas above 1",
            check=_single_replica_claim,
            field_path=".cache.claimTemplate.accessMode",
        ),
        Rule(
            cel=None,  # x-kubernetes-list-type=map with key name
            message="env names must be unique",
            check=lambda s: _unique(s.env, "name"),
            field_path=".env",
            reason="FieldValueDuplicate",
        ),
        Rule(
            cel="!has(self.profiles) || size(self.profiles) == 0 || self.resources.gpus > 0",
            message="profiles need resources.gpus of at least 1: a model on CPU (resources.gpus 0) has no "
            "GPU profiles",
            check=lambda s: not s.profiles or s.resources.gpus > 0,
            field_path=".profiles",
            reason="FieldValueForbidden",
        ),
        Rule(
            cel="!has(self.profiles) || size(self.profiles) == 0 || self.resources.nodes == 1",
            message="profiles need resources.nodes 1: a replica of several nodes has no GPU profiles",
            check=lambda s: not s.profiles or s.resources.nodes == 1,
            field_path=".profiles",
            reason="FieldValueForbidden",
        ),
        Rule(
            cel=(
                "!has(self.scheduling) || !has(self.scheduling.exclusiveTopology) || self.resources.nodes > 1"
            ),
            message="scheduling.exclusiveTopology needs resources.nodes above 1: it places the pods of "
            "a replica that spans nodes",
            check=lambda s: (
                s.scheduling is None or s.scheduling.exclusive_topology is None or s.resources.nodes > 1
            ),
            field_path=".scheduling.exclusiveTopology",
            reason="FieldValueForbidden",
        ),
        Rule(
            cel="self.resources.nodes == 1 || self.resources.gpus > 0",
            message="resources.nodes above 1 needs resources.gpus of at least 1: a replica spans nodes "
            "for their GPUs",
            check=lambda s: s.resources.nodes == 1 or s.resources.gpus > 0,
            field_path=".resources.nodes",
            reason="FieldValueForbidden",
        ),
        Rule(
            cel=None,  # x-kubernetes-list-type=map with key name
            message="profiles names must be unique",
            check=lambda s: _unique(s.profiles, "name"),
            field_path=".profiles",
            reason="FieldValueDuplicate",
        ),
        # The spec's own rules that a profile's overrides could break, on the profile's replicas' spec.
        _profile_rule(
            _PROFILE_TP_FILLS_GPUS,
            "engine.tensorParallelDegree x engine.pipelineParallelDegree must equal resources.gpus "
            + _OWN_ELSE_SPEC,
            lambda s, p: _parallelism_fills_gpus(s.for_profile(p)),
        ),
        _profile_rule(
            _PROFILE_GPUS_SPLIT,
            "resources.gpus must be a multiple of engine.pipelineParallelDegree when "
            f"engine.tensorParallelDegree is max {_OWN_ELSE_SPEC}",
            lambda s, p: _gpus_split_into_stages(s.for_profile(p)),
        ),
        # Only an override: the spec's own batch size is engine's rule.
        _profile_rule(
            f"!has(self.engine.maxRollingBatchPrefillTokens) || {_PROFILE_BATCH_FITS_PREFILL}",
            "engine.maxRollingBatchSize must not exceed engine.maxRollingBatchPrefillTokens",
            lambda s, p: (
                s.engine.max_rolling_batch_prefill_tokens is None
                or p.engine.max_rolling_batch_size is None
                or p.engine.max_rolling_batch_size <= s.engine.max_rolling_batch_prefill_tokens
            ),
        ),
    )

    model: ModelSource = Field(description="The model to serve.")
    engine: Engine = Field(
        default_factory=Engine, json_schema_extra=_OBJECT_DEFAULT, description=Engine.__doc__
    )
    lora: LoRA | None = Field(None, description=LoRA.__doc__)
    handler: Handler | None = Field(None, description=Handler.__doc__)
    resources: Resources = Field(
        default_factory=Resources, json_schema_extra=_OBJECT_DEFAULT, description=Resources.__doc__
    )
    replicas: int = Field(
        1, ge=0, le=1000, description="Model server replicas (the scale subresource; an HPA may set it)."
    )
    image: str | None = Field(
        None, max_length=1024, description="Runtime image; defaults to the operator's configured image."
    )
    scheduling: Scheduling | None = Field(None, description=Scheduling.__doc__)
    profiles: list[Profile] = Field(
        default_factory=list,
        max_length=8,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
        description="GPU types the model may run on, most preferred first, each with the engine settings "
        "and GPUs that suit it. A replica runs on the first profile whose GPU holds the model (the memory "
        "estimate) and that has free GPUs for it; replicas of one model may run on different profiles (one "
        "Deployment per profile behind the model's Service), and replicas on a fallback profile move back "
        "when the preferred one has room, without dropping below the ready replicas asked for. Empty: "
        "every replica runs with the spec's own settings on the nodes spec.scheduling admits.",
    )
    env: list[EnvVar] = Field(
        default_factory=list,
        max_length=64,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
        description="Extra environment variables of the model server (not LMI configuration).",
    )
    startup: Startup = Field(
        default_factory=Startup, json_schema_extra=_OBJECT_DEFAULT, description=Startup.__doc__
    )
    cache: Cache | None = Field(None, description=Cache.__doc__)
    service_account_name: ResourceName | None = Field(
        None,
        description="ServiceAccount of the pods, for cloud identities (IRSA, EKS pod identity, GKE workload "
        "identity) that read s3:// or other sources; its token is mounted only then.",
    )
    autoscaling: Autoscaling | None = Field(None, description=Autoscaling.__doc__)
    rollout: Rollout = Field(
        default_factory=Rollout, json_schema_extra=_OBJECT_DEFAULT, description=Rollout.__doc__
    )

    def gpus_required(self) -> int:
        """GPUs one pod requests (resources.gpus)."""
        return self.resources.gpus

    def gpus_per_replica(self) -> int:
        """GPUs of one replica over all its pods (resources.gpus x resources.nodes)."""
        return self.resources.gpus * self.resources.nodes

    def tensor_parallel_size(self) -> int:
        """engine.tensorParallelDegree with max resolved the way LMI does: GPUs / pipeline degree."""
        tp = self.engine.tensor_parallel_degree
        if isinstance(tp, int):
            return tp
        return max(1, self.gpus_per_replica() // self.engine.pipeline_parallel_degree)

    def for_profile(self, profile: Profile) -> LMIModelSpec:
        """The spec of a replica on `profile`: the profile's engine settings and GPUs in place of the
        spec's, its node labels added to scheduling.nodeSelector (winning over the spec's), and no
        profiles, so that rendering and the capacity estimate treat it as a spec of its own. Not
        validated again: the profile rules of `LMIModelSpec` check what the overrides could break.
        Nested objects the profile does not touch are shared with this spec."""
        scheduling = self.scheduling or Scheduling()
        updates = {
            "engine": self.engine.model_copy(update=profile.engine.model_dump(exclude_none=True)),
            "scheduling": scheduling.model_copy(
                update={"node_selector": {**scheduling.node_selector, **profile.gpu.node_labels()}}
            ),
            "profiles": [],
        }
        if profile.resources.gpus is not None:
            updates["resources"] = self.resources.model_copy(update={"gpus": profile.resources.gpus})
        return self.model_copy(update=updates)


# --- status --------------------------------------------------------------------------------------


class Condition(_Object):
    """An observation of the LMIModel's state (metav1.Condition)."""

    type: str = Field(
        max_length=316,
        description=(
            "Ready, Progressing, Degraded, Reconciling or Stalled; AdaptersReady (with LoRA: every adapter "
            "in spec.lora.adapters loaded on every ready replica); or an advisory that is present only "
            "while it applies and never affects Ready: BatchSizeDefaulted (async mode at LMI's default "
            "batch size)."
        ),
    )
    status: Literal["True", "False", "Unknown"] = Field(description="Whether the condition holds.")
    reason: str | None = Field(
        None,
        max_length=1024,
        pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$",
        description="CamelCase cause, e.g. InsufficientGPUs, ImagePullBackOff, CrashLoop, OOMKilled.",
    )
    message: str | None = Field(None, max_length=32768, description="Human-readable details.")
    last_transition_time: Annotated[datetime, Field(strict=False)] | None = Field(
        None, description="When status last changed."
    )
    observed_generation: int | None = Field(
        None, ge=0, description="metadata.generation the condition was computed from."
    )


StartupPhase = Literal["Pending", "Downloading", "Starting", "LoadingWeights", "Compiling", "Ready"]


class ReplicaStartup(_Object):
    """One replica's start: the phase it is in, since when, and how long each phase before took."""

    pod: str = Field(max_length=253, description="The replica's pod.")
    phase: StartupPhase = Field(
        description="Pending (scheduling, image), Downloading (the model into the cache), Starting (the "
        "server and vLLM's engine process), LoadingWeights, Compiling (torch.compile, KV cache profiling, "
        "CUDA graphs, warm-up), Ready."
    )
    since: Annotated[datetime, Field(strict=False)] | None = Field(None, description="When the phase began.")
    seconds: dict[str, int] = Field(
        default_factory=dict, max_length=8, description="Whole seconds each finished phase took, by phase."
    )


class StartupStatus(_Object):
    """How the replicas' starts are going (the Startup column shows `phase`)."""

    phase: StartupPhase | None = Field(None, description="The phase of the replica furthest from Ready.")
    replicas: list[ReplicaStartup] = Field(
        default_factory=list, max_length=32, description="Each replica's start, least advanced first."
    )


class AdapterStatus(_Object):
    """Where one adapter of spec.lora.adapters is loaded, or why it is not."""

    name: str = Field(max_length=63, description="The adapter's name.")
    source: str = Field(max_length=512, description="The source the replicas were asked to load.")
    loaded: str = Field(
        max_length=32, description="Ready replicas serving it from this source, of all ready ones (N/M)."
    )
    reason: str | None = Field(
        None,
        max_length=64,
        description="Why a replica did not load it: SourceMissing, RankTooLarge, BaseModelMismatch, "
        "DownloadDenied, DownloadStalled, NameConflict, LoadFailed, or Unreachable (its management port "
        "did not answer).",
    )
    message: str | None = Field(
        None,
        max_length=4096,
        description="The replica and the runtime's own words (Unreachable: in the AdaptersReady condition).",
    )


class ProfileStatus(_Object):
    """What one profile of spec.profiles runs, and why."""

    name: str = Field(max_length=20, description="The profile's name.")
    replicas: int = Field(ge=0, description="Replicas its Deployment asks for now.")
    ready_replicas: int = Field(ge=0, description="Its ready replicas.")
    reason: str = Field(
        max_length=64,
        description="Placed (its GPUs hold its replicas), WaitingForGPUs (no profile had free GPUs for "
        "them: they wait on the first profile that fits), Draining (replicas kept serving until those "
        "that replace them on a preferred profile are ready), NotNeeded (preferred profiles hold every "
        "replica), NoFreeGPUs or InsufficientGPUMemory (the model does not fit its GPU).",
    )


class ModelFactsStatus(_Object):
    """What the inspection read of spec.model without its weights (`lmi-runtime inspect`): config.json
    and the safetensors headers. The capacity estimate (docs/capacity.md) is made from these."""

    source: str = Field(max_length=1024, description="The model source inspected (spec.model.id).")
    revision: str | None = Field(None, max_length=256, description="The revision inspected, if one was set.")
    parameters: int = Field(ge=0, description="Parameters of the checkpoint.")
    weight_bytes: dict[str, Annotated[int, Field(ge=0)]] = Field(
        max_length=16, description="Bytes of the weights by safetensors dtype (BF16, F8_E4M3, ...)."
    )
    layers: int = Field(ge=1, description="Decoder layers.")
    hidden_size: int = Field(ge=1, description="Hidden size.")
    attention_heads: int = Field(ge=1, description="Attention (query) heads.")
    kv_heads: int = Field(ge=1, description="Key/value heads (fewer than attention heads with GQA).")
    head_size: int = Field(ge=1, description="Size of one attention head.")
    intermediate_size: int = Field(ge=1, description="Width of the MLP.")
    vocab_size: int = Field(ge=1, description="Vocabulary size.")
    max_position_embeddings: int = Field(ge=1, description="The longest context the model supports.")
    tied_embeddings: bool = Field(description="Whether input and output embeddings share weights.")
    gated_mlp: bool = Field(description="Whether the MLP is gated (three matrices, as Llama's).")
    experts: int = Field(1, ge=1, description="MLP experts per layer (1: a dense model).")
    quantization: dict[str, Annotated[str, Field(max_length=256)]] = Field(
        default_factory=dict, max_length=32, description="config.json's quantization_config, if any."
    )
    counted: Literal["safetensors", "config"] = Field(
        description="Where the parameter count comes from: the safetensors headers, or config.json's shapes."
    )


class LMIModelStatus(_Object):
    """The observed state, written by the operator only."""

    observed_generation: int | None = Field(
        None, description="metadata.generation of the spec the status describes."
    )
    conditions: list[Condition] = Field(
        default_factory=list,
        max_length=16,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
        description="Ready, Progressing, Degraded, Reconciling and Stalled, with reasons, and advisories.",
    )
    replicas: int | None = Field(None, ge=0, description="Model server pods that exist.")
    ready_replicas: int | None = Field(None, ge=0, description="Model server pods that are ready.")
    ready: str | None = Field(
        None,
        max_length=32,
        description="readyReplicas/replicas as text (e.g. 1/2) for the Ready column of kubectl get.",
    )
    selector: str | None = Field(
        None, max_length=1024, description="Label selector of the pods (for the scale subresource and HPA)."
    )
    endpoint: str | None = Field(None, max_length=1024, description="In-cluster URL of the model's Service.")
    engine_options: dict[str, Annotated[str, Field(max_length=4096)]] = Field(
        default_factory=dict,
        max_length=128,
        description="The LMI options the runtime was given, after defaults and 'max'.",
    )
    startup: StartupStatus | None = Field(None, description=StartupStatus.__doc__)
    adapters: list[AdapterStatus] = Field(
        default_factory=list,
        max_length=32,
        # Written whole by the operator's status apply: atomic spares the API server a merge by key.
        json_schema_extra={"x-kubernetes-list-type": "atomic"},
        description="Each adapter of spec.lora.adapters: how many ready replicas serve it, or why not.",
    )
    adapters_loaded: str | None = Field(
        None,
        max_length=32,
        description="Adapters loaded on every ready replica, of those declared (N/M): the Adapters column.",
    )
    model_facts: ModelFactsStatus | None = Field(None, description=ModelFactsStatus.__doc__)
    profile: str | None = Field(
        None,
        max_length=20,
        description="With spec.profiles: the most preferred profile replicas are placed on (the Profile "
        "column); empty when none is.",
    )
    profiles: list[ProfileStatus] = Field(
        default_factory=list,
        max_length=8,
        json_schema_extra={"x-kubernetes-list-type": "atomic"},
        description="With spec.profiles: each profile's replicas, in the spec's order of preference.",
    )


# --- the object ----------------------------------------------------------------------------------


class ObjectMeta(BaseModel):
    """The parts of metadata the operator reads; the rest is kept as is."""

    model_config = ConfigDict(extra="allow", populate_by_name=True, alias_generator=to_camel)

    name: str | None = None
    namespace: str | None = None
    uid: str | None = None
    generation: int | None = None
    resource_version: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


class LMIModel(_Object):
    """LMIModel serves a model with vLLM the way the LMI (DJL Serving) containers do."""

    lmi_rules = (
        Rule(
            cel=f"self.metadata.name.size() <= 63 && self.metadata.name.matches('{DNS1035_PATTERN}')",
            message="metadata.name must be a DNS-1035 label (at most 63 lowercase letters, digits and '-', "
            "starting with a letter) because it names the model's Service",
            check=lambda o: (
                o.metadata.name is None
                or (len(o.metadata.name) <= 63 and re.fullmatch(DNS1035_PATTERN, o.metadata.name) is not None)
            ),
            field_path=".metadata.name",
        ),
    )

    api_version: Literal["serving.lmi.dev/v1alpha1"] = Field(
        "serving.lmi.dev/v1alpha1", description=API_VERSION
    )
    kind: Literal["LMIModel"] = Field("LMIModel", description=KIND)
    metadata: ObjectMeta = Field(default_factory=ObjectMeta, description="Standard object metadata.")
    spec: LMIModelSpec = Field(description=LMIModelSpec.__doc__)
    status: LMIModelStatus | None = Field(None, description=LMIModelStatus.__doc__)


# --- reading objects -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """One reason an object is invalid: the field's path (spec.engine.quantize) and what is wrong."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class InvalidLMIModel(ValueError):
    """An LMIModel that breaks the schema or a rule; `problems` name the fields."""

    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("; ".join(str(p) for p in problems))
        self.problems = problems


def _data_path(loc: tuple[int | str, ...], data: Any, missing: bool) -> str:
    # pydantic's locations include union branch tags (int, literal['max']); keep only what is in the data.
    path = ""
    node = data
    for i, item in enumerate(loc):
        in_mapping = isinstance(node, Mapping) and item in node
        in_list = isinstance(node, list) and isinstance(item, int) and item < len(node)
        if in_mapping or in_list:
            node = node[item]
        elif not (missing and i == len(loc) - 1):
            break
        path += f"[{item}]" if isinstance(item, int) else f".{item}"
    return path.lstrip(".")


def problems_of(err: ValidationError, data: Any) -> list[Problem]:
    """The errors of a validation, one per field, with paths as the API server writes them."""
    messages: dict[str, list[str]] = {}
    for e in err.errors():
        path = _data_path(e["loc"], data, missing=e["type"] == "missing")
        if e["type"] == "lmi_rule":
            path = (path + e.get("ctx", {}).get("field_path", "")).lstrip(".")
        msg = e["msg"]
        if msg not in messages.setdefault(path, []):
            messages[path].append(msg)
    return [Problem(path, " or ".join(msgs)) for path, msgs in messages.items()]


def parse_lmimodel(obj: Mapping[str, Any]) -> LMIModel:
    """Read an LMIModel object (as from the API server or a YAML file); raise `InvalidLMIModel`
    naming every invalid field."""
    try:
        return LMIModel.model_validate(obj)
    except ValidationError as err:
        raise InvalidLMIModel(problems_of(err, obj)) from None


def _models_in(annotation: Any) -> Iterator[tuple[type[_Object], bool]]:
    """The API models an annotation holds, each with whether it sits in a list."""
    if isinstance(annotation, type) and issubclass(annotation, _Object):
        yield annotation, False
        return
    in_list = get_origin(annotation) is list
    for arg in get_args(annotation):
        for model, nested in _models_in(arg):
            yield model, nested or in_list


def iter_objects(model: type[_Object] = LMIModel, path: str = "") -> Iterator[tuple[str, type[_Object]]]:
    """Every API object with its path (spec.lora.adapters[]), depth first in field order."""
    yield path, model
    for name, field in model.model_fields.items():
        alias = field.alias or name
        for sub, in_list in _models_in(field.annotation):
            yield from iter_objects(sub, f"{path}.{alias}{'[]' if in_list else ''}".lstrip("."))


def iter_rules() -> Iterator[tuple[str, Rule]]:
    """Every rule of the API with the path of the object it belongs to."""
    for path, model in iter_objects():
        for rule in model.lmi_rules:
            yield path, rule
