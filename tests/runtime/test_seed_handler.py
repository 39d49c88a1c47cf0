"""The LMI guide's custom handler example, unchanged: it builds its own `vllm.LLM` on the first request.

It runs, but loads the model a second time (with vLLM's defaults: bf16 and torch.compile, where the
runtime's engine serves the test options); docs/runtime.md shows how to reach the runtime's engine
instead. Its own server, because this handler answers every LMI request.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.runtime.conftest import (
    RuntimeServer,
    TinyModel,
    async_mode_properties,
    serving,
    write_properties,
)

GUIDE_HANDLER = '''
from djl_python import Input, Output
from djl_python.encode_decode import decode
from djl_python.async_utils import create_non_stream_output
from vllm import LLM, SamplingParams

llm = None

async def handle(inputs: Input):
    """Custom async handler with simple vLLM generate"""
    global llm

    # Initialize LLM on first call
    if llm is None:
        properties = inputs.get_properties()
        model_id = properties.get("model_id", "gpt2")
        llm = LLM(model=model_id, tensor_parallel_size=1)

    # Parse input
    batch = inputs.get_batches()
    raw_request = batch[0]
    content_type = raw_request.get_property("Content-Type")
    decoded_payload = decode(raw_request, content_type)

    prompt = decoded_payload.get("inputs", "Hello")

    # Create sampling parameters
    sampling_params = SamplingParams(max_tokens=50, temperature=0.8)

    # Generate using simple LLM API
    outputs = llm.generate([prompt], sampling_params)

    # Get the generated text
    generated_text = outputs[0].outputs[0].text if outputs else "No output"

    # Return response
    return create_non_stream_output({"generated_text": generated_text})
'''

# The first request starts and compiles the handler's own engine: minutes on a loaded 2-core machine.
FIRST_REQUEST_TIMEOUT_S = 600


@pytest.fixture(scope="module")
def guide_server(
    tiny_model: TinyModel, vllm_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RuntimeServer]:
    """The guide's async-mode serving.properties with the guide's model.py as written."""
    model_dir = tmp_path_factory.mktemp("guide-handler-model-dir")
    write_properties(model_dir, async_mode_properties(tiny_model.path))
    (model_dir / "model.py").write_text(GUIDE_HANDLER, encoding="utf-8")
    with serving(model_dir, vllm_env, model_dir.parent / "guide-server.log") as server:
        yield server


def test_guide_handler_runs_unchanged_with_its_own_engine(guide_server: RuntimeServer) -> None:
    with httpx.Client(base_url=guide_server.url, timeout=FIRST_REQUEST_TIMEOUT_S) as client:
        answers = [client.post("/invocations", json={"inputs": text}) for text in ("the model", "again")]
        openai = {"model": "lmi", "prompt": "the model", "max_tokens": 3}
        completion = client.post("/v1/completions", json=openai)
    log = guide_server.log.read_text(errors="replace")
    for answer in answers:
        assert answer.status_code == 200, (answer.text, log[-4000:])
        body = answer.json()
        assert set(body) == {"generated_text"}, body
        assert isinstance(body["generated_text"], str) and body["generated_text"], body
    # One extra engine, built on the first call and reused; the runtime's own keeps serving OpenAI routes.
    assert log.count("Initializing a V1 LLM engine") == 2, log[-4000:]
    assert completion.status_code == 200, completion.text
    assert completion.json()["usage"]["completion_tokens"] == 3
