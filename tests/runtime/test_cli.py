"""`lmi-runtime args` for every configuration of the LMI vLLM guide, and the CLI's contract."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from lmi_runtime import cli
from tests.runtime.conftest import runtime_command

ASYNC_PROPERTIES = {
    "engine": "Python",
    "option.async_mode": "true",
    "option.rolling_batch": "disable",
    "option.entryPoint": "djl_python.lmi_vllm.vllm_async_service",
    "option.tensor_parallel_degree": "max",
}
ASYNC_ENV = {
    "OPTION_ASYNC_MODE": "true",
    "OPTION_ROLLING_BATCH": "disable",
    "OPTION_ENTRYPOINT": "djl_python.lmi_vllm.vllm_async_service",
    "TENSOR_PARALLEL_DEGREE": "max",
}
ROLLING_PROPERTIES = {
    "engine": "Python",
    "option.tensor_parallel_degree": "max",
    "option.rolling_batch": "vllm",
    "option.max_rolling_batch_size": "64",
}
ROLLING_ENV = {
    "TENSOR_PARALLEL_DEGREE": "max",
    "OPTION_ROLLING_BATCH": "vllm",
    "OPTION_MAX_ROLLING_BATCH_SIZE": "64",
}
BASE = {"tensor_parallel_size": 1, "served_model_name": ["lmi"]}

# (serving.properties, environment, expected `args` output); the model is a local folder, as
# <your model> in the guide, given by option.model_id or HF_MODEL_ID.
GUIDE_CONFIGURATIONS: dict[str, tuple[dict[str, str], dict[str, str], dict[str, object]]] = {
    "async mode, serving.properties": (ASYNC_PROPERTIES, {}, {**BASE, "max_num_seqs": 32}),
    "async mode, environment": ({}, ASYNC_ENV, {**BASE, "max_num_seqs": 32}),
    "rolling batch, serving.properties": (ROLLING_PROPERTIES, {}, {**BASE, "max_num_seqs": 64}),
    "rolling batch, environment": ({}, ROLLING_ENV, {**BASE, "max_num_seqs": 64}),
    "LoRA": (
        {
            **ASYNC_PROPERTIES,
            "option.enable_lora": "true",
            "option.max_loras": "2",
            "option.max_lora_rank": "32",
            "option.lora_extra_vocab_size": "256",
            "option.max_cpu_loras": "4",
            "option.gpu_memory_utilization": "0.8",
        },
        {},
        {
            **BASE,
            "max_num_seqs": 32,
            "enable_lora": True,
            "max_loras": 2,
            "max_lora_rank": 32,
            "max_cpu_loras": 4,
            "gpu_memory_utilization": 0.8,
        },
    ),
    "runtime quantization fp8": (
        {**ROLLING_PROPERTIES, "option.quantize": "fp8"},
        {},
        {**BASE, "max_num_seqs": 64, "quantization": "fp8"},
    ),
    "LMI table": (
        {
            **ASYNC_PROPERTIES,
            "option.max_rolling_batch_prefill_tokens": "32768",
            "option.cpu_offload_gb_per_gpu": "4",
        },
        {},
        {**BASE, "max_num_seqs": 32, "max_num_batched_tokens": 32768, "cpu_offload_gb": 4.0},
    ),
    "vLLM aliases of the LMI table": (
        {**ASYNC_PROPERTIES, "option.max_num_batched_tokens": "32768", "option.cpu_offload_gb": "4"},
        {},
        {**BASE, "max_num_seqs": 32, "max_num_batched_tokens": 32768, "cpu_offload_gb": 4.0},
    ),
    "pass-through boolean and string": (
        {},
        {**ASYNC_ENV, "OPTION_ENABLE_PREFIX_CACHING": "true", "OPTION_TOKENIZER_MODE": "mistral"},
        {**BASE, "max_num_seqs": 32, "enable_prefix_caching": True, "tokenizer_mode": "mistral"},
    ),
    "pass-through mapping": (
        {
            **ASYNC_PROPERTIES,
            "option.speculative_config": json.dumps(
                {"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_max": 4}
            ),
        },
        {},
        {
            **BASE,
            "max_num_seqs": 32,
            "speculative_config": {"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_max": 4},
        },
    ),
}


@pytest.mark.parametrize("name", sorted(GUIDE_CONFIGURATIONS))
def test_args_for_guide_configuration(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    properties, env, expected = GUIDE_CONFIGURATIONS[name]
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    model_dir = tmp_path / "model-dir"
    model_dir.mkdir()
    if properties:
        lines = {**properties, "option.model_id": str(model)}
        (model_dir / "serving.properties").write_text("".join(f"{k}={v}\n" for k, v in lines.items()))
    else:
        monkeypatch.setenv("HF_MODEL_ID", str(model))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("NVIDIA_VISIBLE_DEVICES", raising=False)
    assert cli.main(["args", "--model-dir", str(model_dir)]) == 0
    assert json.loads(capsys.readouterr().out) == {"model": str(model), **expected}


def test_args_subprocess_prints_only_json_and_errors_are_one_line(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    good = subprocess.run(
        runtime_command("args", "--model-dir", str(tmp_path)), capture_output=True, text=True, timeout=300
    )
    assert good.returncode == 0, good.stderr
    assert json.loads(good.stdout)["model"] == str(tmp_path)
    assert "resolved to 1" in good.stderr
    (tmp_path / "serving.properties").write_text("option.max_rolling_batch_sise=4\n")
    bad = subprocess.run(
        runtime_command("args", "--model-dir", str(tmp_path)), capture_output=True, text=True, timeout=300
    )
    assert bad.returncode == 2
    assert bad.stdout == ""
    assert "Traceback" not in bad.stderr
    errors = [line for line in bad.stderr.splitlines() if line.startswith("lmi-runtime: error:")]
    assert len(errors) == 1
    assert errors[0].startswith("lmi-runtime: error: option.max_rolling_batch_sise=4: unknown option")
    assert "did you mean max_rolling_batch_size" in errors[0]


@pytest.mark.parametrize(
    ("source", "fragment"),
    [
        ("def handle(inputs:\n    return None\n", "model.py:1: SyntaxError"),
        ("import json\nimport no_such_module_xyz\n", "model.py:2: ModuleNotFoundError: No module named"),
    ],
)
def test_broken_model_py_stops_start_up_naming_file_and_line(
    tmp_path: Path, vllm_env: dict[str, str], source: str, fragment: str
) -> None:
    (tmp_path / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    (tmp_path / "model.py").write_text(source)
    result = subprocess.run(
        runtime_command("serve", "--model-dir", str(tmp_path), "--port", "0"),
        capture_output=True,
        text=True,
        env=vllm_env,
        timeout=300,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert f"lmi-runtime: error: {tmp_path}/{fragment}" in result.stderr


def test_engine_args_table_is_deterministic(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["engine-args-table"]) == 0
    first = capsys.readouterr().out
    assert cli.main(["engine-args-table"]) == 0
    assert capsys.readouterr().out == first
    table = json.loads(first)
    assert table["engine_args"]["max_num_seqs"] == "int"
    assert table["engine_args"]["enforce_eager"] == "bool"
    assert table["engine_args"]["speculative_config"] == "json"
    assert table["engine_args"]["served_model_name"] == "list"
    assert list(table["engine_args"]) == sorted(table["engine_args"])
    assert table["lmi_options"]["renamed"]["max_rolling_batch_size"] == "max_num_seqs"
    assert "entryPoint" in table["lmi_options"]["lmi_only"]


def test_inspect_leaves_the_facts_or_the_error_in_the_message_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import numpy as np
    from safetensors.numpy import save_file

    from lmi_runtime.model_facts import ModelFacts

    for key in [k for k in os.environ if k.startswith(("OPTION_", "HF_"))]:
        monkeypatch.delenv(key)
    model = tmp_path / "model"
    model.mkdir()
    config = {"model_type": "llama", "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2}
    (model / "config.json").write_text(json.dumps(config | {"vocab_size": 10}))
    save_file({"embed": np.zeros((10, 8), np.float16)}, str(model / "model.safetensors"))
    model_dir = tmp_path / "model-dir"
    model_dir.mkdir()
    message = tmp_path / "termination-log"

    def inspect(*args: str) -> tuple[int, str, dict[str, object]]:
        code = cli.main(["inspect", *args, "--model-dir", str(model_dir), "--message-file", str(message)])
        assert len(message.read_bytes()) <= cli.MESSAGE_LIMIT
        document = json.loads(message.read_text())
        message.unlink()
        return code, capsys.readouterr().out, document

    # The model the settings name, with its revision; and a folder given as PATH.
    monkeypatch.setenv("OPTION_MODEL_ID", str(model))
    monkeypatch.setenv("HF_REVISION", "v2")
    code, out, document = inspect()
    status = json.loads(out)
    assert code == 0 and status["counted"] == "safetensors" and status["parameters"] == 80
    assert document == {"facts": status, "source": str(model), "revision": "v2"}
    assert ModelFacts.from_status(status).to_status() == status
    assert inspect(str(model)) == (0, out, {"facts": status, "source": str(model), "revision": None})

    # No model_id: the model directory is the model, as LMI serves it; here it has none.
    monkeypatch.delenv("OPTION_MODEL_ID")
    code, out, document = inspect()
    assert (code, out) == (2, "")
    assert document == {"error": f"--model-dir={model_dir}: no config.json", "source": str(model_dir)}

    # A source too long for a termination message: the error is shortened, the JSON stays whole.
    long = "/no/such/" + "x" * 3000
    monkeypatch.setenv("OPTION_MODEL_ID", long)
    code, out, document = inspect()
    assert code == 2 and document["source"] == long
    assert str(document["error"]).startswith(f"OPTION_MODEL_ID={long[:100]}")
    assert str(document["error"]).endswith("...")
