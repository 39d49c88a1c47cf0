"""lmi-runtime: `args` prints the resolved engine arguments, `fetch` downloads the model into the
cache (the pods' init container), or with --adapter one adapter (printing the path to load it from;
the server runs it when it loads an adapter), `serve` serves, `engine-args-table` prints the
installed vLLM's argument table, `inspect` prints the facts of the model the settings name (or of a
folder): sizes read from config.json and the safetensors headers, never the weights, for the
capacity estimate; the operator runs it as a Job. Logs go to stderr; configuration and download
errors are one line."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from lmi_runtime.errors import ERROR_PREFIX, DownloadError, HandlerLoadError, RuntimeConfigError
from lmi_runtime.options import MODEL_DIR, PORT

logger = logging.getLogger("lmi_runtime")

# What the kubelet reads of a termination message file (`inspect --message-file /dev/termination-log`).
MESSAGE_LIMIT = 4096


def _configure_logging() -> None:
    if logger.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(os.environ.get("LMI_RUNTIME_LOG_LEVEL", "INFO").upper())
    # Third-party imports reconfigure the root logger; ours keeps its own handler and level.
    logger.propagate = False


def argument_parser() -> argparse.ArgumentParser:
    """The command line `lmi-runtime` accepts (the container contract test parses pods' argv with it)."""
    parser = argparse.ArgumentParser(prog="lmi-runtime", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    args_cmd = commands.add_parser("args", help="print the resolved vLLM engine arguments as JSON")
    args_cmd.add_argument("--model-dir", default=MODEL_DIR, type=Path)
    fetch_cmd = commands.add_parser("fetch", help="download the model (or one adapter) into the cache")
    fetch_cmd.add_argument("--model-dir", default=MODEL_DIR, type=Path)
    fetch_cmd.add_argument("--adapter", metavar="SOURCE", help="fetch this adapter source only")
    fetch_cmd.add_argument("--label", default="adapter", help="what names the adapter in messages")
    serve_cmd = commands.add_parser("serve", help="serve the model over the LMI and OpenAI APIs")
    serve_cmd.add_argument("--model-dir", default=MODEL_DIR, type=Path)
    serve_cmd.add_argument("--port", default=PORT, type=int)
    serve_cmd.add_argument("--host", default="0.0.0.0")
    commands.add_parser("engine-args-table", help="print the installed vLLM's engine argument table")
    inspect_cmd = commands.add_parser(
        "inspect", help="print the model's sizes (a folder's, or the configured model's), without its weights"
    )
    inspect_cmd.add_argument(
        "path",
        nargs="?",
        type=Path,
        help="a folder with config.json and *.safetensors (default: the model the settings name)",
    )
    inspect_cmd.add_argument("--model-dir", default=MODEL_DIR, type=Path)
    inspect_cmd.add_argument(
        "--message-file",
        type=Path,
        help="also write {facts, source, revision} or {error, source} here as compact JSON",
    )
    return parser


def _print_json(document: object) -> None:
    sys.stdout.write(json.dumps(document, indent=2, sort_keys=False) + "\n")


def _error_line(error: BaseException) -> str:
    """The one line an error is reported as (after the `lmi-runtime: error: ` prefix)."""
    if isinstance(error, DownloadError):
        return f"download failed: {error}"
    if isinstance(error, RuntimeConfigError | HandlerLoadError):
        return str(error)
    return " ".join(f"{type(error).__name__}: {error}".split())  # one line, whatever it said


def _write_message(path: Path, document: dict[str, object]) -> None:
    text = json.dumps(document, separators=(",", ":"))
    if len(text.encode()) > MESSAGE_LIMIT and isinstance(document.get("error"), str):
        # An error stays readable shortened; the facts are bounded by what they hold.
        excess = len(text.encode()) - MESSAGE_LIMIT + len("...")
        error = str(document["error"]).encode()[:-excess].decode(errors="ignore") + "..."
        text = json.dumps({**document, "error": error}, separators=(",", ":"))
    path.write_text(text, encoding="utf-8")


def _inspect(path: Path | None, model_dir: Path, message_file: Path | None) -> int:
    """`inspect`: the facts of `path`, else of the model the settings in `model_dir` name; on stdout,
    and in `message_file` with the source (an error there too, before it propagates)."""
    from lmi_runtime.model_facts import facts_of_directory
    from lmi_runtime.model_inspect import inspect_source, model_source
    from lmi_runtime.properties import load_settings

    source: str | None = None if path is None else str(path)
    revision: str | None = None
    try:
        if path is not None:
            facts = facts_of_directory(path)
        else:
            model = model_source(load_settings(model_dir, os.environ))
            source, revision = model.value, model.revision
            facts = inspect_source(model, os.environ)
    except Exception as error:
        if message_file is not None:
            _write_message(message_file, {"error": _error_line(error), "source": source})
        raise
    status = facts.to_status()
    if message_file is not None:
        _write_message(message_file, {"facts": status, "source": source, "revision": revision})
    _print_json(status)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `lmi-runtime` console script; returns the process exit status."""
    options = argument_parser().parse_args(argv)
    _configure_logging()
    try:
        if options.command == "serve":
            from lmi_runtime.server import serve

            return serve(options.model_dir, options.host, options.port)
        if options.command == "inspect":
            return _inspect(options.path, options.model_dir, options.message_file)
        if options.command == "fetch":
            # No vLLM import: the init container only reads the settings and downloads.
            from lmi_runtime.model_store import fetch_adapter, fetch_all
            from lmi_runtime.properties import load_settings

            if options.adapter:
                sys.stdout.write(fetch_adapter(options.adapter, options.label, os.environ) + "\n")
                return 0
            fetch_all(load_settings(options.model_dir, os.environ), os.environ)
            return 0
        # vLLM's import may attach handlers to stdout; bind them to stderr so stdout stays pure JSON.
        with contextlib.redirect_stdout(sys.stderr):
            from lmi_runtime.engine_args import load_schema, resolve
            from lmi_runtime.properties import load_settings

            if options.command == "args":
                from lmi_runtime.model_store import localize

                settings = localize(load_settings(options.model_dir, os.environ), os.environ, download=False)
                document: object = resolve(settings, os.environ).engine_args
            else:
                from lmi_runtime.table import engine_args_table

                document = engine_args_table(load_schema())
        _print_json(document)
        return 0
    except (RuntimeConfigError, HandlerLoadError) as error:
        sys.stderr.write(f"{ERROR_PREFIX}{_error_line(error)}\n")
        return 2
    except DownloadError as error:
        sys.stderr.write(f"{ERROR_PREFIX}{_error_line(error)}\n")
        return error.exit_status


if __name__ == "__main__":
    sys.exit(main())
