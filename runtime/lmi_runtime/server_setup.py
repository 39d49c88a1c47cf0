"""What `vllm serve` does around its app before and while it serves, done for the runtime's server.

vLLM's setup_server and build_and_serve bind their own socket and run their own uvicorn server. The
runtime binds earlier (to answer /ping while the engine loads) and wraps vLLM's app (adapter routing),
so it calls the same pieces of vLLM itself, found by vllm_compat in either vLLM layout:

- the open-files limit raised towards 65535 as vLLM's set_ulimit does (uvicorn drops connections at
  the default 1024), but up to the hard limit when that is lower: vLLM's asks for 65535 or nothing,
  and a container whose hard limit is 20000 (the lent H200's) kept 1024;
- the tool and reasoning parser plugins imported, then vLLM's validate_api_server_args;
- uvicorn given the serve arguments vLLM gives it: keep-alive (VLLM_HTTP_TIMEOUT_KEEP_ALIVE), the
  h11 event-size limit, SSL files, ciphers and client-certificate mode, log level, access log and
  log configuration; SSL files reloaded when they change (--enable-ssl-refresh);
- the header-count limit (--h11-max-header-count) enforced by the runtime's own ASGI wrapper: vLLM
  sets it on uvicorn's Config, which the installed uvicorn never reads, so `vllm serve` accepts it and
  ignores it;
- uvicorn's h11 protocol chosen when --h11-max-incomplete-event-size is set: uvicorn prefers httptools
  when it is installed (it is, with vLLM), and httptools ignores that limit, as it does under
  `vllm serve`. h11 is the slower parser, so it is only chosen when the limit is asked for.

The engine process start method stays vLLM's library default (fork; vLLM itself switches to spawn
when CUDA is already initialised, and always on CPU): see docs/runtime.md, "Engine process start".
"""

from __future__ import annotations

import argparse
import importlib
import resource
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lmi_runtime.errors import RuntimeConfigError
from lmi_runtime.vllm_compat import vllm_attr

# vLLM's default when --h11-max-header-count is not given (its launcher's constant).
DEFAULT_MAX_HEADER_COUNT = 256


OPEN_FILES_TARGET = 65535


def raise_open_files_limit() -> None:
    """Raise the soft RLIMIT_NOFILE to 65535, or to the hard limit when that is lower."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = OPEN_FILES_TARGET if hard == resource.RLIM_INFINITY else min(OPEN_FILES_TARGET, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def _plugin(namespace: argparse.Namespace, name: str, manager: str, method: str) -> None:
    path = getattr(namespace, name, None) or ""
    # vLLM imports a plugin only when its path is longer than 3 characters; so does the runtime.
    if len(path) <= 3:
        return
    if path.endswith(".py") and not Path(path).is_file():
        raise RuntimeConfigError(f"option.{name}={path}: no such file")
    importer: Callable[[str], None] = getattr(vllm_attr(manager), method)
    importer(path)


def _check_tls_files(namespace: argparse.Namespace) -> None:
    # uvicorn would only find a missing file after the engine has loaded; vLLM serves TLS only
    # when both the key and the certificate are given.
    for name in ("ssl_keyfile", "ssl_certfile", "ssl_ca_certs"):
        path = getattr(namespace, name, None)
        if path and not Path(path).is_file():
            raise RuntimeConfigError(f"option.{name}={path}: no such file")
    if bool(namespace.ssl_keyfile) != bool(namespace.ssl_certfile):
        given, missing = (
            ("ssl_keyfile", "ssl_certfile") if namespace.ssl_keyfile else ("ssl_certfile", "ssl_keyfile")
        )
        raise RuntimeConfigError(f"option.{given} is set without option.{missing}: TLS needs both")


def validate_server_args(namespace: argparse.Namespace) -> None:
    """Check the TLS files, import the parser plugins, then run vLLM's API-server argument checks."""
    _check_tls_files(namespace)
    _plugin(namespace, "tool_parser_plugin", "ToolParserManager", "import_tool_parser")
    _plugin(namespace, "reasoning_parser_plugin", "ReasoningParserManager", "import_reasoning_parser")
    try:
        vllm_attr("validate_api_server_args")(namespace)
    except KeyError as error:
        # vLLM raises KeyError("invalid tool call parser: x (chose from {...})").
        message = str(error.args[0]) if error.args else str(error)
        option = "option.tool_call_parser" if "tool" in message else "option.reasoning_parser"
        raise RuntimeConfigError(f"{option}: {message}") from error


def _keep_alive_s() -> int:
    envs = importlib.import_module("vllm.envs")
    return int(envs.VLLM_HTTP_TIMEOUT_KEEP_ALIVE)


def uvicorn_options(namespace: argparse.Namespace) -> dict[str, Any]:
    """uvicorn.Config keyword arguments from the serve arguments, as vLLM's build_and_serve passes them."""
    options: dict[str, Any] = {
        "timeout_keep_alive": _keep_alive_s(),
        "ssl_keyfile": namespace.ssl_keyfile,
        "ssl_certfile": namespace.ssl_certfile,
        "ssl_ca_certs": namespace.ssl_ca_certs,
        "ssl_cert_reqs": namespace.ssl_cert_reqs,
        "log_level": namespace.uvicorn_log_level,
        "access_log": not namespace.disable_uvicorn_access_log,
        "log_config": vllm_attr("get_uvicorn_log_config")(namespace),
    }
    if getattr(namespace, "ssl_ciphers", None):
        options["ssl_ciphers"] = namespace.ssl_ciphers
    event_size = getattr(namespace, "h11_max_incomplete_event_size", None)
    if event_size is not None and event_size != vllm_attr("H11_MAX_INCOMPLETE_EVENT_SIZE_DEFAULT"):
        options.update(http="h11", h11_max_incomplete_event_size=event_size)
    return options


def tls_options(namespace: argparse.Namespace) -> dict[str, Any]:
    """The SSL part of uvicorn_options: the loading server answers /ping over the same TLS."""
    return {key: value for key, value in uvicorn_options(namespace).items() if key.startswith("ssl_")}


def max_header_count(namespace: argparse.Namespace) -> int:
    """The most request headers the server accepts (--h11-max-header-count, vLLM's default 256)."""
    value = getattr(namespace, "h11_max_header_count", None)
    return int(value) if value is not None else DEFAULT_MAX_HEADER_COUNT


def ssl_refresher(namespace: argparse.Namespace, config: Any) -> Any | None:
    """vLLM's SSLCertRefresher over a loaded uvicorn Config when --enable-ssl-refresh is set."""
    if not getattr(namespace, "enable_ssl_refresh", False) or config.ssl is None:
        return None
    return vllm_attr("SSLCertRefresher")(
        ssl_context=config.ssl,
        key_path=config.ssl_keyfile,
        cert_path=config.ssl_certfile,
        ca_path=config.ssl_ca_certs,
    )
