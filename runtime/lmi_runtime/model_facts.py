"""What a model is, read from its config.json and its safetensors headers, never from its weights.

The capacity estimate (lmi_operator.capacity) works from these facts. With the safetensors headers
(each file starts with an 8-byte length and a JSON table of tensor names, dtypes and shapes) the
parameter count and the weight bytes by dtype are exact; from config.json alone they are counted from
the shapes a dense decoder of that size has (embeddings, attention, MLP, norms), which is what the
published counts of the example models are checked against (tests/test_capacity.py)."""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from lmi_runtime.errors import RuntimeConfigError

DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "BF16": 2,
    "F16": 2,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}
# config.json's torch dtype names, as safetensors names them.
TORCH_DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
# Model types whose MLP is gated (gate, up and down projections); the others have two matrices.
GATED_MLP = frozenset(
    {"llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "gemma", "gemma2", "mllama"}
)
HEADER_LIMIT = 100 * 2**20  # a header larger than this is not a safetensors header


class ModelFactsError(RuntimeConfigError):
    """config.json lacks what the facts need, or a safetensors header cannot be read."""


@dataclass(frozen=True)
class ModelFacts:
    """A decoder's sizes. `weight_bytes` is by safetensors dtype; `counted` says where the parameter
    count comes from ("safetensors" headers, or "config" shapes)."""

    parameters: int
    weight_bytes: dict[str, int]
    layers: int
    hidden_size: int
    attention_heads: int
    kv_heads: int
    head_size: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    tied_embeddings: bool
    gated_mlp: bool
    experts: int = 1
    quantization: dict[str, Any] = field(default_factory=dict)
    counted: str = "config"

    @property
    def linear_parameters(self) -> int:
        """The parameters of the layers' attention and MLP matrices (what runtime fp8 quantizes)."""
        attention = self.hidden_size * self.head_size * (2 * self.attention_heads + 2 * self.kv_heads)
        mlp = (3 if self.gated_mlp else 2) * self.hidden_size * self.intermediate_size * self.experts
        return self.layers * (attention + mlp)

    def to_status(self) -> dict[str, Any]:
        """The facts as `lmi-runtime inspect` prints them (camelCase: the shape status.modelFacts is
        to take)."""
        out: dict[str, Any] = {
            "parameters": self.parameters,
            "weightBytes": dict(sorted(self.weight_bytes.items())),
            "layers": self.layers,
            "hiddenSize": self.hidden_size,
            "attentionHeads": self.attention_heads,
            "kvHeads": self.kv_heads,
            "headSize": self.head_size,
            "maxPositionEmbeddings": self.max_position_embeddings,
            "counted": self.counted,
        }
        if self.quantization:
            out["quantization"] = {k: str(v) for k, v in sorted(self.quantization.items())}
        return out


def _first(config: Mapping[str, Any], *keys: str) -> Any:
    for key in keys:
        if config.get(key) is not None:
            return config[key]
    return None


def _count(config: Mapping[str, Any], *keys: str) -> int:
    value = _first(config, *keys)
    if not isinstance(value, int) or value <= 0:
        raise ModelFactsError(f"config.json: {' or '.join(keys)} must be a positive integer, got {value!r}")
    return value


def facts_from(
    config: Mapping[str, Any], headers: Mapping[str, Mapping[str, Any]] | None = None
) -> ModelFacts:
    """The facts of the model whose config.json is `config` and whose safetensors headers (file name
    -> header table) are `headers` (None: count from the config's shapes)."""
    text = config.get("text_config") or config  # vision models: the language model's sizes
    model_type = str(text.get("model_type") or config.get("model_type") or "")
    hidden = _count(text, "hidden_size", "n_embd", "d_model")
    heads = _count(text, "num_attention_heads", "n_head")
    kv_heads = (
        1 if text.get("multi_query") else int(_first(text, "num_key_value_heads", "num_kv_heads") or heads)
    )
    facts = ModelFacts(
        parameters=0,
        weight_bytes={},
        layers=_count(text, "num_hidden_layers", "n_layer"),
        hidden_size=hidden,
        attention_heads=heads,
        kv_heads=kv_heads,
        head_size=int(_first(text, "head_dim") or hidden // heads),
        intermediate_size=int(_first(text, "intermediate_size", "ffn_hidden_size", "n_inner") or 4 * hidden),
        vocab_size=_count(text, "vocab_size"),
        max_position_embeddings=int(
            _first(text, "max_position_embeddings", "n_positions", "seq_length", "max_seq_len") or 0
        ),
        tied_embeddings=bool(config.get("tie_word_embeddings", True)),  # transformers' default
        gated_mlp=model_type in GATED_MLP,
        experts=int(_first(text, "num_local_experts", "num_experts") or 1),
        quantization=dict(config.get("quantization_config") or {}),
    )
    if headers:
        by_dtype: dict[str, int] = {}
        parameters = 0
        for name, table in headers.items():
            for tensor, info in table.items():
                if tensor == "__metadata__":
                    continue
                dtype = str(info.get("dtype"))
                if dtype not in DTYPE_BYTES:
                    raise ModelFactsError(
                        f"{name}: tensor {tensor} has dtype {dtype!r}, not one of safetensors'"
                    )
                count = math.prod(int(n) for n in info.get("shape", []))
                parameters += count
                by_dtype[dtype] = by_dtype.get(dtype, 0) + count * DTYPE_BYTES[dtype]
        return replace(facts, parameters=parameters, weight_bytes=by_dtype, counted="safetensors")
    embeddings = facts.vocab_size * hidden * (1 if facts.tied_embeddings else 2)
    norms = (2 * facts.layers + 1) * hidden
    parameters = facts.linear_parameters + embeddings + norms
    dtype = TORCH_DTYPES.get(str(_first(config, "torch_dtype", "dtype") or "bfloat16"), "BF16")
    return replace(facts, parameters=parameters, weight_bytes={dtype: parameters * DTYPE_BYTES[dtype]})


def read_header(path: Path) -> dict[str, Any]:
    """The JSON header of one safetensors file (its first 8 + N bytes; the weights are not read)."""
    with path.open("rb") as f:
        prefix = f.read(8)
        if len(prefix) != 8:
            raise ModelFactsError(f"{path}: shorter than a safetensors header")
        (size,) = struct.unpack("<Q", prefix)
        if size > HEADER_LIMIT:
            raise ModelFactsError(f"{path}: header of {size} bytes; not a safetensors file")
        try:
            header: dict[str, Any] = json.loads(f.read(size))
        except ValueError as err:
            raise ModelFactsError(f"{path}: the header is not JSON ({err})") from err
    return header


def facts_of_directory(model_dir: Path) -> ModelFacts:
    """The facts of a model folder: its config.json and the headers of its *.safetensors files."""
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise ModelFactsError(f"{model_dir}: no config.json")
    config = json.loads(config_path.read_text())
    headers = {p.name: read_header(p) for p in sorted(model_dir.glob("*.safetensors"))}
    return facts_from(config, headers or None)
