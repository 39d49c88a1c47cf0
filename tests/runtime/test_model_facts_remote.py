"""`lmi-runtime inspect` of the model the settings name, where it lives: an s3:// prefix against a real
S3 API server (moto's server mode, authentication on), read by ranged GETs of the safetensors headers
only; the hub's error when it cannot be reached; the facts' round trip through the status and the
message file the operator's Job leaves in /dev/termination-log."""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import save_file

from lmi_operator.testing.s3_server import Credentials, S3Server, read_policy, s3_server
from lmi_runtime import cli
from lmi_runtime.model_facts import ModelFacts, ModelFactsError, facts_from, facts_of_directory
from lmi_runtime.model_inspect import facts_of_s3
from lmi_runtime.model_store import Source
from lmi_runtime.options import EXIT_DOWNLOAD_FAILED
from tests.runtime.conftest import runtime_command

BUCKET = "models"
LLAMA = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 32,
    "max_position_embeddings": 256,
    "tie_word_embeddings": False,
}
BIG_TENSOR = (4096, 4096)  # 32 MiB of float16 zeros: the data region a whole GET would bring


def _model_folder(path: Path, shards: dict[str, dict[str, np.ndarray]], config: dict[str, Any]) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config))
    for name, tensors in shards.items():
        save_file(tensors, str(path / name))
    return path


def _header_bytes(path: Path) -> int:
    """8 + the header's length: what a reader of the header alone receives of a safetensors file."""
    with path.open("rb") as f:
        return 8 + int(struct.unpack("<Q", f.read(8))[0])


class Models:
    """The S3 server, its bucket of model folders (and the local copies), and users."""

    def __init__(self, server: S3Server, local: dict[str, Path]) -> None:
        self.server = server
        self.local = local
        self.reader = server.user("reader", read_policy(BUCKET))
        self.nobody = server.user("nobody", None)

    def url(self, name: str) -> str:
        """The s3:// URL of the folder uploaded as `name`."""
        return f"s3://{BUCKET}/{name}"


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Models]:
    root = tmp_path_factory.mktemp("remote-models")
    embed = np.ones((32, 64), np.float32)
    local = {
        "big": _model_folder(
            root / "big",
            {"model.safetensors": {"embed": embed, "up": np.zeros(BIG_TENSOR, np.float16)}},
            LLAMA,
        ),
        "sharded": _model_folder(
            root / "sharded",
            {
                "model-00001-of-00002.safetensors": {"embed": embed, "norm": np.ones(64, np.float16)},
                "model-00002-of-00002.safetensors": {"lm_head": np.ones((32, 64), np.int8)},
            },
            LLAMA,
        ),
        "noconfig": _model_folder(root / "noconfig", {"model.safetensors": {"embed": embed}}, LLAMA),
        "notsafe": _model_folder(root / "notsafe", {}, LLAMA),
    }
    (local["noconfig"] / "config.json").unlink()
    # Files beside the weights that are not read, and a subfolder (a folder's top level is the model).
    (local["sharded"] / "tokenizer.json").write_text("{}")
    (local["sharded"] / "model.safetensors.index.json").write_text("{}")
    (local["sharded"] / "original").mkdir()
    save_file({"x": np.zeros(4, np.float32)}, str(local["sharded"] / "original" / "consolidated.safetensors"))
    # A pickle checkpoint renamed: its first 8 bytes are no header length.
    (local["notsafe"] / "model.safetensors").write_bytes(b"\x80\x02}q\x00(X\x05\x00\x00\x00embedq" * 4)
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with s3_server(log=log) as server:
        for name, folder in local.items():
            server.upload(BUCKET, name, folder)
        yield Models(server, local)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No AWS, LMI or hub settings from the test runner's environment (minio reads os.environ)."""
    for key in list(os.environ):
        if key.startswith(("AWS_", "OPTION_", "HF_")):
            monkeypatch.delenv(key)
    return monkeypatch


def test_s3_facts_are_the_folders_and_only_the_headers_are_received(
    models: Models, clean_env: pytest.MonkeyPatch
) -> None:
    for key, value in models.server.env(models.reader).items():
        clean_env.setenv(key, value)
    big = models.local["big"]
    assert (big / "model.safetensors").stat().st_size > 32 * 2**20
    facts, received = facts_of_s3(Source(models.url("big"), "option.model_id"), os.environ)
    assert facts == facts_of_directory(big)
    assert facts.counted == "safetensors" and facts.parameters == 32 * 64 + BIG_TENSOR[0] * BIG_TENSOR[1]
    # Exactly config.json and the header: a GET of the whole object would be 32 MiB more.
    header = _header_bytes(big / "model.safetensors")
    assert received == (big / "config.json").stat().st_size + header
    assert header < 1024

    sharded = models.local["sharded"]
    facts, received = facts_of_s3(Source(models.url("sharded"), "option.model_id"), os.environ)
    assert facts == facts_of_directory(sharded)
    assert facts.weight_bytes == {"F32": 32 * 64 * 4, "F16": 64 * 2, "I8": 32 * 64}
    shards = sorted(sharded.glob("*.safetensors"))
    assert received == (sharded / "config.json").stat().st_size + sum(_header_bytes(p) for p in shards)


