"""LMI configuration -> vLLM engine arguments, against the installed vLLM's real argument parser."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from lmi_runtime.adapter_set import classify
from lmi_runtime.adapter_sources import declared_adapters
from lmi_runtime.adapters import check_declared, preload_dirs
from lmi_runtime.engine_args import ResolvedConfig, resolve
from lmi_runtime.errors import RuntimeConfigError
from lmi_runtime.properties import load_settings, parse_properties


def model_dir(
    tmp_path: Path, properties: Mapping[str, str] | None = None, quant_method: str | None = None
) -> Path:
    """A model folder with a config.json (optionally pre-quantized) and a serving.properties."""
    config: dict[str, object] = {"architectures": ["LlamaForCausalLM"]}
    if quant_method:
        config["quantization_config"] = {"quant_method": quant_method, "bits": 4}
    (tmp_path / "config.json").write_text(json.dumps(config))
    if properties is not None:
        text = "".join(f"{key}={value}\n" for key, value in properties.items())
        (tmp_path / "serving.properties").write_text(text)
    return tmp_path


def resolved(
    tmp_path: Path,
    properties: Mapping[str, str] | None = None,
    env: Mapping[str, str] | None = None,
    quant_method: str | None = None,
    gpus: int = 0,
) -> ResolvedConfig:
    directory = model_dir(tmp_path, properties, quant_method)
    environ = dict(env or {})
    return resolve(load_settings(directory, environ), environ, device_count=lambda: gpus)


@pytest.fixture
def lmi_log(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """caplog for the runtime's logger, which does not propagate once the CLI configured it."""
    runtime_logger = logging.getLogger("lmi_runtime")
    runtime_logger.addHandler(caplog.handler)
    try:
        yield caplog
    finally:
        runtime_logger.removeHandler(caplog.handler)


def engine(tmp_path: Path, **kwargs: object) -> dict[str, object]:
    return resolved(tmp_path, **kwargs).engine_args  # type: ignore[arg-type]


