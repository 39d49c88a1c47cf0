"""Errors the runtime reports to people: one line each, naming what to change."""

from __future__ import annotations

from lmi_runtime.options import EXIT_DOWNLOAD_FAILED

# How the CLI starts the one line it prints for these errors; the operator finds that line in a
# crashed pod's log tail (its termination message) and shows it in the model's status.
ERROR_PREFIX = "lmi-runtime: error: "


class RuntimeConfigError(Exception):
    """A configuration the runtime refuses before any weight is loaded.

    The message is complete on its own (it names the key, the value and what is allowed), so the CLI
    prints it as one line without a traceback.
    """


class HandlerLoadError(Exception):
    """The custom handler (model.py) cannot be imported; the message names the file and line."""


class DownloadError(Exception):
    """A model or adapter source that cannot be fetched; the message names the source and what to
    check. `exit_status` tells the operator which status reason it is (see model_store)."""

    exit_status = EXIT_DOWNLOAD_FAILED
