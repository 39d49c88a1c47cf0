"""`lmi-runtime fetch` against a real S3 API server (moto's server mode, authentication on): a model
and an adapter fetched once into the cache, found there by the next replica without a request to
S3, two replicas at once downloading once, and every refusal as one line naming the source."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from lmi_operator.testing.s3_server import Credentials, S3Server, read_policy, s3_server
from lmi_runtime import compile_cache, model_store
from lmi_runtime.adapter_set import classify
from lmi_runtime.model_store import Source, hub_patterns
from lmi_runtime.options import EXIT_DOWNLOAD_FAILED, EXIT_DOWNLOAD_STALLED
from lmi_runtime.properties import load_settings
from tests.runtime.conftest import (
    TinyModel,
    runtime_command,
)

BUCKET = "models"
MODEL_URL = f"s3://{BUCKET}/llama/tiny"
ADAPTER_URL = f"s3://{BUCKET}/adapters/a1"


class Bucket:
    """The server, a bucket holding the tiny model and an adapter, and users with and without rights."""

    def __init__(self, server: S3Server) -> None:
        self.server = server
        self.reader = server.user("reader", read_policy(BUCKET))
        self.nobody = server.user("nobody", None)


@pytest.fixture(scope="module")
def bucket(tiny_model: TinyModel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bucket]:
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with s3_server(log=log) as server:
        server.upload(BUCKET, "llama/tiny", tiny_model.path)
        server.upload(BUCKET, "adapters/a1", tiny_model.adapters["a1"])
        yield Bucket(server)


def fetch(
    model_dir: Path, cache: Path, env: dict[str, str], model: str = MODEL_URL, **extra: str
) -> subprocess.CompletedProcess[str]:
    """`lmi-runtime fetch` as the init container runs it."""
    model_dir.mkdir(exist_ok=True)
    environ = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "OPTION_"))},
        **env,
        "LMI_CACHE_DIR": str(cache),
        "OPTION_MODEL_ID": model,
        **extra,
    }
    return subprocess.run(
        runtime_command("fetch", "--model-dir", str(model_dir)),
        env=environ,
        capture_output=True,
        text=True,
        timeout=120,
    )


def fetch_adapter(cache: Path, env: Mapping[str, str], source: str) -> subprocess.CompletedProcess[str]:
    """`lmi-runtime fetch --adapter SOURCE` into `cache`."""
    return subprocess.run(
        runtime_command("fetch", "--adapter", source, "--label", "adapter a1"),
        env={**env, "LMI_CACHE_DIR": str(cache)},
        capture_output=True,
        text=True,
        timeout=120,
    )


def error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The one error line of a failed command."""
    lines = [line for line in result.stderr.splitlines() if line.startswith("lmi-runtime: error:")]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def files_of(folder: Path) -> dict[str, bytes]:
    """Relative path -> content of every file under `folder`, markers left out."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in folder.rglob("*")
        if p.is_file() and p.name != model_store.COMPLETE_MARKER
    }


def test_a_model_and_an_adapter_are_fetched_once_and_the_next_replica_asks_s3_nothing(
    bucket: Bucket, tiny_model: TinyModel, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    env = bucket.server.env(bucket.reader)
    first = fetch(tmp_path / "m1", cache, env)
    assert first.returncode == 0, first.stderr
    assert f"fetched OPTION_MODEL_ID={MODEL_URL}" in first.stderr
    model = cache / "s3" / BUCKET / "llama" / "tiny"
    assert files_of(model) == files_of(tiny_model.path)
    assert not list(cache.rglob("*.partial"))
    # An adapter is fetched on its own (what the server runs when it loads one): the path is printed.
    adapter = fetch_adapter(cache, env, ADAPTER_URL)
    assert adapter.returncode == 0, adapter.stderr
    assert adapter.stdout.strip() == str(cache / "s3" / BUCKET / "adapters" / "a1")
    assert files_of(cache / "s3" / BUCKET / "adapters" / "a1") == files_of(tiny_model.adapters["a1"])

    # The next replica's credentials may not even list the bucket: a request would fail.
    nobody = bucket.server.env(bucket.nobody)
    second = fetch(tmp_path / "m2", cache, nobody)
    assert second.returncode == 0, second.stderr
    assert f"cache hit: OPTION_MODEL_ID={MODEL_URL}" in second.stderr
    again = fetch_adapter(cache, nobody, ADAPTER_URL)
    assert again.returncode == 0 and f"cache hit: adapter a1={ADAPTER_URL}" in again.stderr, again.stderr
    # Not in the cache and not readable with these credentials: the reason the status shows.
    denied = fetch_adapter(tmp_path / "empty", nobody, ADAPTER_URL)
    assert denied.returncode == 3
    assert classify(error_line(denied)) == "DownloadDenied", denied.stderr

    # `args` (as `serve` does) resolves the s3:// model id to its folder in the cache.
    args = subprocess.run(
        runtime_command("args", "--model-dir", str(tmp_path / "m2")),
        env={**os.environ, "LMI_CACHE_DIR": str(cache), "OPTION_MODEL_ID": MODEL_URL},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert args.returncode == 0, args.stderr
    assert json.loads(args.stdout)["model"] == str(model)


def test_two_replicas_starting_together_download_once(bucket: Bucket, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    env = bucket.server.env(bucket.reader)
    results: list[subprocess.CompletedProcess[str]] = []
    threads = [
        threading.Thread(target=lambda i=i: results.append(fetch(tmp_path / f"m{i}", cache, env)))
        for i in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [r.returncode for r in results] == [0, 0], [r.stderr for r in results]
    logs = "".join(r.stderr for r in results)
    assert logs.count("fetched OPTION_MODEL_ID") == 1
    assert logs.count("cache hit: OPTION_MODEL_ID") == 1


@pytest.mark.parametrize(
    ("case", "fragment"),
    [
        ("missing object", "no objects under this prefix"),
        ("no such bucket", "NoSuchBucket: no such bucket"),
        ("unknown access key", "InvalidAccessKeyId: the access key id is not known to S3"),
        ("wrong secret", "SignatureDoesNotMatch: the secret access key does not match"),
        ("denied", "AccessDenied: these credentials may not list or read it"),
        ("no credentials", "no AWS credentials: set spec.model.s3.credentialsSecretRef"),
    ],
)
def test_a_source_that_cannot_be_fetched_is_one_line_naming_it(
    bucket: Bucket, tmp_path: Path, case: str, fragment: str
) -> None:
    server = bucket.server
    model = {"missing object": f"s3://{BUCKET}/llama/absent", "no such bucket": "s3://no-bucket/llama"}.get(
        case, MODEL_URL
    )
    creds = {
        "unknown access key": Credentials("AKIAUNKNOWNKEY000000", "x" * 40),
        "wrong secret": Credentials(bucket.reader.access_key_id, "y" * 40),
        "denied": bucket.nobody,
        # AWS answers AccessDenied for a bucket the policy does not name, whether or not it exists.
        "no such bucket": server.admin,
    }.get(case, bucket.reader)
    env = server.env(creds)
    if case == "no credentials":
        env = {"AWS_ENDPOINT_URL": server.endpoint, "AWS_DEFAULT_REGION": "us-east-1"}
        env |= {"AWS_CONFIG_FILE": "/dev/null", "AWS_SHARED_CREDENTIALS_FILE": "/dev/null"}
        env |= {"AWS_EC2_METADATA_DISABLED": "true"}
    result = fetch(tmp_path / "m", tmp_path / "cache", env, model=model)
    assert result.returncode == EXIT_DOWNLOAD_FAILED, result.stderr
    line = error_line(result)
    assert line.startswith(f"lmi-runtime: error: download failed: OPTION_MODEL_ID={model}: ")
    assert fragment in line
    # Nothing half-fetched is left for the next attempt to trust.
    assert not list((tmp_path / "cache").rglob(model_store.COMPLETE_MARKER))


def test_a_download_without_progress_ends_with_a_stall_error(tmp_path: Path) -> None:
    # An endpoint that accepts connections and never answers: the S3 client waits on its read.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        endpoint = f"http://127.0.0.1:{silent.getsockname()[1]}"
        env = {**Credentials("AKIAEXAMPLE000000000", "z" * 40).env(), "AWS_ENDPOINT_URL": endpoint}
        result = fetch(tmp_path / "m", tmp_path / "cache", env, LMI_DOWNLOAD_STALL_SECONDS="3")
    assert result.returncode == EXIT_DOWNLOAD_STALLED, result.stderr
    line = error_line(result)
    assert f"download stalled: OPTION_MODEL_ID={MODEL_URL}: no progress for 3s" in line
    assert "spec.startup.downloadStallSeconds" in line


def test_paths_and_streamed_models_are_not_fetched(tmp_path: Path) -> None:
    streamed = load_settings(tmp_path, {"OPTION_MODEL_ID": MODEL_URL, "OPTION_LOAD_FORMAT": "runai_streamer"})
    assert model_store.sources(streamed, {}) == []
    assert model_store.sources(load_settings(tmp_path, {"OPTION_MODEL_ID": "/models/x"}), {}) == []
    hub = load_settings(tmp_path, {"HF_MODEL_ID": "org/name", "HF_REVISION": "v1"})
    assert model_store.sources(hub, {}) == [Source("org/name", "HF_MODEL_ID", "v1")]
    # Offline, the hub cache is all there is: nothing to download (vLLM reads the cache).
    assert model_store.sources(hub, {"HF_HUB_OFFLINE": "1"}) == []


def test_hub_downloads_take_one_weight_format_and_skip_original_checkpoints() -> None:
    files = [
        "config.json",
        "tokenizer.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "pytorch_model.bin",
        "original/consolidated.00.pth",
        "original/params.json",
    ]
    assert hub_patterns(files) == [
        "config.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "tokenizer.json",
    ]
    assert hub_patterns(["config.json", "pytorch_model.bin"]) == ["config.json", "pytorch_model.bin"]


def test_the_compile_cache_key_changes_with_what_invalidates_an_artefact(tmp_path: Path) -> None:
    args = {"tensor_parallel_size": 1, "dtype": "bfloat16", "quantization": None, "revision": "r1"}
    base = compile_cache.key_inputs(args, MODEL_URL, "NVIDIA H200")
    key = compile_cache.cache_key(base)
    assert compile_cache.cache_key(dict(base)) == key
    for change in (
        {"tensor_parallel_size": 2},
        {"pipeline_parallel_size": 2},
        {"dtype": "float16"},
        {"quantization": "fp8"},
        {"revision": "r2"},
        {"model": "s3://models/other"},
        {"device": "NVIDIA H100 80GB HBM3"},
        {"vllm": "0.0.1"},
    ):
        assert compile_cache.cache_key(base | change) != key, change
    folder = compile_cache.prepare(tmp_path, args, MODEL_URL)
    assert folder.parent == tmp_path / "vllm"
    assert json.loads((folder / compile_cache.KEY_FILE).read_text())["model"] == MODEL_URL
    assert compile_cache.prepare(tmp_path, args, MODEL_URL) == folder