# (serving.properties, environment, pre-quantized method, expected fragments of the one-line message)
BAD_CONFIGURATIONS: list[tuple[dict[str, str], dict[str, str], str | None, list[str]]] = [
    (
        {"option.max_rolling_batch_sise": "4"},
        {},
        None,
        ["option.max_rolling_batch_sise=4", "unknown option", "did you mean max_rolling_batch_size"],
    ),
    ({}, {"OPTION_ENFORCE_EAGR": "true"}, None, ["OPTION_ENFORCE_EAGR=true", "did you mean enforce_eager"]),
    ({"engien": "Python"}, {}, None, ["engien=Python", "unknown serving.properties key", "engine"]),
    ({"engine": "MPI"}, {}, None, ["engine=MPI", "this runtime serves with vLLM", "allowed: Python"]),
    (
        {"option.rolling_batch": "lmi-dist"},
        {},
        None,
        ["option.rolling_batch=lmi-dist", "allowed: auto, vllm, disable"],
    ),
    (
        {"option.output_formatter": "xml"},
        {},
        None,
        [
            "option.output_formatter=xml",
            "a custom one is a custom handler, model.py",
            "allowed: json, jsonlines, sse",
        ],
    ),
    ({}, {"OPTION_TGI_COMPAT": "maybe"}, None, ["OPTION_TGI_COMPAT=maybe", "expected true or false"]),
    (
        {"option.async_mode": "true", "option.rolling_batch": "vllm"},
        {},
        None,
        ["option.async_mode=true needs option.rolling_batch=disable"],
    ),
    ({"option.async_mode": "maybe"}, {}, None, ["option.async_mode=maybe", "expected true or false"]),
    (
        {"option.entryPoint": "djl_python.deepspeed"},
        {},
        None,
        [
            "option.entryPoint=djl_python.deepspeed",
            "unsupported entry point",
            "djl_python.lmi_vllm.vllm_async_service",
        ],
    ),
    ({"option.task": "text-embedding"}, {}, None, ["option.task=text-embedding", "text generation"]),
    (
        {"option.quantize": "awq4"},
        {},
        None,
        ["option.quantize=awq4", "unknown quantization method", "allowed:", "fp8"],
    ),
    (
        {"option.quantize": "fp8", "option.quantization": "awq"},
        {},
        None,
        ["option.quantize=fp8", "option.quantization=awq", "(quantization) differently"],
    ),
    (
        {"option.max_rolling_batch_size": "8", "option.max_num_seqs": "16"},
        {},
        None,
        ["option.max_num_seqs=16", "option.max_rolling_batch_size=8", "(max_num_seqs)"],
    ),
    (
        {"option.max_rolling_batch_prefill_tokens": "4096", "option.max_num_batched_tokens": "2048"},
        {},
        None,
        ["(max_num_batched_tokens) differently"],
    ),
    (
        {"option.cpu_offload_gb_per_gpu": "4", "option.cpu_offload_gb": "2"},
        {},
        None,
        ["(cpu_offload_gb) differently"],
    ),
    ({"option.dtype": "fp9"}, {}, None, ["option.dtype=fp9", "invalid choice: 'fp9'", "bfloat16"]),
    (
        {"option.max_rolling_batch_size": "abc"},
        {},
        None,
        ["option.max_rolling_batch_size=abc", "invalid int value"],
    ),
    ({"option.enforce_eager": "maybe"}, {}, None, ["option.enforce_eager=maybe", "expected true or false"]),
    (
        {"option.gpu_memory_utilization": "lots"},
        {},
        None,
        ["option.gpu_memory_utilization=lots", "invalid float"],
    ),
    (
        {"option.speculative_config": "{bad"},
        {},
        None,
        ["option.speculative_config={bad", "cannot be converted"],
    ),
    (
        {"option.tensor_parallel_degree": "0"},
        {},
        None,
        ["option.tensor_parallel_degree=0", "whole number >= 1"],
    ),
    ({}, {"TENSOR_PARALLEL_DEGREE": "two"}, None, ["TENSOR_PARALLEL_DEGREE=two", "whole number >= 1"]),
    (
        {"option.pipeline_parallel_degree": "x"},
        {},
        None,
        ["option.pipeline_parallel_degree=x", "whole number"],
    ),
    ({"option.port": "9000"}, {}, None, ["option.port=9000", "set by the runtime"]),
    ({"option.host": "0.0.0.0"}, {}, None, ["option.host=0.0.0.0", "set by the runtime"]),
    (
        {"option.model_id": "s3://bucket/llama"},
        {},
        None,
        ["option.model_id=s3://bucket/llama", "lmi-runtime fetch"],
    ),
    ({}, {"HF_MODEL_ID": "/no/such/model"}, None, ["HF_MODEL_ID=/no/such/model", "no such file or folder"]),
    (
        {"option.quantize": "fp8"},
        {},
        "awq",
        ["option.quantize=fp8", "conflicts with the model's quantization_config", "quant_method=awq"],
    ),
    ({"option.kv_cache_dtype": "fp7"}, {}, None, ["option.kv_cache_dtype=fp7", "invalid choice"]),
    ({}, {"HF_MODEL_QUANTIZE": "gguf2"}, None, ["HF_MODEL_QUANTIZE=gguf2", "unknown quantization method"]),
    (
        {},
        {"OPTION_ENABLE_LORA": "yesplease"},
        None,
        ["OPTION_ENABLE_LORA=yesplease", "expected true or false"],
    ),
    ({"option.max_model_len": "long"}, {}, None, ["option.max_model_len=long"]),
    ({"option.enable_auto_tool_choice": "true"}, {}, None, ["tool-call-parser"]),
]


