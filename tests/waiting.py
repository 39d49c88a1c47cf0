"""Polling helper for tests against live components."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def eventually(
    probe: Callable[[], T | None], timeout: float = 60.0, interval: float = 0.25, what: str = ""
) -> T:
    """Call `probe` until it returns a truthy value and return it; fail after `timeout` seconds,
    showing the last value (or exception) seen."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            value = probe()
        except Exception as err:  # the component may not have caught up yet: keep polling
            last = err
        else:
            if value:
                return value
            last = value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or probe}: last value {last!r}")
