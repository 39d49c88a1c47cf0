"""LMI's request and response schema <-> vLLM's OpenAI completion protocol. Pure functions.

An LMI request {"inputs", "parameters", "stream"} becomes a completion request; the completion
response becomes {"generated_text", "details"?}; a completion stream becomes LMI's JSON lines, one
token per line, the last line carrying generated_text.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

COMPLETION = "completion"
LMI = "lmi"
CHAT = "chat"
DEFAULT_MAX_NEW_TOKENS = 30

TokenText = Callable[[int], str]


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
    if stream:
        completion["logprobs"] = 1
        completion["return_tokens_as_token_ids"] = True
        completion["stream_options"] = {"include_usage": True, "continuous_usage_stats": True}
        include_prompt = bool(completion.pop("echo"))
    details = bool(parameters.pop("details", False))
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


def to_lmi_stream_lines(
    chunk: str, request: LmiRequest, state: StreamState, token_text: TokenText
) -> list[dict[str, Any]]:
    """One completion stream event -> LMI's JSON lines (one per generated token)."""
    payload = sse_payload(chunk)
    if payload is None or state.done:
        return []
    event = json.loads(payload)
    if "error" in event:
        state.done = True
        error = event["error"]
        message = error.get("message", str(error)) if isinstance(error, dict) else str(error)
        code = error.get("code", 500) if isinstance(error, dict) else 500
        return [{"code": code, "error": message}]
    if not event.get("choices"):
        return []  # the usage-only event before [DONE]
    choice = event["choices"][0]
    logprobs = choice.get("logprobs") or {}
    ids = [_token_id(token) for token in logprobs.get("tokens") or []]
    values = logprobs.get("token_logprobs") or [None] * len(ids)
    state.text += choice.get("text", "")
    if ids:
        lines = [
            {
                "index": choice.get("index", 0),
                "token": {"id": i, "text": token_text(i), "logprob": v},
                "generated_text": None,
                "details": None,
            }
            for i, v in zip(ids, values, strict=False)
        ]
    else:
        lines = [
            {
                "index": choice.get("index", 0),
                "token": {"id": None, "text": choice.get("text", ""), "logprob": None},
                "generated_text": None,
                "details": None,
            }
        ]
    finish = choice.get("finish_reason")
    if finish is not None:
        state.done = True
        last = lines[-1]
        last["generated_text"] = (request.prompt if request.include_prompt else "") + state.text
        if request.details:
            usage = event.get("usage") or {}
            last["details"] = {
                "finish_reason": finish,
                "seed": request.completion.get("seed"),
                "generated_tokens": usage.get("completion_tokens"),
                "input_length": usage.get("prompt_tokens"),
            }
    return lines


def error_body(code: int, message: str) -> dict[str, Any]:
    """LMI's error body."""
    return {"code": code, "error": message}