@pytest.mark.parametrize(("properties", "env", "quant_method", "fragments"), BAD_CONFIGURATIONS)
def test_bad_configuration_fails_with_a_clear_message(
    tmp_path: Path,
    properties: dict[str, str],
    env: dict[str, str],
    quant_method: str | None,
    fragments: list[str],
) -> None:
    with pytest.raises(RuntimeConfigError) as raised:
        resolved(tmp_path, properties, env, quant_method)
    message = str(raised.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


def test_bitsandbytes_on_a_vllm_without_it_names_the_plugin(tmp_path: Path) -> None:
    from lmi_runtime.engine_args import load_schema

    if "bitsandbytes" in load_schema().quantization_methods:
        assert (
            engine(tmp_path, properties={"option.quantize": "bitsandbytes"})["quantization"] == "bitsandbytes"
        )
        return
    with pytest.raises(RuntimeConfigError, match=r"option.quantize=bitsandbytes: .*vllm-bnb-plugin"):
        resolved(tmp_path, {"option.quantize": "bitsandbytes"})


def test_no_model_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(RuntimeConfigError, match=r"no model: set option\.model_id"):
        resolve(load_settings(tmp_path, {}), {})


def test_properties_line_without_separator_is_an_error() -> None:
    with pytest.raises(RuntimeConfigError, match="line 2: expected key=value"):
        parse_properties("engine=Python\njust-a-word\n")


def test_adapters_without_lora_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "adapters" / "a1").mkdir(parents=True)
    with pytest.raises(RuntimeConfigError, match=r"set option\.enable_lora=true"):
        preload_dirs(tmp_path, enable_lora=False)
    assert preload_dirs(tmp_path, enable_lora=True) == {"a1": tmp_path / "adapters" / "a1"}


def test_declared_adapters_come_from_the_file_or_the_variable_and_are_checked(tmp_path: Path) -> None:
    listed = {"zeta": "org/zeta-lora", "beta": "s3://bucket/beta"}
    file = tmp_path / "adapters.json"
    # The operator's ConfigMap key may not be there yet: nothing declared.
    assert declared_adapters({"LMI_ADAPTERS_FILE": str(file)}) == ({}, str(file))
    file.write_text(json.dumps(listed), encoding="utf-8")
    # The file wins over the variable.
    env = {"LMI_ADAPTERS_FILE": str(file), "LMI_ADAPTERS": '{"other": "/x"}'}
    assert declared_adapters(env) == (listed, str(file))
    assert declared_adapters({"LMI_ADAPTERS": '{"other": "/x"}'}) == ({"other": "/x"}, "LMI_ADAPTERS")
    with pytest.raises(RuntimeConfigError, match=r"^LMI_ADAPTERS: not JSON"):
        declared_adapters({"LMI_ADAPTERS": "a1=org/a1"})
    with pytest.raises(RuntimeConfigError, match=r"expected a JSON object of adapter name to source"):
        declared_adapters({"LMI_ADAPTERS": '{"a1": 3}'})
    folders = {"a1": tmp_path / "adapters" / "a1"}
    check_declared(listed, "LMI_ADAPTERS", folders, enable_lora=True)
    with pytest.raises(
        RuntimeConfigError, match=r"LMI_ADAPTERS: adapter 'a1' is also a folder under adapters/"
    ):
        check_declared({"a1": "org/a1"}, "LMI_ADAPTERS", folders, enable_lora=True)
    with pytest.raises(RuntimeConfigError, match=r"LMI_ADAPTERS lists adapters but LoRA is off"):
        check_declared({"x": "org/x"}, "LMI_ADAPTERS", {}, enable_lora=False)


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        ("LoRA rank 16 is greater than max_lora_rank 8.", "RankTooLarge"),
        ("Loading lora x failed: No adapter found for /no/such", "SourceMissing"),
        ("adapter x=s3://b/p: NoSuchBucket: no such bucket", "SourceMissing"),
        ("adapter x=s3://b/p: AccessDenied: these credentials may not list or read it", "DownloadDenied"),
        (
            "While loading x, expected target modules in ['q_proj'] but received ['fc1']. target_modules=",
            "BaseModelMismatch",
        ),
        ("CUDA error: out of memory", "LoadFailed"),
    ],
)
def test_adapter_failures_are_named_by_reason(message: str, reason: str) -> None:
    assert classify(message) == reason


