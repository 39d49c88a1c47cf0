"""`lmi-runtime serve`: vLLM's own OpenAI application and async engine, plus LMI's routes.

Start-up order: resolve the configuration and import model.py (errors stop here, before any weight
is loaded); bind the port and answer /ping with 503 from a small loading server; start the engine
with vLLM's build_async_engine_client; build vLLM's app (build_app + init_app_state, the steps of
vLLM's build_and_serve) and put LMI's routes in front of vLLM's /ping and /invocations; load the
adapters (the folders under <model dir>/adapters, then the declared set: an adapter that fails is
reported on the management port, the model still serves); then serve the app on the same socket,
and the management port (admin_server) on its own.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import inspect
import json
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import uvicorn
from fastapi import APIRouter, FastAPI, Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from lmi_runtime import compile_cache, model_store
from lmi_runtime.adapter_set import DeclaredAdapters
from lmi_runtime.adapter_sources import declared_adapters
from lmi_runtime.adapters import AdapterError, AdapterRegistry, check_declared, preload_dirs
from lmi_runtime.admin_server import admin_app, admin_server, admin_settings
from lmi_runtime.engine_args import ResolvedConfig, resolve
from lmi_runtime.errors import RuntimeConfigError
from lmi_runtime.handler import Handle, RuntimeServices, call_handler, load_handler, set_runtime
from lmi_runtime.lmi_schema import (
    COMPLETION,
    LMI,
    LmiRequest,
    ResponseFormat,
    StreamState,
    encode_line,
    error_body,
    route_of,
    sse_payload,
    to_completion,
    to_lmi_response,
    to_lmi_stream_lines,
)
from lmi_runtime.options import ADAPTER_ROUTES_ENV, CACHE_ENV, STARTUP_PATH
from lmi_runtime.properties import load_settings
from lmi_runtime.server_setup import (
    max_header_count,
    raise_open_files_limit,
    ssl_refresher,
    tls_options,
    uvicorn_options,
    validate_server_args,
)
from lmi_runtime.startup_phases import StartupPhases
from lmi_runtime.vllm_compat import vllm_attr

logger = logging.getLogger(__name__)

ADAPTER_HEADER = "x-amzn-sagemaker-adapter-identifier"
_ADAPTER_HEADER_BYTES = ADAPTER_HEADER.encode("latin-1")
OPENAI_GENERATION_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Asgi = Callable[[Scope, Receive, Send], Awaitable[None]]


def _error(code: int, message: str) -> JSONResponse:
    return JSONResponse(error_body(code, message), status_code=code)


def _vllm_error(result: Any) -> JSONResponse | None:
    """LMI's error answer for a vLLM ErrorResponse (nested since 0.32, flat before)."""
    error = getattr(result, "error", None)
    if error is None:
        return None
    detail = error if hasattr(error, "message") else result
    return _error(int(getattr(detail, "code", 500)), str(getattr(detail, "message", error)))


