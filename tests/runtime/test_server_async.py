"""The guide's async-mode serving.properties on real vLLM (CPU): LMI, OpenAI, LoRA and model.py."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest

from lmi_operator.testing.tiny_model import build_adapter
from lmi_runtime.admin_auth import Signer
from tests.runtime.conftest import ADMIN_SIGNER, RuntimeServer, TinyModel

pytestmark = pytest.mark.vllm

ADAPTER_HEADER = "X-Amzn-SageMaker-Adapter-Identifier"
GREEDY = {"max_new_tokens": 8, "do_sample": False}


def lmi(
    client: httpx.Client, body: Mapping[str, Any], path: str = "/invocations", **kwargs: object
) -> httpx.Response:
    return client.post(path, json=body, **kwargs)  # type: ignore[arg-type]


def test_ping_is_503_while_loading_then_200(async_server: RuntimeServer) -> None:
    assert async_server.pings_before_ready, "the server never answered /ping while loading"
    assert all(code == 503 for code, _ in async_server.pings_before_ready)
    assert async_server.pings_before_ready[0][1] == {"lmi": {"status": "Loading"}}
    with async_server.client() as client:
        response = client.get("/ping")
    assert response.status_code == 200
    assert response.json() == {"lmi": {"status": "Healthy"}}


def test_startup_reports_each_phase_from_vllms_own_records(async_server: RuntimeServer) -> None:
    # While loading, the phases come in order (the poll may miss a short one).
    order = ["Starting", "LoadingWeights", "Compiling"]
    seen = [
        phase
        for i, phase in enumerate(async_server.phases_before_ready)
        if i == 0 or phase != async_server.phases_before_ready[i - 1]
    ]
    assert seen and seen[0] == "Starting" and set(seen) <= set(order)
    assert seen == sorted(seen, key=order.index)
    with async_server.client() as client:
        report = client.get("/startup").json()
    assert report["phase"] == "Ready"
    # Every phase closed, and they add up to about the time the test waited for /ping.
    assert list(report["seconds"]) == order
    assert all(seconds >= 0 for seconds in report["seconds"].values())
    assert abs(sum(report["seconds"].values()) - async_server.startup_s) < 10


def test_lmi_non_streaming(async_server: RuntimeServer) -> None:
    with async_server.client() as client:
        response = lmi(client, {"inputs": "the model", "parameters": GREEDY})
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"generated_text"}
    assert isinstance(body["generated_text"], str) and body["generated_text"]


def test_lmi_do_sample_false_is_repeatable(async_server: RuntimeServer) -> None:
    with async_server.client() as client:
        answers = {
            lmi(client, {"inputs": "a small cat", "parameters": GREEDY}).json()["generated_text"]
            for _ in range(3)
        }
    assert len(answers) == 1


def test_lmi_details_and_return_full_text(async_server: RuntimeServer) -> None:
    with async_server.client() as client:
        plain = lmi(client, {"inputs": "the model", "parameters": GREEDY}).json()["generated_text"]
        body = lmi(
            client,
            {"inputs": "the model", "parameters": {**GREEDY, "details": True, "return_full_text": True}},
        ).json()
    assert body["generated_text"] == "the model" + plain
    details = body["details"]
    assert details["finish_reason"] == "length"
    assert details["generated_tokens"] == 8
    assert len(details["tokens"]) == 8
    assert "".join(token["text"] for token in details["tokens"]) == plain
    assert all(isinstance(token["id"], int) and token["logprob"] <= 0 for token in details["tokens"])


def test_lmi_streaming_json_lines(async_server: RuntimeServer) -> None:
    with async_server.client() as client:
        plain = lmi(client, {"inputs": "the model", "parameters": GREEDY}).json()["generated_text"]
        with client.stream(
            "POST", "/invocations", json={"inputs": "the model", "stream": True, "parameters": GREEDY}
        ) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("application/jsonlines")
            lines = [json.loads(line) for line in response.iter_lines() if line]
    assert len(lines) == 8
    assert all(line["generated_text"] is None for line in lines[:-1])
    assert lines[-1]["generated_text"] == plain
    assert "".join(line["token"]["text"] for line in lines) == plain
    assert all(isinstance(line["token"]["id"], int) for line in lines)


def test_predictions_route_and_unknown_model(async_server: RuntimeServer) -> None:
    with async_server.client() as client:
        assert (
            lmi(client, {"inputs": "the model", "parameters": GREEDY}, "/predictions/lmi").status_code == 200
        )
        missing = lmi(client, {"inputs": "the model"}, "/predictions/nope")
    assert missing.status_code == 404
    assert "nope" in missing.json()["error"]


def test_bad_payload_is_424(async_server: RuntimeServer) -> None:
    with async_server.client() as client:
        response = lmi(client, {"text": "no known field"})
    assert response.status_code == 424
    assert response.json() == {
        "code": 424,
        "error": "Input parsing failed: invalid payload. must contain prompt, inputs, or messages",
    }


def test_openai_completion_and_chat(async_server: RuntimeServer) -> None:
    with async_server.client() as client:
        completion = client.post(
            "/v1/completions", json={"model": "lmi", "prompt": "the model", "max_tokens": 4}
        )
        chat = client.post(
            "/v1/chat/completions",
            json={"model": "lmi", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
        )
        routed = lmi(client, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
        prompt_routed = lmi(client, {"prompt": "the model", "max_tokens": 4})
        models = client.get("/v1/models").json()
        metrics = client.get("/metrics")
    assert completion.status_code == 200 and completion.json()["object"] == "text_completion"
    assert chat.status_code == 200 and chat.json()["choices"][0]["message"]["role"] == "assistant"
    assert routed.json()["object"] == "chat.completion"
    assert prompt_routed.json()["object"] == "text_completion"
    assert {"lmi", "a1"} <= {model["id"] for model in models["data"]}
    assert "vllm:" in metrics.text


def test_lora_preloaded_by_header_and_body_differs_from_base(async_server: RuntimeServer) -> None:
    request = {"inputs": "the model", "parameters": GREEDY}
    with async_server.client() as client:
        base = lmi(client, request).json()["generated_text"]
        by_header = lmi(client, request, headers={ADAPTER_HEADER: "a1"}).json()["generated_text"]
        by_body = lmi(client, {**request, "adapters": "a1"}).json()["generated_text"]
        openai = client.post(
            "/v1/completions",
            json={"model": "lmi", "prompt": "the model", "max_tokens": 8, "temperature": 0},
            headers={ADAPTER_HEADER: "a1"},
        ).json()
        openai_body = client.post(
            "/v1/completions",
            json={"model": "lmi", "prompt": "the model", "max_tokens": 8, "temperature": 0, "adapters": "a1"},
        ).json()
        # The same key spelled with a JSON escape: the runtime's byte-level shortcut must not miss it.
        escaped = client.post(
            "/v1/completions",
            content=b'{"model": "lmi", "prompt": "the model", "max_tokens": 8, "temperature": 0, '
            b'"\\u0061dapters": "a1"}',
            headers={"content-type": "application/json"},
        ).json()
    assert by_header == by_body != base
    assert openai["model"] == "a1" and openai["choices"][0]["text"] == by_header
    assert openai_body["choices"][0]["text"] == by_header
    assert escaped["model"] == "a1" and escaped["choices"][0]["text"] == by_header


def test_unknown_adapter_lists_known_ones(async_server: RuntimeServer) -> None:
    with async_server.client() as client:
        lmi_answer = lmi(client, {"inputs": "x", "adapters": "nope"})
        openai_answer = client.post(
            "/v1/completions", json={"model": "lmi", "prompt": "x"}, headers={ADAPTER_HEADER: "nope"}
        )
    assert lmi_answer.status_code == 424
    assert "nope not found" in lmi_answer.json()["error"] and "['a1']" in lmi_answer.json()["error"]
    assert openai_answer.status_code == 404
    assert "['a1']" in openai_answer.json()["error"]


def test_adapter_management_api(async_server: RuntimeServer, tiny_model: TinyModel) -> None:
    src = str(tiny_model.adapters["a2"])
    request = {"inputs": "the model", "parameters": GREEDY}
    with async_server.client() as client:
        base = lmi(client, request).json()["generated_text"]
        registered = client.post("/models/lmi/adapters", params={"name": "a2", "src": src})
        assert registered.status_code == 200, registered.text
        assert registered.json() == {"status": "Adapter a2 registered"}
        assert client.get("/models/lmi/adapters/a2").json() == {"name": "a2", "src": src}
        assert [a["name"] for a in client.get("/adapters").json()["adapters"]] == ["a1", "a2"]
        with_a2 = lmi(client, request, headers={ADAPTER_HEADER: "a2"}).json()["generated_text"]
        assert with_a2 != base
        assert client.post("/adapters/a2/update").json() == {"status": "Adapter a2 updated"}
        assert lmi(client, request, headers={ADAPTER_HEADER: "a2"}).json()["generated_text"] == with_a2
        duplicate = client.post("/adapters", params={"name": "a2", "src": src})
        assert duplicate.status_code == 409
        deleted = client.delete("/models/lmi/adapters/a2")
        assert deleted.json() == {"status": "Adapter a2 deleted"}
        assert client.get("/adapters/a2").status_code == 404
        after = lmi(client, request, headers={ADAPTER_HEADER: "a2"})
        bad_src = client.post("/adapters", params={"name": "a3", "src": "/no/such/adapter"})
    assert after.status_code == 424
    assert bad_src.status_code >= 400


def test_custom_handler_answers_with_runtime_engine(
    async_server: RuntimeServer, tiny_model: TinyModel
) -> None:
    with async_server.client() as client:
        response = lmi(client, {"inputs": "the model", "custom": "yes"})
        default = lmi(
            client, {"inputs": "the model", "parameters": {"max_new_tokens": 5, "do_sample": False}}
        )
    assert response.status_code == 200
    body = response.json()
    assert body["custom"] is True
    assert body["model_id"] == str(tiny_model.path)
    # The handler and the default path share one engine: the same greedy text.
    assert body["generated_text"] == default.json()["generated_text"]


def test_custom_handler_none_falls_back_and_exception_is_424(async_server: RuntimeServer) -> None:
    with async_server.client() as client:
        fallback = lmi(client, {"inputs": "the model", "parameters": GREEDY})
        failed = lmi(client, {"inputs": "the model", "custom": "fail"})
    assert set(fallback.json()) == {"generated_text"}
    assert failed.status_code == 424
    assert failed.json() == {"code": 424, "error": "Custom handler failed: the handler refused"}


def signed_put(admin: httpx.Client, adapters: object) -> httpx.Response:
    """PUT /lmi/adapters signed as the operator signs it (what one side writes, the other reads)."""
    body = json.dumps({"adapters": adapters}).encode()
    auth = ADMIN_SIGNER.authorization("PUT", "/lmi/adapters", body)
    return admin.put("/lmi/adapters", content=body, headers={"Authorization": auth})


def signed_get(admin: httpx.Client) -> httpx.Response:
    """GET /lmi/adapters, signed."""
    return admin.get(
        "/lmi/adapters", headers={"Authorization": ADMIN_SIGNER.authorization("GET", "/lmi/adapters", b"")}
    )


def test_the_management_port_converges_declared_adapters_and_names_each_failure(
    async_server: RuntimeServer, tiny_model: TinyModel, tmp_path: Path
) -> None:
    rank16 = tmp_path / "rank16"
    build_adapter(tiny_model.path, rank16, seed=3, rank=16)
    a1, a2 = str(tiny_model.adapters["a1"]), str(tiny_model.adapters["a2"])
    request = {"inputs": "the model", "parameters": GREEDY}

    def states(answer: httpx.Response) -> dict[str, tuple[str, str]]:
        assert answer.status_code == 200, answer.text
        return {a["name"]: (a["state"], a["reason"]) for a in answer.json()["adapters"]}

    with httpx.Client(base_url=async_server.admin_url, timeout=120) as admin, async_server.client() as client:
        # Only requests the operator's key signed, recently, for this very body; the serving port
        # has no such route.
        assert admin.get("/lmi/adapters").status_code == 401
        other = Signer().authorization("GET", "/lmi/adapters", b"")
        assert admin.get("/lmi/adapters", headers={"Authorization": other}).status_code == 401
        stale = ADMIN_SIGNER.authorization("GET", "/lmi/adapters", b"", now=time.time() - 3600)
        assert admin.get("/lmi/adapters", headers={"Authorization": stale}).status_code == 401
        signed_for_empty = ADMIN_SIGNER.authorization("PUT", "/lmi/adapters", b'{"adapters": {}}')
        tampered = admin.put(
            "/lmi/adapters",
            content=b'{"adapters": {"x": "/etc"}}',
            headers={"Authorization": signed_for_empty},
        )
        assert tampered.status_code == 401
        assert client.get("/lmi/adapters").status_code == 404
        bad = signed_put(admin, {"d1": 7})
        assert (
            bad.status_code == 400
            and "expected a JSON object of adapter name to source" in bad.json()["error"]
        )

        declared = {"d1": a1, "d2": a2, "missing": "/no/such/adapter", "wide": str(rank16)}
        assert states(signed_put(admin, declared)) == {
            "d1": ("Loaded", ""),
            "d2": ("Loaded", ""),
            "missing": ("Failed", "SourceMissing"),
            "wide": ("Failed", "RankTooLarge"),
        }
        failed = {a["name"]: a for a in signed_get(admin).json()["adapters"]}
        assert "greater than max_lora_rank 8" in failed["wide"]["message"], failed
        base = lmi(client, request).json()["generated_text"]
        with_a1 = lmi(client, {**request, "adapters": "d1"}).json()["generated_text"]
        with_a2 = lmi(client, {**request, "adapters": "d2"}).json()["generated_text"]
        assert len({base, with_a1, with_a2}) == 3
        assert lmi(client, {**request, "adapters": "a1"}).json()["generated_text"] == with_a1

        # A changed source is reloaded; a removed adapter is unloaded; the failed ones are retried.
        changed = {"d1": a2, "missing": "/no/such/adapter"}
        assert states(signed_put(admin, changed)) == {
            "d1": ("Loaded", ""),
            "missing": ("Failed", "SourceMissing"),
        }
        assert lmi(client, {**request, "adapters": "d1"}).json()["generated_text"] == with_a2
        assert lmi(client, {**request, "adapters": "d2"}).status_code == 424
        served = {m["id"] for m in client.get("/v1/models").json()["data"]}
        assert "d1" in served and "d2" not in served and "wide" not in served

        assert states(signed_put(admin, {})) == {}
        # The model folder's own adapter is not the management port's to remove.
        assert [a["name"] for a in client.get("/adapters").json()["adapters"]] == ["a1"]
