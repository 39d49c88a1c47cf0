"""Find vLLM's server building blocks in the installed vLLM, by what exists rather than by version.

vLLM 0.32 moved them from vllm.entrypoints.openai.api_server to vllm.entrypoints.launchers.*; both
layouts keep the same names and call chain.
"""

from __future__ import annotations

import importlib
from typing import Any

_LOCATIONS: dict[str, tuple[str, ...]] = {
    "FlexibleArgumentParser": ("vllm.utils.argparse_utils", "vllm.utils"),
    "make_arg_parser": ("vllm.entrypoints.launchers.cli_args", "vllm.entrypoints.openai.cli_args"),
    "validate_parsed_serve_args": (
        "vllm.entrypoints.launchers.cli_args",
        "vllm.entrypoints.openai.cli_args",
    ),
    "build_async_engine_client": (
        "vllm.entrypoints.launchers.api_server.entry",
        "vllm.entrypoints.openai.api_server",
    ),
    "build_app": ("vllm.entrypoints.launchers.app", "vllm.entrypoints.openai.api_server"),
    "init_app_state": (
        "vllm.entrypoints.launchers.api_server.app_state",
        "vllm.entrypoints.openai.api_server",
    ),
    "validate_api_server_args": (
        "vllm.entrypoints.launchers.launcher",
        "vllm.entrypoints.openai.api_server",
    ),
    "get_uvicorn_log_config": (
        "vllm.entrypoints.launchers.utils.server_utils",
        "vllm.entrypoints.serve.utils.server_utils",
    ),
    "SSLCertRefresher": ("vllm.entrypoints.launchers.utils.ssl", "vllm.entrypoints.serve.utils.ssl"),
    "H11_MAX_INCOMPLETE_EVENT_SIZE_DEFAULT": (
        "vllm.entrypoints.launchers.utils.constants",
        "vllm.entrypoints.serve.utils.constants",
    ),
    # A multi-node group's worker (multi_node): the engine's processes without an API server.
    "run_headless": ("vllm.entrypoints.cli.serve",),
    "ToolParserManager": ("vllm.tool_parsers",),
    "ReasoningParserManager": ("vllm.reasoning",),
    "CompletionRequest": ("vllm.entrypoints.openai.completion.protocol", "vllm.entrypoints.openai.protocol"),
    "ChatCompletionRequest": (
        "vllm.entrypoints.openai.chat_completion.protocol",
        "vllm.entrypoints.openai.protocol",
    ),
    "UnloadLoRAAdapterRequest": (
        "vllm.entrypoints.serve.lora.protocol",
        "vllm.entrypoints.openai.protocol",
        "vllm.entrypoints.openai.engine.protocol",
    ),
    "LoadLoRAAdapterRequest": (
        "vllm.entrypoints.serve.lora.protocol",
        "vllm.entrypoints.openai.protocol",
        "vllm.entrypoints.openai.engine.protocol",
    ),
}


def vllm_attr(name: str) -> Any:
    """The first of vLLM's known locations of `name` that exists in the installed vLLM."""
    for module_name in _LOCATIONS[name]:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        if hasattr(module, name):
            return getattr(module, name)
    raise ImportError(f"the installed vLLM has no {name} in {', '.join(_LOCATIONS[name])}")


def vllm_version() -> str:
    """The installed vLLM's version string."""
    import vllm

    return str(vllm.__version__)
