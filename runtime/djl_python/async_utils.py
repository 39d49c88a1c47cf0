"""LMI's output helpers for async handlers."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any

from djl_python.outputs import Output

logger = logging.getLogger(__name__)


def _create_output(
    data: str | dict[str, Any],
    last_chunk: bool,
    content_type: str,
    properties: dict[str, str] | None = None,
    error: str | None = None,
    code: int | None = None,
) -> Output:
    text = json.dumps(data, ensure_ascii=False) if isinstance(data, dict) else data
    fields: dict[str, Any] = {"data": text + "\n", "last": last_chunk}
    if error:
        fields["error"] = error
    if code:
        fields["code"] = code
    output = Output()
    output.add_property("Content-Type", content_type)
    for key, value in (properties or {}).items():
        output.add_property(key, value)
    output.add(Output.binary_encode(fields))
    return output


def create_non_stream_output(
    data: str | dict[str, Any],
    properties: dict[str, str] | None = None,
    error: str | None = None,
    code: int | None = None,
) -> Output:
    """A complete JSON response; with `error`, an LMI error answered with `code`."""
    return _create_output(data, True, "application/json", properties, error, code)


def create_stream_chunk_output(
    data: str | dict[str, Any], last_chunk: bool, error: str | None = None, code: int | None = None
) -> Output:
    """One JSON-lines chunk of a streaming response."""
    return _create_output(data, last_chunk, "application/jsonlines", error=error, code=code)


async def handle_streaming_response(
    response: AsyncIterator[str],
    stream_output_formatter: Callable[..., Any],
    accumulate_chunks: bool = False,
    **kwargs: Any,
) -> AsyncGenerator[Output, None]:
    """Turn the strings of `response` into streamed Outputs through `stream_output_formatter`.

    The formatter returns (data, last), or (data, last, history) with accumulate_chunks.
    """
    history: list[Any] = []
    async for chunk in response:
        try:
            if accumulate_chunks:
                data, last, history = stream_output_formatter(chunk, history=history, **kwargs)
            else:
                data, last = stream_output_formatter(chunk, **kwargs)
        except Exception as error:
            logger.exception("stream_output_formatter failed")
            yield create_stream_chunk_output("", True, error=str(error), code=424)
            return
        yield create_stream_chunk_output(data, last)
        if last:
            return