def bind_socket(host: str, port: int) -> socket.socket:
    """Listen before the engine loads, so /ping can answer while it does."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise RuntimeConfigError(f"cannot listen on {host}:{port}: {error.strerror}") from error
    sock.listen(socket.SOMAXCONN)
    return sock


def _loading_app(model_name: str, phases: StartupPhases) -> Asgi:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        if scope["path"] == STARTUP_PATH:
            response = JSONResponse(phases.report())
        elif scope["path"] == "/ping":
            response = JSONResponse({model_name: {"status": "Loading"}}, status_code=503)
        else:
            response = _error(503, "the model is loading")
        await response(scope, receive, send)

    return app


class LoadingServer:
    """Answers 503 on the serving socket (a duplicate of it) while the engine starts.

    The engine start blocks the main event loop for most of its duration, so this server runs in
    its own thread; connections that arrive while it hands over wait in the socket's backlog.
    """

    def __init__(
        self, sock: socket.socket, model_name: str, tls: dict[str, Any], phases: StartupPhases
    ) -> None:
        config = uvicorn.Config(
            _loading_app(model_name, phases), lifespan="off", log_config=None, access_log=False, **tls
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=lambda: asyncio.run(self._server.serve(sockets=[sock])), name="lmi-loading", daemon=True
        )

    def start(self) -> None:
        """Start answering."""
        self._thread.start()

    def stop(self) -> None:
        """Stop answering and release the duplicate socket."""
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout=30)


@dataclass
class LmiService:
    """LMI's routes over vLLM's serving objects."""

    config: ResolvedConfig
    handle: Handle | None
    engine: Any
    completion: Any
    chat: Any
    registry: AdapterRegistry
    tokenizer: Any
    phases: StartupPhases

    @property
    def model_name(self) -> str:
        """The name the model answers to (the first served model name)."""
        return self.config.served_model_names[0]

    def _token_text(self, token_id: int) -> str:
        return str(self.tokenizer.decode([token_id]))

    async def ping(self) -> Response:
        """LMI's health answer: 200 while the engine is healthy, 503 otherwise."""
        try:
            await self.engine.check_health()
        except Exception as error:
            logger.error("health check failed: %s", error)
            return JSONResponse({self.model_name: {"status": "Unhealthy"}}, status_code=503)
        return JSONResponse({self.model_name: {"status": "Healthy"}})

    async def startup(self) -> Response:
        """GET /startup: the start-up phases and how long each took (the operator's status reads it)."""
        return JSONResponse(self.phases.report())

    async def predict(self, model_name: str, request: Request) -> Response:
        """POST /predictions/{model}: /invocations for a named model."""
        known = [*self.config.served_model_names, self.config.model_dir.name]
        if model_name not in known:
            return _error(404, f"model {model_name} not found; known models: {known}")
        return await self.invoke(request)

    async def invoke(self, request: Request) -> Response:
        """POST /invocations: the custom handler, else routed by payload (prompt, inputs, messages)."""
        body = await request.body()
        if self.handle is not None:
            answer = await call_handler(self.handle, self.config.properties, dict(request.headers), body)
            if answer is not None:
                return answer
        try:
            payload = json.loads(body or b"null")
            route = route_of(payload)
            adapter = request.headers.get(ADAPTER_HEADER) or payload.pop("adapters", None)
            if adapter:
                payload["model"] = self.registry.resolve(str(adapter))
            else:
                payload.setdefault("model", self.model_name)
        except AdapterError as error:
            return _error(
                error.status if error.status == 400 else 424, f"Input parsing failed: {error.message}"
            )
        except ValueError as error:
            return _error(424, f"Input parsing failed: {error}")
        if route == LMI:
            return await self._lmi(payload, request)
        return await self._openai(route, payload, request)

    async def _openai(self, route: str, payload: dict[str, Any], request: Request) -> Response:
        request_class = vllm_attr("CompletionRequest" if route == COMPLETION else "ChatCompletionRequest")
        try:
            openai_request = request_class(**payload)
        except Exception as error:
            return _error(424, f"Input parsing failed: {error}")
        create = (
            self.completion.create_completion if route == COMPLETION else self.chat.create_chat_completion
        )
        result = await create(openai_request, request)
        failure = _vllm_error(result)
        if failure is not None:
            return failure
        if inspect.isasyncgen(result):
            framing = self.config.response_format
            return StreamingResponse(_openai_lines(result, framing), media_type=framing.stream_media_type)
        return Response(result.model_dump_json(), media_type="application/json")

    async def _lmi(self, payload: dict[str, Any], request: Request) -> Response:
        try:
            lmi_request = to_completion(payload, str(payload["model"]))
            completion_request = vllm_attr("CompletionRequest")(**lmi_request.completion)
        except Exception as error:
            return _error(424, f"Input parsing failed: {error}")
        result = await self.completion.create_completion(completion_request, request)
        failure = _vllm_error(result)
        if failure is not None:
            return failure
        framing = self.config.response_format
        if inspect.isasyncgen(result):
            return StreamingResponse(
                self._lmi_lines(result, lmi_request, framing), media_type=framing.stream_media_type
            )
        answer = to_lmi_response(result.model_dump(mode="json"), lmi_request, self._token_text)
        return JSONResponse([answer] if framing.tgi_compat else answer)

    async def _lmi_lines(self, events: Any, lmi_request: LmiRequest, framing: ResponseFormat) -> Any:
        state = StreamState()
        async for event in events:
            for line in to_lmi_stream_lines(event, lmi_request, state, self._token_text):
                yield framing.frame(encode_line(line))

    def _check_model(self, model_name: str | None) -> None:
        known = [*self.config.served_model_names, self.config.model_dir.name]
        if model_name is not None and model_name not in known:
            raise AdapterError(404, f"model {model_name} not found; known models: {known}")

    async def _adapter_call(self, model_name: str | None, action: Callable[[], Awaitable[Any]]) -> Response:
        try:
            self._check_model(model_name)
            return JSONResponse(await action())
        except AdapterError as error:
            return _error(error.status, error.message)

    async def list_adapters(self, model_name: str | None = None) -> Response:
        """GET /adapters: every registered adapter."""

        async def action() -> Any:
            return {"adapters": self.registry.list()}

        return await self._adapter_call(model_name, action)

    async def describe_adapter(self, adapter_name: str, model_name: str | None = None) -> Response:
        """GET /adapters/{name}."""

        async def action() -> Any:
            return self.registry.describe(adapter_name)

        return await self._adapter_call(model_name, action)

    async def register_adapter(
        self, name: str | None = None, src: str | None = None, model_name: str | None = None
    ) -> Response:
        """POST /adapters?name=&src=: load an adapter."""

        async def action() -> Any:
            await self.registry.register(name or "", src or "")
            return {"status": f"Adapter {name} registered"}

        return await self._adapter_call(model_name, action)

    async def update_adapter(
        self, adapter_name: str, src: str | None = None, model_name: str | None = None
    ) -> Response:
        """POST /adapters/{name}/update?src=: reload an adapter."""

        async def action() -> Any:
            await self.registry.update(adapter_name, src)
            return {"status": f"Adapter {adapter_name} updated"}

        return await self._adapter_call(model_name, action)

    async def delete_adapter(self, adapter_name: str, model_name: str | None = None) -> Response:
        """DELETE /adapters/{name}: unload an adapter."""

        async def action() -> Any:
            await self.registry.unregister(adapter_name)
            return {"status": f"Adapter {adapter_name} deleted"}

        return await self._adapter_call(model_name, action)


