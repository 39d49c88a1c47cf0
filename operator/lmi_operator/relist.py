"""Notice kopf's re-lists, so that what was deleted while no watch was open leaves the cache.

kopf lists a kind again when its watch cannot resume (the API came back from an outage, or the
watch's resource version expired) and hands the list over as plain events (type None). An object
deleted in between yields no event at all, where client-go's informers emit its deletion; the
operator would keep a Service that no longer exists in its cache and never restore it. Listing
events of a kind whose first listing is over mark a re-list; once they stop for `quiet` seconds the
kind is handed to `on_relist`, which compares the cache with a fresh list of its own."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class RelistDetector:
    """Tells `on_relist(kind)` when a kind was listed again."""

    def __init__(self, on_relist: Callable[[str], None], quiet: float = 1.0) -> None:
        self._on_relist = on_relist
        self._quiet = quiet
        self._listed: set[str] = set()
        self._relisting: set[str] = set()
        self._timers: dict[str, asyncio.TimerHandle] = {}

    def observe(self, kind: str, listed: bool) -> None:
        """Record one event of `kind`; `listed` when it came from a listing rather than the watch."""
        if not listed:
            # Watch events come after the kind's listing: it is over.
            self._listed.add(kind)
            return
        if kind in self._listed:
            self._relisting.add(kind)
        timer = self._timers.pop(kind, None)
        if timer is not None:
            timer.cancel()
        self._timers[kind] = asyncio.get_running_loop().call_later(self._quiet, self._settled, kind)

    def _settled(self, kind: str) -> None:
        self._timers.pop(kind, None)
        self._listed.add(kind)
        if kind in self._relisting:
            self._relisting.discard(kind)
            self._on_relist(kind)
