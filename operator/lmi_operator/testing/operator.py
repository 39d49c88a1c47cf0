"""The operator in a background thread of the current process, for tests that count its requests."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from lmi_operator.main import run_operator
from lmi_operator.reconciler import Reconciler
from lmi_operator.settings import OperatorSettings

T = TypeVar("T")


class OperatorThread:
    """Runs `lmi-operator run` in a thread with its own event loop until `stop()`."""

    def __init__(self, kubeconfig: Path, settings: OperatorSettings) -> None:
        self.kubeconfig = kubeconfig
        self.settings = settings
        self.reconciler: Reconciler | None = None
        self.error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, name="lmi-operator", daemon=True)

    def start(self, timeout: float = 60.0) -> OperatorThread:
        """Start and wait until kopf watches (or fail with the error it died of)."""
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError(f"operator not ready in {timeout}s: {self.error!r}")
        if self.error is not None:
            raise RuntimeError("operator failed to start") from self.error
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Ask the operator to stop and wait for the thread."""
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout)

    def submit(self, coroutine: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Run `coroutine` on the operator's event loop (to act with its clients from a test)."""
        assert self._loop is not None, "the operator is not running"
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop)

    def requests(self) -> dict[str, int]:
        """API requests made by the reconciler so far, by HTTP method (kopf's watches not included)."""
        if self.reconciler is None:
            return {}
        return dict(self.reconciler.client.requests)

    def writes_in(self, namespace: str) -> int:
        """Writes (POST, PUT, PATCH, DELETE) the reconciler sent for objects in `namespace`."""
        if self.reconciler is None:
            return 0
        return sum(
            n
            for (method, path), n in self.reconciler.client.requests_by_path.items()
            if method != "GET" and f"/namespaces/{namespace}/" in path
        )

    def _main(self) -> None:
        try:
            asyncio.run(self._run())
        except BaseException as err:
            self.error = err
        finally:
            self._ready.set()

    async def _run(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        ready = asyncio.Event()

        async def announce() -> None:
            await ready.wait()
            self._ready.set()

        task = asyncio.create_task(announce())
        try:
            await run_operator(
                self.settings,
                str(self.kubeconfig),
                stop=self._stop,
                ready=ready,
                on_start=self._started,
                count_paths=True,
            )
        finally:
            task.cancel()

    def _started(self, reconciler: Reconciler) -> None:
        self.reconciler = reconciler