async def _openai_lines(events: Any, framing: ResponseFormat) -> Any:
    # LMI streams OpenAI answers on /invocations in its own framing (JSON lines unless sse is chosen).
    async for event in events:
        payload = sse_payload(event)
        if payload is not None:
            yield framing.frame(payload.encode())


def install_routes(app: FastAPI, service: LmiService, adapter_routes: bool) -> None:
    """Put LMI's routes in front of vLLM's (the first matching route wins); LMI's /adapters routes
    only with `adapter_routes` (whoever reaches the port could load any path)."""
    router = APIRouter()
    router.add_api_route("/ping", service.ping, methods=["GET", "POST"])
    router.add_api_route(STARTUP_PATH, service.startup, methods=["GET"])
    router.add_api_route("/invocations", service.invoke, methods=["POST"])
    router.add_api_route("/predictions/{model_name}", service.predict, methods=["POST"])
    for prefix in ("", "/models/{model_name}") if adapter_routes else ():
        router.add_api_route(prefix + "/adapters", service.list_adapters, methods=["GET"])
        router.add_api_route(prefix + "/adapters", service.register_adapter, methods=["POST"])
        router.add_api_route(prefix + "/adapters/{adapter_name}", service.describe_adapter, methods=["GET"])
        router.add_api_route(prefix + "/adapters/{adapter_name}", service.delete_adapter, methods=["DELETE"])
        router.add_api_route(
            prefix + "/adapters/{adapter_name}/update", service.update_adapter, methods=["POST"]
        )
    ours = {getattr(route, "path", None) for route in router.routes}
    app.router.routes[:] = [route for route in app.router.routes if getattr(route, "path", None) not in ours]
    app.router.routes[0:0] = router.routes
    app.openapi_schema = None


