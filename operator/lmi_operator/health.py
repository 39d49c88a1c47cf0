"""The liveness endpoint (/healthz): alive while waiting for the Lease, and, once leading, while
the reconcile queue makes progress. kopf's own endpoint starts only with kopf, so a standby
replica would fail its liveness probe and be restarted forever."""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from lmi_operator.reconciler import Reconciler


class Health:
    """Decides liveness from the reconciler, once there is one (None: standby)."""

    def __init__(self, stall_seconds: float) -> None:
        self.stall_seconds = stall_seconds
        self.reconciler: Reconciler | None = None

    def check(self) -> tuple[int, dict[str, object]]:
        """(HTTP status, body) of a liveness probe."""
        if self.reconciler is None:
            return 200, {"role": "standby"}
        queued = self.reconciler.pending()
        idle = time.monotonic() - self.reconciler.last_progress
        if queued and idle > self.stall_seconds:
            return 500, {
                "role": "leader",
                "queued": queued,
                "error": f"no reconcile finished for {idle:.0f}s",
            }
        return 200, {"role": "leader", "queued": queued}

    async def _handle(self, _: web.Request) -> web.Response:
        status, body = self.check()
        return web.Response(status=status, text=json.dumps(body), content_type="application/json")

    async def serve(self, port: int) -> Callable[[], Awaitable[None]]:
        """Serve /healthz on 0.0.0.0:`port`; returns the coroutine function that stops it."""
        app = web.Application()
        app.router.add_get("/healthz", self._handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "0.0.0.0", port).start()
        return runner.cleanup
