"""The guide's rolling-batch configuration, from environment variables only, on real vLLM (CPU)."""

from __future__ import annotations

import pytest

from tests.runtime.conftest import RuntimeServer

pytestmark = pytest.mark.vllm


def test_env_only_rolling_batch_server_serves_lmi_and_openai(rolling_server: RuntimeServer) -> None:
    with rolling_server.client() as client:
        ping = client.get("/ping")
        lmi = client.post("/invocations", json={"inputs": "the model", "parameters": {"max_new_tokens": 4}})
        chat = client.post(
            "/v1/chat/completions",
            json={"model": "lmi", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
        )
    assert ping.json() == {"lmi": {"status": "Healthy"}}
    assert isinstance(lmi.json()["generated_text"], str)
    assert chat.status_code == 200


def test_lora_off_answers_400(rolling_server: RuntimeServer) -> None:
    with rolling_server.client() as client:
        listing = client.get("/adapters")
        register = client.post("/models/lmi/adapters", params={"name": "a", "src": "/tmp"})
        chosen = client.post(
            "/invocations",
            json={"inputs": "x"},
            headers={"X-Amzn-SageMaker-Adapter-Identifier": "a"},
        )
    for response in (listing, register, chosen):
        assert response.status_code == 400
        assert response.json()["error"].endswith("LoRA is not enabled.")
