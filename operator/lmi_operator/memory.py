"""Giving memory back to the system once many models have gone.

CPython frees objects into its allocators, which keep the pages: after 500 models came and went the
operator's RSS stayed 26 MiB above where it was before them (85 -> 111 MiB, a plateau: a second wave
of 500 left it at 112 MiB; tracemalloc showed no Python objects left behind). glibc's
malloc_trim(0) returns malloc's free pages in the middle of its heaps too, not only at their top: it
took that process from 112 to 102 MiB. The trim runs only after the number of cached models fell
and then held still for a period, so a steady operator never pays for it."""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
import logging
from collections.abc import Callable

log = logging.getLogger(__name__)


def trim() -> bool:
    """Collect garbage cycles, then hand malloc's free pages back (glibc only); whether it trimmed."""
    gc.collect()
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.malloc_trim(0))
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        return False


class Trimmer:
    """Trims once the watched size (cached models) fell by at least `threshold` from its peak since
    the last trim and did not change over one `period`."""

    def __init__(self, size: Callable[[], int], threshold: int = 20, period: float = 10.0) -> None:
        self.size = size
        self.threshold = threshold
        self.period = period

    async def run(self) -> None:
        """Check every `period` seconds until cancelled."""
        peak = last = self.size()
        while True:
            await asyncio.sleep(self.period)
            now = self.size()
            peak = max(peak, now)
            if now == last and peak - now >= self.threshold:
                log.info("%d models fewer than at the peak: trimming freed memory", peak - now)
                trim()
                peak = now
            last = now
