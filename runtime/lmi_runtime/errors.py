"""Errors the runtime reports to people: one line each, naming what to change."""

from __future__ import annotations


class RuntimeConfigError(Exception):
    """A configuration the runtime refuses before any weight is loaded.

    The message is complete on its own (it names the key, the value and what is allowed), so the CLI
    prints it as one line without a traceback.
    """


class HandlerLoadError(Exception):
    """The custom handler (model.py) cannot be imported; the message names the file and line."""
