"""What a model is, read from its config.json and its safetensors headers, never from its weights.

The capacity estimate (lmi_operator.capacity) works from these facts. With the safetensors headers
(each file starts with an 8-byte length and a JSON table of tensor names, dtypes and shapes) the
parameter count and the weight bytes by dtype are exact; from config.json alone they are counted from
the shapes a dense decoder of that size has (embeddings, attention, MLP, norms), which is what the
published counts of the example models are checked against (tests/test_capacity.py).

The same reading serves a folder here and a model elsewhere (lmi_runtime.model_inspect reads an s3://
prefix or a hub repository with ranged requests): `parse_header` takes a function reading a byte range,
so only the header's bytes are ever asked for."""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from functools import partial
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
# quantization_config entries whose text is longer than this (the per-module `ignore` lists, nested
# `config_groups`) are left out of the facts: the estimate needs only whether the checkpoint is
# quantized, and the facts travel in a Job's termination message (4096 bytes at most).
QUANTIZATION_VALUE_LIMIT = 80


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
        to take); every field is there, so `from_status` rebuilds them."""
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
            "intermediateSize": self.intermediate_size,
            "vocabSize": self.vocab_size,
            "tiedEmbeddings": self.tied_embeddings,
            "gatedMlp": self.gated_mlp,
            "experts": self.experts,
        }
        if self.quantization:
            out["quantization"] = {k: str(v) for k, v in sorted(self.quantization.items())}
        return out

    @classmethod
    def from_status(cls, status: Mapping[str, Any]) -> ModelFacts:
        """The facts `to_status` wrote (the operator reads them back from the inspect Job's message).
        Raises ModelFactsError naming the key that is missing or of the wrong type."""
        if not isinstance(status, Mapping):
            raise ModelFactsError(f"model facts: expected an object, got {type(status).__name__}")

        def integer(key: str) -> int:
            value = _status_key(status, key)
            # bool is an int in Python, but true is not a size.
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ModelFactsError(f"model facts: {key} must be a non-negative integer, got {value!r}")
            return value

        def flag(key: str) -> bool:
            value = _status_key(status, key)
            if not isinstance(value, bool):
                raise ModelFactsError(f"model facts: {key} must be true or false, got {value!r}")
            return value

        weight_bytes = _status_key(status, "weightBytes")
        if not isinstance(weight_bytes, Mapping) or not all(
            isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in weight_bytes.values()
        ):
            raise ModelFactsError(
                f"model facts: weightBytes must map dtypes to non-negative integers, got {weight_bytes!r}"
            )
        quantization = status.get("quantization") or {}
        if not isinstance(quantization, Mapping) or not all(
            isinstance(v, str) for v in quantization.values()
        ):
            raise ModelFactsError(
                f"model facts: quantization must map names to strings, got {quantization!r}"
            )
        counted = _status_key(status, "counted")
        if counted not in ("config", "safetensors"):
            raise ModelFactsError(f"model facts: counted must be config or safetensors, got {counted!r}")
        return cls(
            parameters=integer("parameters"),
            weight_bytes={str(k): int(v) for k, v in weight_bytes.items()},
            layers=integer("layers"),
            hidden_size=integer("hiddenSize"),
            attention_heads=integer("attentionHeads"),
            kv_heads=integer("kvHeads"),
            head_size=integer("headSize"),
            intermediate_size=integer("intermediateSize"),
            vocab_size=integer("vocabSize"),
            max_position_embeddings=integer("maxPositionEmbeddings"),
            tied_embeddings=flag("tiedEmbeddings"),
            gated_mlp=flag("gatedMlp"),
            experts=integer("experts"),
            quantization=dict(quantization),
            counted=counted,
        )


def _status_key(status: Mapping[str, Any], key: str) -> Any:
    if key not in status:
        raise ModelFactsError(f"model facts: {key} is missing")
    return status[key]


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
        quantization={
            str(k): str(v)
            for k, v in (config.get("quantization_config") or {}).items()
            if len(str(v)) <= QUANTIZATION_VALUE_LIMIT
        },
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


def parse_header(name: str, size: int, read: Callable[[int, int], bytes]) -> dict[str, Any]:
    """The JSON header of the safetensors file `name` of `size` bytes, read with `read(offset,
    length)` (the file, or ranged requests): its first 8 bytes (the header's length, little-endian)
    and then exactly the header; the weights after it are never asked for."""
    if size < 8:
        raise ModelFactsError(f"{name}: shorter than a safetensors header")
    prefix = read(0, 8)
    if len(prefix) != 8:
        raise ModelFactsError(f"{name}: shorter than a safetensors header")
    (length,) = struct.unpack("<Q", prefix)
    # The smallest header is "{}"; a header running past the end of the file is not one.
    if not 2 <= length <= HEADER_LIMIT or 8 + length > size:
        raise ModelFactsError(f"{name}: header of {length} bytes; not a safetensors file")
    try:
        header = json.loads(read(8, length))
    except ValueError as err:
        raise ModelFactsError(f"{name}: the header is not JSON ({err})") from err
    if not isinstance(header, dict) or not all(isinstance(v, dict) for v in header.values()):
        raise ModelFactsError(f"{name}: the header is not a table of tensors; not a safetensors file")
    return header


def read_header(path: Path) -> dict[str, Any]:
    """The JSON header of one safetensors file (its first 8 + N bytes; the weights are not read)."""
    return parse_header(str(path), path.stat().st_size, partial(_read_file, path))


def parse_config(name: str, data: bytes) -> dict[str, Any]:
    """config.json's content as a mapping; `name` says where it came from in the message."""
    try:
        config = json.loads(data)
    except ValueError as err:
        raise ModelFactsError(f"{name}: not JSON ({err})") from err
    if not isinstance(config, dict):
        raise ModelFactsError(f"{name}: not a JSON object")
    return config


def facts_of_files(
    where: str, sizes: Mapping[str, int], read: Callable[[str, int, int], bytes]
) -> ModelFacts:
    """The facts of a model folder wherever it is: `sizes` lists its files (name -> bytes) and
    `read(name, offset, length)` reads a range of one; all of config.json is read, of each
    *.safetensors file only its header. `where` names the folder in messages."""
    if "config.json" not in sizes:
        raise ModelFactsError(f"{where}: no config.json")
    config = parse_config(f"{where}/config.json", read("config.json", 0, sizes["config.json"]))
    headers = {
        name: parse_header(f"{where}/{name}", sizes[name], partial(read, name))
        for name in sorted(sizes)
        if name.endswith(".safetensors")
    }
    try:
        return facts_from(config, headers or None)
    except ModelFactsError as err:
        raise ModelFactsError(f"{where}: {err}") from None


def _read_file(path: Path, offset: int, length: int) -> bytes:
    with path.open("rb") as f:
        f.seek(offset)
        return f.read(length)


def facts_of_directory(model_dir: Path, where: str | None = None) -> ModelFacts:
    """The facts of a model folder: its config.json and the headers of its *.safetensors files.
    `where` names it in messages (default: its path)."""
    sizes = (
        {p.name: p.stat().st_size for p in model_dir.iterdir() if p.is_file()} if model_dir.is_dir() else {}
    )
    return facts_of_files(
        where or str(model_dir),
        sizes,
        lambda name, offset, length: _read_file(model_dir / name, offset, length),
    )