class AdapterRouting:
    """Lets the OpenAI routes pick an adapter by header or "adapters" field, as LMI's routes do.

    vLLM picks an adapter by the request's "model"; this rewrites the body before vLLM reads it.
    vLLM's middleware stack is sealed once its app is built, hence a wrapper around the app. It also
    refuses requests with more headers than --h11-max-header-count (see server_setup).
    """

    def __init__(self, app: Asgi, registry: AdapterRegistry, max_headers: int) -> None:
        self.app = app
        self.registry = registry
        self.max_headers = max_headers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Rewrite generation requests that name an adapter, then hand over to vLLM's app."""
        if scope["type"] == "http" and len(scope["headers"]) > self.max_headers:
            await _error(431, f"more than {self.max_headers} request headers")(scope, receive, send)
            return
        if (
            scope["type"] != "http"
            or scope["method"] != "POST"
            or scope["path"] not in OPENAI_GENERATION_PATHS
        ):
            await self.app(scope, receive, send)
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        # ASGI servers give header names in lower case.
        header = next((v.decode("latin-1") for k, v in scope["headers"] if k == _ADAPTER_HEADER_BYTES), None)
        # Parsed only when it may name an adapter (a "\u" escape could spell the key): every
        # request pays this, and the front end shares its core with the engine's busy loop.
        may_name = header is not None or b"adapters" in body or b"\\u" in body
        try:
            payload = json.loads(body) if may_name else None
        except ValueError:
            payload = None
        # Re-encoded only when it names an adapter: most requests pass through byte for byte.
        if isinstance(payload, dict) and (header is not None or "adapters" in payload):
            adapter = header or payload.pop("adapters", None)
            if adapter:
                try:
                    payload["model"] = self.registry.resolve(str(adapter))
                except AdapterError as error:
                    await _error(error.status, error.message)(scope, receive, send)
                    return
            body = json.dumps(payload).encode("utf-8")
            scope = dict(scope)
            scope["headers"] = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"] + [
                (b"content-length", str(len(body)).encode())
            ]
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


def _call_with_supported(function: Callable[..., Any], *args: Any, **optional: Any) -> Any:
    """Call a vLLM function, passing only the keyword arguments this vLLM version accepts."""
    accepted = inspect.signature(function).parameters
    return function(*args, **{key: value for key, value in optional.items() if key in accepted})


async def _build_vllm_app(engine: Any, namespace: argparse.Namespace) -> FastAPI:
    tasks = await engine.get_supported_tasks()
    app: FastAPI = _call_with_supported(
        vllm_attr("build_app"), namespace, supported_tasks=tasks, model_config=engine.model_config
    )
    await _call_with_supported(
        vllm_attr("init_app_state"), engine, app.state, namespace, supported_tasks=tasks
    )
    return app


class _Server(uvicorn.Server):
    """uvicorn's server without its signal capture.

    uvicorn re-raises a captured SIGTERM when serve() returns, which kills the process before the
    engine context exits and leaves vLLM's engine process orphaned; the runtime handles the signals.
    """

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """Leave signal handling to the runtime."""
        yield


def _interrupt_start_up(signum: int, frame: FrameType | None) -> None:
    # The engine start blocks the event loop; unwinding from here still shuts the engine down.
    raise KeyboardInterrupt(f"signal {signum}")


async def _watch_engine(engine: Any, server: uvicorn.Server, failed: list[bool]) -> None:
    while not server.should_exit:
        await asyncio.sleep(2)
        if engine.errored:
            logger.error("the vLLM engine died; stopping the server")
            failed.append(True)
            server.should_exit = True


@dataclass
class AdapterPlan:
    """The adapters to load at start-up and how they are managed afterwards."""

    folders: dict[str, Path]
    declared: dict[str, str]
    admin: tuple[socket.socket, Path] | None  # the management port's socket and public keys file
    lmi_routes: bool


