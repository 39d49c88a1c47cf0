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


def test_lora_off_answers_400_and_lmis_adapter_routes_are_off_by_default(
    rolling_server: RuntimeServer,
) -> None:
    with rolling_server.client() as client:
        listing = client.get("/adapters")
        register = client.post("/models/lmi/adapters", params={"name": "a", "src": "/tmp"})
        chosen = client.post(
            "/invocations",
            json={"inputs": "x"},
            headers={"X-Amzn-SageMaker-Adapter-Identifier": "a"},
        )
    # Without LMI_ADAPTER_ROUTES=true nobody can load an adapter through the serving port.
    assert listing.status_code == 404 and register.status_code in (404, 405), (listing.text, register.text)
    assert chosen.status_code == 400
    assert chosen.json()["error"].endswith("LoRA is not enabled.")
