"""LMI's request and response schema <-> vLLM's OpenAI completion protocol. Pure functions.

An LMI request {"inputs", "parameters", "stream"} becomes a completion request; the completion
response becomes {"generated_text", "details"?}; a completion stream becomes LMI's token lines, one
token per line, the last line carrying generated_text, framed as JSON lines or server-sent events.

A stream asks vLLM for token ids only (`return_token_ids`). Per-token logprobs and usage in every
chunk are asked for only when the request sets `details`: measured on an H200 (vLLM 0.26, 8B, 128
concurrent streams), asking for them on every stream, as LMI's own vLLM service does, cost 30-45% of
the throughput of the single front-end process (docs/runtime.md, "Streaming"). Stream events are
read into msgspec Structs and lines written by msgspec rather than the json module: the conversion
runs once per generated token on the front end's one event loop: 3.0 us a token with msgspec against
12.3 us with the json module (bench/lmi_stream.py, both in one process on the 2-core CI machine).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec

COMPLETION = "completion"
LMI = "lmi"
CHAT = "chat"
DEFAULT_MAX_NEW_TOKENS = 30

TokenText = Callable[[int], str]

JSON = "application/json"
JSON_LINES = "application/jsonlines"
EVENT_STREAM = "text/event-stream"


@dataclass(frozen=True)
class ResponseFormat:
    """How answers on the LMI routes are framed: LMI's option.output_formatter and option.tgi_compat.

    `stream` is "jsonlines" (one JSON object a line, LMI's default) or "sse" (each line as a
    server-sent event "data: {...}"); `tgi_compat` also wraps a non-streamed LMI answer in a list,
    as Hugging Face TGI answers.
    """

    stream: str = "jsonlines"
    tgi_compat: bool = False

    @property
    def stream_media_type(self) -> str:
        """The Content-Type of a streamed answer."""
        return EVENT_STREAM if self.stream == "sse" else JSON_LINES

    def frame(self, data: bytes) -> bytes:
        """One JSON document as one line of a streamed answer."""
        return b"data: " + data + b"\n\n" if self.stream == "sse" else data + b"\n"


class PayloadError(ValueError):
    """The request body does not fit the LMI or OpenAI schema (LMI answers 424)."""


def route_of(payload: Any) -> str:
    """Which API a payload speaks, first match wins: prompt, inputs, messages."""
    if isinstance(payload, dict):
        for key, route in (("prompt", COMPLETION), ("inputs", LMI), ("messages", CHAT)):
            if key in payload:
                return route
    raise PayloadError("invalid payload. must contain prompt, inputs, or messages")


@dataclass(frozen=True)
class LmiRequest:
    """An LMI request translated to completion-request fields, plus how to shape the answer."""

    completion: dict[str, Any]
    details: bool
    include_prompt: bool  # prepend the prompt to a streamed generated_text (echo cannot stream)
    stream: bool
    prompt: str


def to_completion(payload: dict[str, Any], model: str) -> LmiRequest:
    """Translate an LMI payload to completion-request fields, as LMI's vLLM service does."""
    prompt = payload.get("inputs")
    if not isinstance(prompt, str):
        raise PayloadError('"inputs" must be a string')
    parameters = dict(payload.get("parameters") or {})
    if not isinstance(payload.get("parameters") or {}, dict):
        raise PayloadError('"parameters" must be an object')
    stream = bool(payload.get("stream", False))
    completion: dict[str, Any] = {
        "prompt": prompt,
        "model": model,
        "max_tokens": parameters.pop("max_new_tokens", DEFAULT_MAX_NEW_TOKENS),
        "echo": parameters.pop("return_full_text", False),
        "n": parameters.pop("top_n_tokens", 1),
        "ignore_eos": parameters.pop("ignore_eos_token", False),
        "stream": stream,
    }
    if "truncate" in parameters:
        completion["truncate_prompt_tokens"] = parameters.pop("truncate")
    if "stop_sequences" in parameters:
        completion["stop"] = parameters.pop("stop_sequences")
    include_prompt = False
    details = bool(parameters.pop("details", False))
    if stream:
        # Token ids come with every chunk at almost no cost; logprobs and running usage are only
        # worth their cost when the answer shows them (see the module docstring).
        completion["return_token_ids"] = True
        include_prompt = bool(completion.pop("echo"))
        if details:
            completion["stream_options"] = {"include_usage": True, "continuous_usage_stats": True}
    if details:
        completion["logprobs"] = 1
        completion["return_tokens_as_token_ids"] = True
        if parameters.pop("decoder_input_details", False):
            completion["prompt_logprobs"] = 1
    do_sample = parameters.pop("do_sample", None)
    if do_sample is not None and not do_sample:
        parameters["temperature"] = 0.0
    completion.update(parameters)
    return LmiRequest(completion, details, include_prompt, stream, prompt)