async def _serve(
    config: ResolvedConfig,
    handle: Handle | None,
    plan: AdapterPlan,
    sock: socket.socket,
    phases: StartupPhases,
) -> int:
    started = time.monotonic()
    name = config.served_model_names[0]
    loading = LoadingServer(sock.dup(), name, tls_options(config.namespace), phases)
    loading.start()
    try:
        async with vllm_attr("build_async_engine_client")(config.namespace) as engine:
            app = await _build_vllm_app(engine, config.namespace)
            tokenizer = engine.get_tokenizer()
            if inspect.isawaitable(tokenizer):
                tokenizer = await tokenizer
            registry = AdapterRegistry(app.state.openai_serving_models, engine, config.enable_lora)
            for adapter, folder in plan.folders.items():
                await registry.register(adapter, str(folder))
            # Before ready: a replica takes traffic only once it has tried every declared adapter.
            declared = DeclaredAdapters(registry)
            await declared.converge(plan.declared)
            completion = getattr(app.state, "openai_serving_completion", None)
            chat = getattr(app.state, "openai_serving_chat", None)
            service = LmiService(config, handle, engine, completion, chat, registry, tokenizer, phases)
            install_routes(app, service, plan.lmi_routes)
            set_runtime(RuntimeServices(engine, completion, chat, name, config.properties))
            routing = AdapterRouting(app, registry, max_header_count(config.namespace))
            server_config = uvicorn.Config(routing, lifespan="on", **uvicorn_options(config.namespace))
            server_config.load()
            refresher = ssl_refresher(config.namespace, server_config)
            server = _Server(server_config)
            app.state.server = server
            loop = asyncio.get_running_loop()
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(signum, setattr, server, "should_exit", True)
            loading.stop()
            phases.ready()
            logger.info(
                "ready after %.1f s: serving %s; start-up phases (s): %s",
                time.monotonic() - started,
                name,
                json.dumps(phases.report()["seconds"]),
            )
            failed: list[bool] = []
            watchdog = asyncio.create_task(_watch_engine(engine, server, failed))
            admin = None
            if plan.admin is not None:
                admin = admin_server(admin_app(declared, plan.admin[1], config.enable_lora))
                admin_task = asyncio.create_task(admin.serve(sockets=[plan.admin[0]]))
            await server.serve(sockets=[sock])
            watchdog.cancel()
            if admin is not None:
                admin.should_exit = True
                await admin_task
            if refresher is not None:
                refresher.stop()
            return 1 if failed else 0
    except AdapterError as error:
        logger.error("adapter preloading failed: %s", error.message)
        return 1
    except KeyboardInterrupt:
        logger.info("stopped while starting")
        return 0
    except Exception:
        logger.exception("start-up failed")
        return 1
    finally:
        loading.stop()
        sock.close()
        if plan.admin is not None:
            plan.admin[0].close()


def serve(model_dir: Path, host: str, port: int) -> int:
    """Serve the model in `model_dir` until stopped; returns the exit status."""
    phases = StartupPhases()
    phases.watch_output()
    raw = load_settings(model_dir, os.environ)
    # Sources the init container did not fetch (serve run on its own) are fetched now.
    settings = model_store.localize(raw, os.environ, download=True, set_env=os.environ.__setitem__)
    config = resolve(settings, os.environ)
    if config.headless:
        # A worker of a multi-node group: its GPUs join the leader's engine; the leader serves HTTP.
        logger.info("a worker of a multi-node group: running vLLM headless, the leader serves")
        vllm_attr("run_headless")(config.namespace)
        return 0
    handle = load_handler(model_dir)
    folders = preload_dirs(model_dir, config.enable_lora)
    declared, origin = declared_adapters(os.environ)
    check_declared(declared, origin, folders, config.enable_lora)
    admin = admin_settings(os.environ)
    lmi_routes = os.environ.get(ADAPTER_ROUTES_ENV, "").strip().lower() == "true"
    if CACHE_ENV in os.environ:
        # Read by vLLM when the engine starts, not at import.
        model = raw.options.get("model_id") or raw.options.get("model")
        source = model.value if model else str(model_dir)
        cache = model_store.cache_dir(os.environ)
        os.environ["VLLM_CACHE_ROOT"] = str(compile_cache.prepare(cache, config.engine_args, source))
        logger.info("vLLM compile cache: %s", os.environ["VLLM_CACHE_ROOT"])
    config.namespace.host = host
    config.namespace.port = port
    validate_server_args(config.namespace)
    # vLLM's SageMaker layer would import <SAGEMAKER_MODEL_PATH>/model.py a second time with its own
    # (non-LMI) semantics; the runtime owns model.py, so point that layer at a folder without one.
    os.environ["SAGEMAKER_MODEL_PATH"] = str(Path(__file__).parent / "no-sagemaker-script")
    sock = bind_socket(host, port)
    plan = AdapterPlan(
        folders, declared, (bind_socket(host, admin[0]), admin[1]) if admin else None, lmi_routes
    )
    raise_open_files_limit()
    signal.signal(signal.SIGTERM, _interrupt_start_up)
    try:
        import uvloop

        return int(uvloop.run(_serve(config, handle, plan, sock, phases)))
    except ImportError:
        return asyncio.run(_serve(config, handle, plan, sock, phases))
