"""Runtime test fixtures: the tiny model (built once per session) and real `lmi-runtime serve` servers.

Each engine start costs about 25-60 s on this machine, so servers are module-scoped and only one
runs at a time (pytest finishes a module, and its fixtures, before the next).
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from lmi_operator.testing.tiny_model import build_adapter, build_model, vllm_cpu_env
from lmi_runtime.admin_auth import Signer

REPO_ROOT = Path(__file__).resolve().parents[2]
RUNTIME_SRC = REPO_ROOT / "runtime"
START_TIMEOUT_S = 240

# vLLM on this CPU crashes its worker on bf16 (AMX) kernels, so tests serve in float32.
TEST_OPTIONS = {"enforce_eager": "true", "max_model_len": "256", "dtype": "fp32"}


@dataclass(frozen=True)
class TinyModel:
    """The generated model folder and two LoRA adapters for it."""

    path: Path
    adapters: dict[str, Path]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    """A random-weight Llama (head_dim 32), its BPE tokenizer and two peft adapters."""
    root = tmp_path_factory.mktemp("tiny")
    build_model(root / "model")
    adapters = {name: root / "adapters" / name for name in ("a1", "a2")}
    for seed, path in enumerate(adapters.values(), start=1):
        build_adapter(root / "model", path, seed=seed)
    return TinyModel(root / "model", adapters)


@pytest.fixture(scope="session")
def vllm_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Environment for vLLM on CPU with every cache and temporary file in a test-owned folder."""
    return vllm_cpu_env(tmp_path_factory.mktemp("vllm-cache"), RUNTIME_SRC)


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def runtime_command(*args: str) -> list[str]:
    """`lmi-runtime ...` run with this interpreter."""
    return [sys.executable, "-m", "lmi_runtime", *args]


# Signs the tests' management requests as the operator would (lmi_runtime.admin_auth).
ADMIN_SIGNER = Signer()


@dataclass
class RuntimeServer:
    """A running `lmi-runtime serve` process."""

    process: subprocess.Popen[bytes]
    url: str
    log: Path
    tls_ca: Path | None = None  # the certificate a TLS server is verified with
    startup_s: float = 0.0
    pings_before_ready: list[tuple[int, dict[str, object]]] = field(default_factory=list)
    # GET /startup's answers while loading: the phase the server said it was in.
    phases_before_ready: list[str] = field(default_factory=list)
    admin_url: str = ""  # the management port, where the environment set one

    def client(self) -> httpx.Client:
        """An HTTP client for this server."""
        return httpx.Client(base_url=self.url, timeout=120, verify=self.verify())

    def verify(self) -> ssl.SSLContext | bool:
        """What httpx verifies this server's certificate with."""
        return ssl.create_default_context(cafile=str(self.tls_ca)) if self.tls_ca else True

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 30 s (only this process, by its id)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def start_server(
    model_dir: Path,
    env: Mapping[str, str],
    log: Path,
    tls_ca: Path | None = None,
    preexec_fn: Callable[[], None] | None = None,
) -> RuntimeServer:
    """Start `lmi-runtime serve` and wait until /ping answers 200, recording earlier answers.

    With `tls_ca` the server serves HTTPS with that (self-signed) certificate.
    """
    port = free_port()
    started = time.monotonic()
    with log.open("wb") as out:
        process = subprocess.Popen(
            runtime_command(
                "serve", "--model-dir", str(model_dir), "--port", str(port), "--host", "127.0.0.1"
            ),
            env=dict(env),
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=preexec_fn,
        )
    scheme = "https" if tls_ca else "http"
    server = RuntimeServer(process, f"{scheme}://127.0.0.1:{port}", log, tls_ca)
    if admin_port := env.get("LMI_ADMIN_PORT"):
        server.admin_url = f"http://127.0.0.1:{admin_port}"
    with httpx.Client(timeout=5, verify=server.verify()) as client:
        while time.monotonic() - started < START_TIMEOUT_S:
            if process.poll() is not None:
                raise AssertionError(f"server exited with {process.returncode}:\n{log.read_text()[-4000:]}")
            try:
                response = client.get(f"{server.url}/ping")
            except httpx.TransportError:
                time.sleep(0.5)
                continue
            if response.status_code == 200:
                server.startup_s = time.monotonic() - started
                return server
            server.pings_before_ready.append((response.status_code, response.json()))
            with contextlib.suppress(httpx.TransportError):
                server.phases_before_ready.append(str(client.get(f"{server.url}/startup").json()["phase"]))
            time.sleep(1)
    server.stop()
    raise AssertionError(f"server not ready after {START_TIMEOUT_S} s:\n{log.read_text()[-4000:]}")