def test_inspect_reads_the_configured_s3_model_and_leaves_the_message(models: Models, tmp_path: Path) -> None:
    model_dir = tmp_path / "model-dir"
    model_dir.mkdir()
    (model_dir / "serving.properties").write_text(f"option.model_id={models.url('big')}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "OPTION_", "HF_"))}
    message = tmp_path / "termination-log"
    result = subprocess.run(
        runtime_command("inspect", "--model-dir", str(model_dir), "--message-file", str(message)),
        env={**env, **models.server.env(models.reader)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    facts = facts_of_directory(models.local["big"])
    assert json.loads(result.stdout) == facts.to_status()
    assert f"inspected option.model_id={models.url('big')}: " in result.stderr
    document = json.loads(message.read_text())
    assert document == {"facts": facts.to_status(), "source": models.url("big"), "revision": None}
    assert ModelFacts.from_status(document["facts"]) == facts


@pytest.mark.parametrize(
    ("case", "status", "fragment"),
    [
        ("no such bucket", EXIT_DOWNLOAD_FAILED, "NoSuchBucket: no such bucket"),
        ("no such prefix", EXIT_DOWNLOAD_FAILED, "no objects under this prefix (is the path right?)"),
        ("no config.json", 2, "no config.json"),
        ("not safetensors", 2, "/model.safetensors: header of "),
        ("unknown access key", EXIT_DOWNLOAD_FAILED, "InvalidAccessKeyId: the access key id is not known"),
        ("wrong secret", EXIT_DOWNLOAD_FAILED, "SignatureDoesNotMatch: the secret access key does not"),
        ("denied", EXIT_DOWNLOAD_FAILED, "AccessDenied: these credentials may not list or read it"),
    ],
)
def test_an_s3_model_that_cannot_be_inspected_is_one_line_naming_the_setting(
    models: Models,
    clean_env: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    case: str,
    status: int,
    fragment: str,
) -> None:
    url = {
        "no such bucket": "s3://no-such-bucket/llama",
        "no such prefix": models.url("absent"),
        "no config.json": models.url("noconfig"),
        "not safetensors": models.url("notsafe"),
    }.get(case, models.url("big"))
    creds = {
        "unknown access key": Credentials("AKIAUNKNOWNKEY000000", "x" * 40),
        "wrong secret": Credentials(models.reader.access_key_id, "y" * 40),
        "denied": models.nobody,
        "no such bucket": models.server.admin,  # the reader's policy names one bucket only
    }.get(case, models.reader)
    for key, value in models.server.env(creds).items():
        clean_env.setenv(key, value)
    (tmp_path / "serving.properties").write_text(f"option.model_id={url}\n")
    message = tmp_path / "termination-log"
    assert cli.main(["inspect", "--model-dir", str(tmp_path), "--message-file", str(message)]) == status
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = [line for line in captured.err.splitlines() if line.startswith("lmi-runtime: error: ")]
    assert len(lines) == 1, captured.err
    download = "download failed: " if status == EXIT_DOWNLOAD_FAILED else ""
    assert lines[0].startswith(f"lmi-runtime: error: {download}option.model_id={url}"), lines[0]
    assert fragment in lines[0]
    assert json.loads(message.read_text()) == {
        "error": lines[0].removeprefix("lmi-runtime: error: "),
        "source": url,
    }


def test_an_unreachable_hub_is_one_line_naming_the_model_and_hf_endpoint(
    clean_env: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{sock.getsockname()[1]}"  # closed once the block ends
    clean_env.setenv("HF_ENDPOINT", endpoint)
    clean_env.setenv("HF_HOME", str(tmp_path / "hf"))
    clean_env.setenv("HF_MODEL_ID", "org/name")
    clean_env.setenv("HF_REVISION", "v1")
    message = tmp_path / "termination-log"
    code = cli.main(["inspect", "--model-dir", str(tmp_path), "--message-file", str(message)])
    assert code == EXIT_DOWNLOAD_FAILED
    line = f"download failed: HF_MODEL_ID=org/name@v1: cannot reach the hub at {endpoint} (HF_ENDPOINT): "
    assert f"lmi-runtime: error: {line}" in capsys.readouterr().err
    document = json.loads(message.read_text())
    assert document["error"].startswith(line) and document["source"] == "org/name"


# A DeepSeek-V3-sized MoE: 256 experts, fp8 blocks with their scales, 163 shards, a quantization
# config with a per-module list.
MOE_CONFIG = {
    "model_type": "deepseek_v3",
    "hidden_size": 7168,
    "intermediate_size": 18432,
    "num_hidden_layers": 61,
    "num_attention_heads": 128,
    "num_key_value_heads": 128,
    "vocab_size": 129280,
    "max_position_embeddings": 163840,
    "num_experts": 256,
    "tie_word_embeddings": False,
    "quantization_config": {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": [128, 128],
        "modules_to_not_convert": [f"model.layers.{i}.mlp.gate" for i in range(61)],
    },
}


def _write_header_only(path: Path, tensors: dict[str, tuple[str, list[int]]]) -> None:
    """A safetensors header naming `tensors` (dtype, shape) and no data: all a header reader needs."""
    header = {
        name: {"dtype": dtype, "shape": shape, "data_offsets": [0, 0]}
        for name, (dtype, shape) in tensors.items()
    }
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded)


def test_a_large_moe_message_stays_under_the_termination_message_limit(
    clean_env: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = tmp_path / ("deepseek-ai--DeepSeek-V3-0324-" + "x" * 200)
    model.mkdir()
    (model / "config.json").write_text(json.dumps(MOE_CONFIG))
    for shard in range(163):
        tensors = {
            f"model.layers.{shard}.mlp.experts.w": ("F8_E4M3", [256, 2048, 7168]),
            f"model.layers.{shard}.mlp.experts.scale": ("F32", [256, 16, 56]),
            f"model.layers.{shard}.norm": ("BF16", [7168]),
        }
        if shard == 0:
            tensors["model.embed_tokens.weight"] = ("BF16", [129280, 7168])
        _write_header_only(model / f"model-{shard + 1:05d}-of-00163.safetensors", tensors)
    clean_env.setenv("OPTION_MODEL_ID", str(model))
    clean_env.setenv("OPTION_REVISION", "e" * 40)
    message = tmp_path / "termination-log"
    assert cli.main(["inspect", "--model-dir", str(tmp_path), "--message-file", str(message)]) == 0
    capsys.readouterr()
    size = len(message.read_bytes())
    assert size < 4096, size
    document = json.loads(message.read_text())
    facts = ModelFacts.from_status(document["facts"])
    assert facts == facts_of_directory(model)
    assert facts.parameters > 600e9 and facts.experts == 256
    # The per-module list is left out; what says the checkpoint is quantized stays.
    assert facts.quantization["quant_method"] == "fp8" and "modules_to_not_convert" not in facts.quantization
    assert (document["source"], document["revision"]) == (str(model), "e" * 40)


def test_the_status_rebuilds_the_facts_exactly_and_names_a_bad_key() -> None:
    config_counted = facts_from(MOE_CONFIG)
    headers = {"model.safetensors": {"w": {"dtype": "BF16", "shape": [4, 8]}, "__metadata__": {}}}
    header_counted = facts_from({**LLAMA, "model_type": "gpt2", "tie_word_embeddings": True}, headers)
    for facts in (config_counted, header_counted):
        assert ModelFacts.from_status(json.loads(json.dumps(facts.to_status()))) == facts
    status = header_counted.to_status()
    assert {"intermediateSize", "vocabSize", "tiedEmbeddings", "gatedMlp", "experts"} <= status.keys()
    assert "quantization" not in status and ModelFacts.from_status(status).quantization == {}
    for key in status:
        with pytest.raises(ModelFactsError, match=f"model facts: {key} is missing"):
            ModelFacts.from_status({k: v for k, v in status.items() if k != key})
    bad = {
        "hiddenSize": (True, "hiddenSize must be a non-negative integer, got True"),
        "layers": ("2", "layers must be a non-negative integer, got '2'"),
        "gatedMlp": (1, "gatedMlp must be true or false, got 1"),
        "weightBytes": ({"BF16": -1}, "weightBytes must map dtypes to non-negative integers"),
        "quantization": ({"bits": 4}, "quantization must map names to strings"),
        "counted": ("guess", "counted must be config or safetensors, got 'guess'"),
    }
    for key, (value, message) in bad.items():
        with pytest.raises(ModelFactsError, match=f"model facts: {message}"):
            ModelFacts.from_status({**status, key: value})