def _token_id(token: str) -> int:
    # return_tokens_as_token_ids makes vLLM write tokens as "token_id:<n>".
    return int(token.rsplit(":", 1)[1])


def to_lmi_response(response: dict[str, Any], request: LmiRequest, token_text: TokenText) -> dict[str, Any]:
    """A completion response (as a dict) -> {"generated_text", "details"?}."""
    choice = response["choices"][0]
    result: dict[str, Any] = {"generated_text": choice["text"]}
    if not request.details:
        return result
    tokens: list[dict[str, Any]] = []
    logprobs = choice.get("logprobs") or {}
    for token, logprob in zip(
        logprobs.get("tokens") or [], logprobs.get("token_logprobs") or [], strict=False
    ):
        token_id = _token_id(token)
        tokens.append({"id": token_id, "text": token_text(token_id), "logprob": logprob})
    generated = (response.get("usage") or {}).get("completion_tokens")
    if request.completion.get("echo") and isinstance(generated, int):
        # With return_full_text, vLLM's logprobs start with the prompt's tokens.
        tokens = tokens[len(tokens) - generated :]
    result["details"] = {
        "finish_reason": choice.get("finish_reason"),
        "generated_tokens": generated,
        "seed": request.completion.get("seed"),
        "tokens": tokens,
    }
    return result


@dataclass
class StreamState:
    """What a streamed LMI answer accumulates across chunks."""

    text: str = ""
    done: bool = False


def sse_payload(chunk: str) -> str | None:
    """The JSON text of one "data: ..." server-sent event; None for [DONE] or blank lines."""
    text = chunk.strip()
    text = text.removeprefix("data:").strip()
    return None if text in ("", "[DONE]") else text


class _Logprobs(msgspec.Struct):
    token_logprobs: list[float | None] = []


class _Choice(msgspec.Struct):
    text: str = ""
    index: int = 0
    token_ids: list[int] | None = None
    finish_reason: str | None = None
    logprobs: _Logprobs | None = None


class _Usage(msgspec.Struct):
    completion_tokens: int | None = None
    prompt_tokens: int | None = None


class _Event(msgspec.Struct):
    """The fields of a completion stream event the LMI lines use; the rest is skipped unread."""

    choices: list[_Choice] = []
    usage: _Usage | None = None
    error: Any = None


_read_event = msgspec.json.Decoder(_Event).decode
encode_line = msgspec.json.Encoder().encode


def to_lmi_stream_lines(
    chunk: str, request: LmiRequest, state: StreamState, token_text: TokenText
) -> list[dict[str, Any]]:
    """One completion stream event -> LMI's token lines (one per generated token), as dicts."""
    payload = sse_payload(chunk)
    if payload is None or state.done:
        return []
    event = _read_event(payload)
    if event.error is not None:
        state.done = True
        error = event.error
        message = error.get("message", str(error)) if isinstance(error, dict) else str(error)
        code = error.get("code", 500) if isinstance(error, dict) else 500
        return [{"code": code, "error": message}]
    if not event.choices:
        return []  # the usage-only event before [DONE]
    choice = event.choices[0]
    text = choice.text
    state.text += text
    ids = choice.token_ids or []
    values = choice.logprobs.token_logprobs if choice.logprobs else [None] * len(ids)
    tokens: list[dict[str, Any]]
    if len(ids) == 1:
        # The chunk's text is the token's text as vLLM's incremental detokenizer wrote it.
        tokens = [{"id": ids[0], "text": text, "logprob": values[0]}]
    elif ids:
        # Several tokens in one chunk (vLLM merges outputs a slow reader has not taken yet).
        tokens = [{"id": i, "text": token_text(i), "logprob": v} for i, v in zip(ids, values, strict=False)]
    else:
        tokens = [{"id": None, "text": text, "logprob": None}]
    lines: list[dict[str, Any]] = [
        {"index": choice.index, "token": token, "generated_text": None, "details": None} for token in tokens
    ]
    if choice.finish_reason is not None:
        state.done = True
        last = lines[-1]
        last["generated_text"] = (request.prompt if request.include_prompt else "") + state.text
        if request.details:
            usage = event.usage or _Usage()
            last["details"] = {
                "finish_reason": choice.finish_reason,
                "seed": request.completion.get("seed"),
                "generated_tokens": usage.completion_tokens,
                "input_length": usage.prompt_tokens,
            }
    return lines


def error_body(code: int, message: str) -> dict[str, Any]:
    """LMI's error body."""
    return {"code": code, "error": message}