@contextlib.contextmanager
def serving(
    model_dir: Path,
    env: Mapping[str, str],
    log: Path,
    tls_ca: Path | None = None,
    preexec_fn: Callable[[], None] | None = None,
) -> Iterator[RuntimeServer]:
    """A started server for `model_dir`, stopped on exit (what each server fixture yields)."""
    server = start_server(model_dir, env, log, tls_ca, preexec_fn)
    try:
        yield server
    finally:
        server.stop()


def write_properties(model_dir: Path, lines: Mapping[str, str]) -> None:
    """Write serving.properties (keys as given, e.g. "engine" or "option.model_id")."""
    model_dir.mkdir(parents=True, exist_ok=True)
    text = "".join(f"{key}={value}\n" for key, value in lines.items())
    (model_dir / "serving.properties").write_text(text, encoding="utf-8")


def async_mode_properties(model_id: Path, **options: str) -> dict[str, str]:
    """The guide's async-mode serving.properties for `model_id`, with the test options and `options`."""
    return {
        "engine": "Python",
        "option.async_mode": "true",
        "option.rolling_batch": "disable",
        "option.entryPoint": "djl_python.lmi_vllm.vllm_async_service",
        "option.model_id": str(model_id),
        **{f"option.{key}": value for key, value in {**TEST_OPTIONS, **options}.items()},
    }


SEED_STYLE_HANDLER = '''
from djl_python import Input, Output
from djl_python.encode_decode import decode
from djl_python.async_utils import create_non_stream_output
from vllm import SamplingParams

from lmi_runtime.handler import get_runtime


async def handle(inputs: Input) -> Output:
    """The seed guide's handler, using the runtime's engine instead of building a second one."""
    batch = inputs.get_batches()
    raw_request = batch[0]
    content_type = raw_request.get_property("Content-Type")
    decoded_payload = decode(raw_request, content_type)
    mode = decoded_payload.get("custom")
    if mode is None:
        return None  # the default handler answers
    if mode == "fail":
        raise ValueError("the handler refused")
    prompt = decoded_payload.get("inputs", "Hello")
    sampling_params = SamplingParams(max_tokens=5, temperature=0.0)
    final = None
    async for output in get_runtime().engine.generate(prompt, sampling_params, request_id="custom-" + prompt):
        final = output
    generated_text = final.outputs[0].text if final else "No output"
    properties = inputs.get_properties()
    return create_non_stream_output(
        {"generated_text": generated_text, "model_id": properties.get("model_id"), "custom": True}
    )
'''


@pytest.fixture(scope="module")
def async_server(
    tiny_model: TinyModel, vllm_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RuntimeServer]:
    """The guide's async-mode serving.properties, with LoRA, a preloaded adapter and a model.py; LMI's
    adapter routes on, and the management port (requests signed by ADMIN_SIGNER)."""
    model_dir = tmp_path_factory.mktemp("async-model-dir")
    write_properties(
        model_dir,
        async_mode_properties(
            tiny_model.path, tensor_parallel_degree="max", enable_lora="true", max_lora_rank="8"
        ),
    )
    shutil.copytree(tiny_model.adapters["a1"], model_dir / "adapters" / "a1")
    (model_dir / "model.py").write_text(SEED_STYLE_HANDLER, encoding="utf-8")
    keys = model_dir.parent / "admin.pub"
    keys.write_text(ADMIN_SIGNER.public_key + "\n", encoding="utf-8")
    env = {
        **vllm_env,
        "LMI_ADAPTER_ROUTES": "true",
        "LMI_ADMIN_PORT": str(free_port()),
        "LMI_ADMIN_KEYS_FILE": str(keys),
    }
    with serving(model_dir, env, model_dir.parent / "async-server.log") as server:
        yield server


@pytest.fixture(scope="module")
def rolling_server(
    tiny_model: TinyModel, vllm_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RuntimeServer]:
    """The guide's rolling-batch configuration from environment variables only."""
    model_dir = tmp_path_factory.mktemp("env-only-model-dir")
    env = dict(vllm_env)
    env.update(
        HF_MODEL_ID=str(tiny_model.path),
        TENSOR_PARALLEL_DEGREE="max",
        OPTION_ROLLING_BATCH="vllm",
        OPTION_MAX_ROLLING_BATCH_SIZE="64",
        **{f"OPTION_{key.upper()}": value for key, value in TEST_OPTIONS.items()},
    )
    with serving(model_dir, env, model_dir.parent / "rolling-server.log") as server:
        yield server