def test_serving_properties_win_over_environment(tmp_path: Path) -> None:
    args = engine(
        tmp_path,
        properties={"option.max_rolling_batch_size": "8"},
        env={"OPTION_MAX_ROLLING_BATCH_SIZE": "16", "OPTION_MAX_MODEL_LEN": "128"},
    )
    assert args["max_num_seqs"] == 8
    assert args["max_model_len"] == 128


def test_container_aliases_fill_only_unset_targets(tmp_path: Path) -> None:
    args = engine(
        tmp_path,
        env={
            "HF_MODEL_TRUST_REMOTE_CODE": "true",
            "SM_NUM_GPUS": "1",
            "MAX_BATCH_PREFILL_TOKENS": "4096",
            "MAX_BATCH_SIZE": "12",
            "OPTION_MAX_ROLLING_BATCH_SIZE": "24",
            "ENABLE_CUDA_GRAPHS": "true",
            "CUDA_MEMORY_FRACTION": "0.5",
            "HF_REVISION": "main",
            "HF_MODEL_QUANTIZE": "fp8",
        },
    )
    assert args["trust_remote_code"] is True
    assert args["tensor_parallel_size"] == 1
    assert args["max_num_batched_tokens"] == 4096
    assert args["max_num_seqs"] == 24
    assert args["enforce_eager"] is False
    assert args["gpu_memory_utilization"] == 0.5
    assert args["revision"] == "main"
    assert args["quantization"] == "fp8"


def test_tensor_parallel_precedence(tmp_path: Path) -> None:
    env = {"OPTION_TENSOR_PARALLEL_DEGREE": "2", "TENSOR_PARALLEL_DEGREE": "4"}
    assert engine(tmp_path, env=env)["tensor_parallel_size"] == 2
    assert engine(tmp_path, env={"TENSOR_PARALLEL_DEGREE": "4"})["tensor_parallel_size"] == 4
    assert (
        engine(tmp_path, properties={"option.tensor_parallel_degree": "1"}, env=env)["tensor_parallel_size"]
        == 1
    )


@pytest.mark.parametrize(
    ("env", "gpus", "pipeline", "expected"),
    [
        ({}, 0, None, 1),
        ({}, 8, None, 8),
        ({"CUDA_VISIBLE_DEVICES": "0,1,2,3"}, 8, "2", 2),
        ({"CUDA_VISIBLE_DEVICES": ""}, 8, None, 1),
        ({"NVIDIA_VISIBLE_DEVICES": "all"}, 4, None, 4),
        ({"NVIDIA_VISIBLE_DEVICES": "GPU-a,GPU-b"}, 8, None, 2),
        ({"NVIDIA_VISIBLE_DEVICES": "none"}, 8, None, 1),
    ],
)
def test_tensor_parallel_max(
    tmp_path: Path, env: dict[str, str], gpus: int, pipeline: str | None, expected: int
) -> None:
    properties = {"option.tensor_parallel_degree": "max"}
    if pipeline:
        properties["option.pipeline_parallel_degree"] = pipeline
    assert engine(tmp_path, properties=properties, env=env, gpus=gpus)["tensor_parallel_size"] == expected


def test_lmi_defaults_by_mode(tmp_path: Path) -> None:
    async_mode = {"option.async_mode": "true", "option.rolling_batch": "disable"}
    assert engine(tmp_path, properties=async_mode)["max_num_seqs"] == 32
    assert engine(tmp_path, properties={"option.rolling_batch": "vllm"})["max_num_seqs"] == 256
    lora = engine(tmp_path, properties={"option.enable_lora": "true"})
    assert lora["enable_lora"] is True and lora["max_loras"] == 4
    assert "max_loras" not in engine(tmp_path, properties={})


