"""The capacity estimate: model facts from config.json and safetensors headers, the fit per GPU, and
the estimate held against what vLLM 0.26 measured of the same model on an H200."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import save_file

from lmi_operator.capacity import Engine, GiB, estimate, explain, gpu_memory_of, what_fits
from lmi_operator.testing.nodes import DEFAULT_NODES
from lmi_runtime.cli import main as runtime_main
from lmi_runtime.model_facts import ModelFactsError, facts_from, facts_of_directory, read_header

DATA = Path(__file__).parent / "data" / "capacity"
# Sizes from each model's config.json, and the parameter count its model card publishes (billions).
EXAMPLES: dict[str, dict[str, Any]] = json.loads((DATA / "example-configs.json").read_text())
RANDOM_8B_CONFIG = json.loads((DATA / "llama-3-8b-random.config.json").read_text())
RANDOM_8B_HEADERS = json.loads((DATA / "llama-3-8b-random.safetensors-headers.json").read_text())
H200 = json.loads((DATA / "h200-vllm-0.26.json").read_text())
A10G_BYTES = 22 * GiB  # nvidia.com/gpu.memory 22731 MiB, as GPU feature discovery labels a g5 node


@pytest.mark.parametrize("model", sorted(EXAMPLES))
def test_parameters_counted_from_the_config_match_the_published_count(model: str) -> None:
    facts = facts_from(EXAMPLES[model]["config"])
    published = EXAMPLES[model]["published_b"] * 1e9
    assert abs(facts.parameters / published - 1) < 0.01, (facts.parameters, published)
    assert facts.counted == "config"


def test_the_headers_count_exactly_what_the_config_shapes_say() -> None:
    from_headers = facts_from(RANDOM_8B_CONFIG, RANDOM_8B_HEADERS)
    assert from_headers.counted == "safetensors"
    assert from_headers.parameters == 8_030_261_248 == facts_from(RANDOM_8B_CONFIG).parameters
    assert from_headers.weight_bytes == {"BF16": 2 * 8_030_261_248}
    assert from_headers.to_status()["kvHeads"] == 8


@pytest.mark.parametrize("case", H200["cases"], ids=lambda c: f"{c['quantization']}-{c['max_model_len']}")
def test_the_estimate_is_within_10_percent_of_what_vllm_measured_on_the_h200(case: dict[str, Any]) -> None:
    facts = facts_from(RANDOM_8B_CONFIG, RANDOM_8B_HEADERS)
    quantize = None if case["quantization"] == "bf16" else case["quantization"]
    engine = Engine(quantize=quantize, max_model_len=case["max_model_len"], gpu_memory_utilization=0.9)
    est = estimate(facts, engine, int(case["gpu_total_gib"] * GiB))
    measured_kv_per_token = case["kv_available_gib"] * GiB / case["kv_tokens"]
    assert est.weights / GiB == pytest.approx(case["weights_gib"], rel=0.10)
    assert est.kv_bytes_per_token == pytest.approx(measured_kv_per_token, rel=0.10)
    assert est.kv_cache == pytest.approx(measured_kv_per_token * case["max_model_len"], rel=0.10)
    assert est.kv_available / GiB == pytest.approx(case["kv_available_gib"], rel=0.10)
    overhead = case["peak_activation_gib"] + case["non_torch_gib"] + case["cuda_graph_gib"]
    assert est.overhead / GiB == pytest.approx(overhead, rel=0.10)


def test_a_model_that_does_not_fit_names_the_numbers_and_what_would_fit() -> None:
    facts = facts_from(EXAMPLES["meta-llama/Llama-3.1-70B-Instruct"]["config"])
    engine = Engine(max_model_len=8192)
    est = estimate(facts, engine, A10G_BYTES)
    assert not est.fits and est.headroom < 0
    options = what_fits(facts, engine, A10G_BYTES)
    assert options == ["tensorParallelDegree 8"]
    message = explain(est, "NVIDIA-A10G", options)
    assert message.startswith("needs 138.7 GiB per GPU (weights 131.4 + KV cache 2.5")
    assert message.endswith("NVIDIA-A10G has 19.8 GiB usable: tensorParallelDegree 8 would fit")


def test_fp8_and_a_shorter_context_are_offered_when_they_fit() -> None:
    facts = facts_from(EXAMPLES["meta-llama/Meta-Llama-3-8B-Instruct"]["config"])
    t4 = 15 * GiB  # 16 GB: bf16 weights alone (15.0 GiB) are over the 13.5 GiB usable
    engine = Engine(max_model_len=8192)
    assert not estimate(facts, engine, t4).fits
    assert what_fits(facts, engine, t4) == ["tensorParallelDegree 2", "quantize fp8"]
    # 131072 tokens of context need 16 GiB of KV cache for one sequence: shorter fits as it is.
    long = Engine(max_model_len=131072)
    options = what_fits(facts, long, A10G_BYTES)
    assert options[0] == "tensorParallelDegree 2" and options[-1].startswith("maxModelLen ")
    shorter = int(options[-1].split()[1])
    assert 8192 < shorter < 131072
    assert estimate(facts, Engine(max_model_len=shorter), A10G_BYTES).fits
    assert not estimate(facts, Engine(max_model_len=shorter + 2048), A10G_BYTES).fits


def test_a_model_that_fits_reports_its_headroom() -> None:
    facts = facts_from(EXAMPLES["meta-llama/Meta-Llama-3-8B-Instruct"]["config"])
    est = estimate(facts, Engine(max_model_len=8192), A10G_BYTES)
    assert est.fits
    assert explain(est, "NVIDIA-A10G", []) == (
        "fits NVIDIA-A10G: needs 19.0 GiB per GPU of 19.8 GiB usable, 1 sequences of 8192 tokens at once"
    )
    # LoRA slots take their share: 4 slots of rank 64 on every layer's attention and MLP.
    with_lora = estimate(facts, Engine(max_model_len=8192, max_loras=4, max_lora_rank=64), A10G_BYTES)
    assert with_lora.lora > 0 and with_lora.needed == est.needed + with_lora.lora


def test_inspect_reads_a_model_folder_without_its_weights(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = {"model_type": "llama", "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1}
    config |= {
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "vocab_size": 10,
        "max_position_embeddings": 64,
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    tensors = {
        "model.embed_tokens.weight": np.zeros((10, 8), np.float16),
        "model.layers.0.mlp.up_proj.weight": np.zeros((16, 8), np.float32),
    }
    save_file(tensors, str(tmp_path / "model.safetensors"))
    assert runtime_main(["inspect", str(tmp_path)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["parameters"] == 10 * 8 + 16 * 8
    assert printed["weightBytes"] == {"F16": 10 * 8 * 2, "F32": 16 * 8 * 4}
    assert (printed["kvHeads"], printed["headSize"], printed["counted"]) == (1, 4, "safetensors")
    assert read_header(tmp_path / "model.safetensors")["model.embed_tokens.weight"]["shape"] == [10, 8]


def test_bad_model_folders_are_refused_naming_the_file_or_key(tmp_path: Path) -> None:
    with pytest.raises(ModelFactsError, match=r"no config\.json"):
        facts_of_directory(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"num_attention_heads": 2, "vocab_size": 10}))
    with pytest.raises(ModelFactsError, match="hidden_size or n_embd or d_model must be a positive integer"):
        facts_of_directory(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(EXAMPLES["google/gemma-2b"]["config"]))
    (tmp_path / "broken.safetensors").write_bytes(b"\xff" * 16)
    with pytest.raises(
        ModelFactsError, match=r"broken\.safetensors: header of .* bytes; not a safetensors file"
    ):
        facts_of_directory(tmp_path)
    bad = {"model.safetensors": {"w": {"dtype": "Q4", "shape": [2]}}}
    with pytest.raises(ModelFactsError, match="tensor w has dtype 'Q4'"):
        facts_from(EXAMPLES["google/gemma-2b"]["config"], bad)


def test_gpu_memory_comes_from_the_node_labels_then_the_product_table() -> None:
    # What the kwok GPU nodes carry: GPU feature discovery's labels.
    by_product = {n.product: n.manifest()["metadata"]["labels"] for n in DEFAULT_NODES if n.gpus}
    assert gpu_memory_of(by_product["NVIDIA-H100-80GB-HBM3"]) == 81559 * 2**20
    assert gpu_memory_of(by_product["NVIDIA-A10G"]) == 23028 * 2**20
    # Only the product label: the table.
    assert gpu_memory_of({"nvidia.com/gpu.product": "NVIDIA-L4"}) == 23034 * 2**20
    assert gpu_memory_of({"nvidia.com/gpu.product": "NVIDIA-Unknown", "nvidia.com/gpu.memory": "n/a"}) is None
