"""Custom handlers: <model dir>/model.py with `async def handle(inputs)`, as in LMI.

The handler is loaded before the engine starts, so a syntax or import error stops start-up at once
with the file and line. It is called for every LMI request (/invocations, /predictions/{model});
returning None falls back to the default handler; an exception answers 424.

A handler reaches the runtime's own engine through `get_runtime()` instead of building a second one.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import logging
import sys
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from starlette.responses import JSONResponse, Response, StreamingResponse

from djl_python.inputs import Input
from djl_python.outputs import Envelope, Output
from lmi_runtime.errors import HandlerLoadError
from lmi_runtime.lmi_schema import error_body
from lmi_runtime.options import HANDLER_FILE

logger = logging.getLogger(__name__)

Handle = Callable[[Input], Awaitable[Any]]


@dataclass(frozen=True)
class RuntimeServices:
    """The runtime's engine and vLLM serving objects, for custom handlers."""

    engine: Any  # vLLM EngineClient (AsyncLLM): generate(), get_tokenizer(), ...
    completion: Any  # vLLM OpenAIServingCompletion: await completion.create_completion(request)
    chat: Any  # vLLM OpenAIServingChat: await chat.create_chat_completion(request)
    model_name: str
    properties: Mapping[str, str] = field(default_factory=dict)


_runtime: list[RuntimeServices] = []


def get_runtime() -> RuntimeServices:
    """The running engine and serving objects (available once the server is ready)."""
    if not _runtime:
        raise RuntimeError("the lmi-runtime engine is not running (yet)")
    return _runtime[-1]


def set_runtime(services: RuntimeServices) -> None:
    """Publish the engine to handlers (called by the server once the engine is up)."""
    _runtime.append(services)


def load_handler(model_dir: Path) -> Handle | None:
    """Import <model dir>/model.py and return its `handle`, or None when there is none."""
    path = model_dir / HANDLER_FILE
    if not path.is_file():
        return None
    spec = importlib.util.spec_from_file_location("model", path)
    if spec is None or spec.loader is None:
        raise HandlerLoadError(f"{path}: cannot be imported")
    module = importlib.util.module_from_spec(spec)
    # As in LMI, model.py may import its sibling files.
    sys.path.insert(0, str(model_dir))
    try:
        spec.loader.exec_module(module)
    except SyntaxError as error:
        raise HandlerLoadError(f"{error.filename}:{error.lineno}: SyntaxError: {error.msg}") from error
    except Exception as error:
        frames = [frame for frame in traceback.extract_tb(error.__traceback__) if frame.filename == str(path)]
        line = frames[-1].lineno if frames else 0
        raise HandlerLoadError(f"{path}:{line}: {type(error).__name__}: {error}") from error
    handle = getattr(module, "handle", None)
    if handle is None:
        logger.warning("%s defines no handle(); using the default handler", path)
        return None
    if not inspect.iscoroutinefunction(handle):
        raise HandlerLoadError(f"{path}: handle must be defined with `async def handle(inputs)`")
    logger.info("custom handler loaded from %s", path)
    return handle  # type: ignore[no-any-return]


def _envelope(output: Output) -> dict[str, Any] | None:
    return next((value.fields for _, value in output.content if isinstance(value, Envelope)), None)


def _content_type(output: Output, default: str) -> str:
    return next((v for k, v in output.properties.items() if k.lower() == "content-type"), default)


def _error_response(code: int, message: str) -> Response:
    return JSONResponse(error_body(code, message), status_code=code)


def output_response(output: Output) -> Response:
    """An Output as an HTTP response (LMI's error body when it carries an error)."""
    fields = _envelope(output)
    if fields is None:
        body = b"".join(value for _, value in output.content)
        return Response(body, status_code=output.code, media_type=_content_type(output, "application/json"))
    if fields.get("error"):
        return _error_response(int(fields.get("code") or 424), str(fields["error"]))
    return Response(
        str(fields.get("data", "")),
        status_code=output.code,
        media_type=_content_type(output, "application/json"),
    )


def _error_line(code: int, message: str) -> bytes:
    return (json.dumps(error_body(code, message)) + "\n").encode("utf-8")


async def _stream_bytes(outputs: AsyncIterator[Output]) -> AsyncIterator[bytes]:
    try:
        async for output in outputs:
            fields = _envelope(output)
            if fields is None:
                for _, value in output.content:
                    yield value
                continue
            if fields.get("error"):
                yield _error_line(int(fields.get("code") or 424), str(fields["error"]))
                return
            yield str(fields.get("data", "")).encode("utf-8")
            if fields.get("last"):
                return
    except Exception as error:
        # The status line is already sent: the failure can only be reported in the stream.
        logger.exception("custom handler failed while streaming")
        yield _error_line(424, f"Custom handler failed: {error}")


def handler_response(result: Any) -> Response:
    """Whatever handle() returned (Output or async generator of Outputs) as an HTTP response."""
    if isinstance(result, Output):
        return output_response(result)
    if inspect.isasyncgen(result):
        outputs = cast(AsyncIterator[Output], result)
        return StreamingResponse(_stream_bytes(outputs), media_type="application/jsonlines")
    raise TypeError(f"handle returned {type(result).__name__}; expected an Output or an async generator")


async def call_handler(
    handle: Handle, properties: Mapping[str, str], headers: Mapping[str, str], body: bytes
) -> Response | None:
    """Run the custom handler on one request; None means "use the default handler"."""
    inputs = Input({**properties, **headers}, body)
    try:
        result = await handle(inputs)
        return None if result is None else handler_response(result)
    except Exception as error:
        logger.exception("custom handler failed")
        return _error_response(424, f"Custom handler failed: {error}")
