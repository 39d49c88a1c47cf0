"""Pure parts of the runtime: properties parsing, devices, the LMI schema mapping, djl_python."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from djl_python import Input, Output
from djl_python.async_utils import create_non_stream_output, handle_streaming_response
from djl_python.encode_decode import decode
from lmi_runtime.devices import max_tensor_parallel, visible_gpu_count
from lmi_runtime.handler import handler_response, output_response
from lmi_runtime.lmi_schema import (
    PayloadError,
    ResponseFormat,
    StreamState,
    encode_line,
    route_of,
    to_completion,
    to_lmi_response,
    to_lmi_stream_lines,
)
from lmi_runtime.properties import load_settings, parse_properties, settings_from_environment


def test_parse_properties_comments_separators_and_continuations() -> None:
    text = "# comment\n! also\nengine=Python\noption.model_id : /m\noption.x = a \\\n   b\n\n"
    assert parse_properties(text) == {"engine": "Python", "option.model_id": "/m", "option.x": "a b"}


def test_environment_conversion() -> None:
    options = settings_from_environment(
        {
            "OPTION_MAX_ROLLING_BATCH_SIZE": "8",
            "OPTION_ENTRYPOINT": "x",
            "OPTION_mixedCase": "1",
            "HF_MODEL_ID": "m",
            "OPTION_EMPTY": "",
        }
    )
    assert options["max_rolling_batch_size"].describe() == "OPTION_MAX_ROLLING_BATCH_SIZE=8"
    assert options["entrypoint"].value == "x"
    assert options["mixedcase"].value == "1"
    assert options["model_id"].describe() == "HF_MODEL_ID=m"
    assert "empty" not in options


def test_alias_labels_name_the_variable_the_person_set() -> None:
    options = settings_from_environment({"ENABLE_CUDA_GRAPHS": "true", "SM_NUM_GPUS": "4"})
    assert options["enforce_eager"].describe() == "ENABLE_CUDA_GRAPHS=false"
    assert options["tensor_parallel_degree"].describe() == "SM_NUM_GPUS=4"


def test_option_engine_is_top_level(tmp_path: Path) -> None:
    settings = load_settings(tmp_path, {"OPTION_ENGINE": "Python"})
    assert settings.top_level["engine"].value == "Python"
    assert "engine" not in settings.options


@given(st.integers(0, 16), st.integers(1, 8))
def test_max_tensor_parallel_is_at_least_one(gpus: int, pipeline: int) -> None:
    degree = max_tensor_parallel(gpus, pipeline)
    assert degree >= 1
    assert degree * pipeline <= max(gpus, pipeline)


def test_visible_gpu_count_sources() -> None:
    assert visible_gpu_count({"CUDA_VISIBLE_DEVICES": "-1"}, lambda: 8) == 0
    assert visible_gpu_count({"CUDA_VISIBLE_DEVICES": "2,3", "NVIDIA_VISIBLE_DEVICES": "all"}, lambda: 8) == 2
    assert visible_gpu_count({}, lambda: 3) == 3


def test_route_of_first_match_wins() -> None:
    assert route_of({"prompt": "a", "inputs": "b"}) == "completion"
    assert route_of({"inputs": "b", "messages": []}) == "lmi"
    assert route_of({"messages": []}) == "chat"
    with pytest.raises(PayloadError):
        route_of([1, 2])


def test_to_completion_maps_lmi_parameters() -> None:
    request = to_completion(
        {
            "inputs": "hi",
            "parameters": {
                "max_new_tokens": 5,
                "do_sample": False,
                "return_full_text": True,
                "details": True,
                "top_n_tokens": 2,
                "ignore_eos_token": True,
                "truncate": 10,
                "stop_sequences": ["x"],
                "seed": 7,
                "top_p": 0.9,
            },
        },
        "lmi",
    )
    assert request.completion == {
        "prompt": "hi",
        "model": "lmi",
        "max_tokens": 5,
        "echo": True,
        "n": 2,
        "ignore_eos": True,
        "stream": False,
        "truncate_prompt_tokens": 10,
        "stop": ["x"],
        "logprobs": 1,
        "return_tokens_as_token_ids": True,
        "temperature": 0.0,
        "seed": 7,
        "top_p": 0.9,
    }
    assert request.details and not request.include_prompt


def test_to_completion_defaults_and_stream() -> None:
    request = to_completion({"inputs": "hi", "stream": True, "parameters": {"return_full_text": True}}, "m")
    assert request.completion["max_tokens"] == 30
    assert "echo" not in request.completion and request.include_prompt
    # A plain stream asks for token ids only: no logprobs, no running usage (their cost is measured)
    assert request.completion["return_token_ids"] is True
    assert not {"logprobs", "return_tokens_as_token_ids", "stream_options"} & set(request.completion)
    detailed = to_completion({"inputs": "hi", "stream": True, "parameters": {"details": True}}, "m")
    assert detailed.completion["logprobs"] == 1 and detailed.completion["return_tokens_as_token_ids"]
    assert detailed.completion["stream_options"] == {"include_usage": True, "continuous_usage_stats": True}
    plain = to_completion({"inputs": "hi"}, "m")
    assert "return_token_ids" not in plain.completion and "logprobs" not in plain.completion
    with pytest.raises(PayloadError, match="must be a string"):
        to_completion({"inputs": 3}, "m")


def stream_event(text: str, ids: list[int], finish: str | None, logprobs: list[float] | None = None) -> str:
    """One vLLM completion stream event as the runtime asks for it (token ids; logprobs with details)."""
    choice: dict[str, object] = {"index": 0, "text": text, "finish_reason": finish, "token_ids": ids}
    if logprobs is not None:
        choice["logprobs"] = {"tokens": [f"token_id:{i}" for i in ids], "token_logprobs": logprobs}
    return "data: " + json.dumps({"choices": [choice], "usage": {"completion_tokens": 2, "prompt_tokens": 1}})


def test_lmi_response_and_stream() -> None:
    request = to_completion({"inputs": "p", "parameters": {"details": True}}, "m")
    response = {
        "choices": [
            {
                "text": "ab",
                "finish_reason": "length",
                "logprobs": {"tokens": ["token_id:5", "token_id:6"], "token_logprobs": [-1.0, -2.0]},
            }
        ],
        "usage": {"completion_tokens": 2},
    }
    text = {5: "a", 6: "b", 7: "c"}.__getitem__
    assert to_lmi_response(response, request, text) == {
        "generated_text": "ab",
        "details": {
            "finish_reason": "length",
            "generated_tokens": 2,
            "seed": None,
            "tokens": [{"id": 5, "text": "a", "logprob": -1.0}, {"id": 6, "text": "b", "logprob": -2.0}],
        },
    }
    stream = to_completion({"inputs": "p", "stream": True, "parameters": {"return_full_text": True}}, "m")
    state = StreamState()
    # One token a chunk: the chunk's text is the token's text (vLLM's incremental detokenizer).
    first = to_lmi_stream_lines(stream_event(" A", [5], None), stream, state, text)
    assert first == [
        {
            "index": 0,
            "token": {"id": 5, "text": " A", "logprob": None},
            "generated_text": None,
            "details": None,
        }
    ]
    # Several tokens a chunk (merged outputs): a line per token, each token decoded by itself.
    last = to_lmi_stream_lines(stream_event("bc", [6, 7], "length"), stream, state, text)
    assert [line["token"] for line in last] == [
        {"id": 6, "text": "b", "logprob": None},
        {"id": 7, "text": "c", "logprob": None},
    ]
    assert last[-1]["generated_text"] == "p Abc" and last[-1]["details"] is None
    assert to_lmi_stream_lines("data: [DONE]", stream, state, text) == []
    detailed = to_completion({"inputs": "p", "stream": True, "parameters": {"details": True}}, "m")
    lines = to_lmi_stream_lines(stream_event("a", [5], "stop", [-0.5]), detailed, StreamState(), text)
    assert lines[0]["token"] == {"id": 5, "text": "a", "logprob": -0.5}
    assert lines[0]["details"] == {
        "finish_reason": "stop",
        "seed": None,
        "generated_tokens": 2,
        "input_length": 1,
    }
    error = to_lmi_stream_lines(
        'data: {"error": {"message": "bad", "code": 400}}', stream, StreamState(), text
    )
    assert error == [{"code": 400, "error": "bad"}]


def test_response_format_frames_lines() -> None:
    line = {"token": {"id": 1, "text": "é", "logprob": None}, "generated_text": None}
    encoded = encode_line(line)
    assert json.loads(encoded) == line and "é".encode() in encoded  # UTF-8, not \\u escapes
    assert ResponseFormat().frame(b'{"a": 1}') == b'{"a": 1}\n'
    assert ResponseFormat().stream_media_type == "application/jsonlines"
    sse = ResponseFormat(stream="sse")
    assert sse.frame(b'{"a": 1}') == b'data: {"a": 1}\n\n'
    assert sse.stream_media_type == "text/event-stream"


def test_djl_python_input_and_decode() -> None:
    inputs = Input({"model_id": "m", "content-type": "application/json"}, b'{"inputs": "x"}')
    assert inputs.get_batches() == [inputs]
    assert inputs.get_property("Content-Type") == "application/json"
    assert decode(inputs, inputs.get_property("Content-Type")) == {"inputs": "x"}
    assert decode(Input({}, b"hello"), "text/plain") == {"inputs": ["hello"]}
    assert inputs.get_properties()["model_id"] == "m"


def test_non_stream_output_to_response() -> None:
    ok = output_response(create_non_stream_output({"generated_text": "x"}))
    assert ok.status_code == 200 and json.loads(bytes(ok.body)) == {"generated_text": "x"}
    failed = output_response(create_non_stream_output("", error="bad input", code=400))
    assert failed.status_code == 400 and json.loads(bytes(failed.body)) == {"code": 400, "error": "bad input"}
    plain = output_response(Output().error("nope"))
    assert plain.status_code == 424 and json.loads(bytes(plain.body))["error"] == "nope"
    with pytest.raises(TypeError):
        handler_response({"generated_text": "x"})


def test_streaming_helpers_produce_json_lines() -> None:
    async def words() -> AsyncIterator[str]:
        for word in ("a", "b", "END"):
            yield word

    def formatter(chunk: str) -> tuple[str, bool]:
        return json.dumps({"token": chunk}), chunk == "END"

    async def collect() -> bytes:
        response = handler_response(handle_streaming_response(words(), formatter))
        chunks = [chunk async for chunk in response.body_iterator]  # type: ignore[attr-defined]
        return b"".join(chunk if isinstance(chunk, bytes) else chunk.encode() for chunk in chunks)

    lines = asyncio.run(collect()).decode().splitlines()
    assert [json.loads(line)["token"] for line in lines] == ["a", "b", "END"]