def test_pass_through_converts_to_the_field_types(tmp_path: Path) -> None:
    args = engine(
        tmp_path,
        properties={
            "option.enable_prefix_caching": "true",
            "option.tokenizer_mode": "mistral",
            "option.speculative_config": json.dumps(
                {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 2}
            ),
            "option.limit_mm_per_prompt": '{"image": 2}',
            "option.max_model_len": "8k",
            "option.dtype": "bf16",
            "option.served_model_name": "alpha,beta",
        },
    )
    assert args["enable_prefix_caching"] is True
    assert args["tokenizer_mode"] == "mistral"
    assert args["speculative_config"] == {
        "method": "ngram",
        "num_speculative_tokens": 3,
        "prompt_lookup_max": 2,
    }
    assert args["limit_mm_per_prompt"] == {"image": 2}
    assert args["max_model_len"] == 8000
    assert args["dtype"] == "bfloat16"
    assert args["served_model_name"] == ["alpha", "beta"]


def test_lora_extra_vocab_size_is_accepted_with_a_warning(
    tmp_path: Path, lmi_log: pytest.LogCaptureFixture
) -> None:
    from lmi_runtime.engine_args import load_schema

    with lmi_log.at_level(logging.WARNING, logger="lmi_runtime"):
        args = engine(
            tmp_path, properties={"option.enable_lora": "true", "option.lora_extra_vocab_size": "256"}
        )
    if "lora_extra_vocab_size" in load_schema().engine_fields:
        assert args["lora_extra_vocab_size"] == 256
    else:
        assert "lora_extra_vocab_size" not in args
        assert "option.lora_extra_vocab_size=256: accepted but ignored" in lmi_log.text


def test_pre_quantized_same_method_is_dropped_with_a_log_line(
    tmp_path: Path, lmi_log: pytest.LogCaptureFixture
) -> None:
    with lmi_log.at_level(logging.INFO, logger="lmi_runtime"):
        args = engine(tmp_path, properties={"option.quantize": "awq"}, quant_method="awq")
    assert "quantization" not in args
    assert "option.quantize=awq: dropped: the model is already quantized with awq" in lmi_log.text
    # A kernel variant of the declared method is an explicit choice and is kept.
    assert engine(tmp_path, properties={"option.quantize": "awq_marlin"}, quant_method="awq")[
        "quantization"
    ] == ("awq_marlin")


def test_lmi_only_keys_are_consumed(tmp_path: Path) -> None:
    args = engine(
        tmp_path,
        properties={
            "engine": "Python",
            "option.entryPoint": "djl_python.lmi_vllm.vllm_async_service",
            "option.async_mode": "true",
            "option.rolling_batch": "disable",
            "option.model_loading_timeout": "1800",
            "option.predict_timeout": "60",
            "option.output_formatter": "json",
        },
    )
    assert set(args) == {"model", "tensor_parallel_size", "max_num_seqs", "served_model_name"}


@pytest.mark.parametrize(
    ("properties", "stream", "tgi_compat"),
    [
        ({}, "jsonlines", False),
        ({"option.output_formatter": "sse"}, "sse", False),
        ({"option.output_formatter": "JSONLines"}, "jsonlines", False),
        ({"option.output_formatter": "json"}, "jsonlines", False),
        ({"option.tgi_compat": "true"}, "sse", True),
        ({"option.tgi_compat": "true", "option.output_formatter": "jsonlines"}, "jsonlines", True),
        ({"option.tgi_compat": "true", "option.output_formatter": "json"}, "sse", True),
    ],
)
def test_response_format_options(
    tmp_path: Path, properties: dict[str, str], stream: str, tgi_compat: bool
) -> None:
    config = resolved(tmp_path, properties=properties)
    assert (config.response_format.stream, config.response_format.tgi_compat) == (stream, tgi_compat)
    # LMI-only: read by the runtime, never handed to vLLM
    assert not {"output_formatter", "tgi_compat"} & set(config.engine_args)
