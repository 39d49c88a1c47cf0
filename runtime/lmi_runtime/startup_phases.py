"""The server's start-up phases and how long each took, for GET /startup (the operator reads it into
the model's status) and the ready log line.

The phases inside vLLM's engine start are told by vLLM's own log lines: "Starting to load model"
opens LoadingWeights, "Loading weights took" or "Model loading took" opens Compiling (torch.compile,
KV-cache profiling, CUDA graph capture, warm-up). vLLM logs them from its engine and worker
processes, started by fork or by spawn (vLLM on CPU always spawns), each configuring logging anew;
what they share is the server's stdout and stderr. So the server puts a pipe in place of each (the
processes it starts inherit them) and a thread copies every byte to the original stream, noting the
lines that open a phase. Measured reason for the thread: a logging hook (handler or record factory)
saw nothing on CPU, where the worker that loads the weights is spawned.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import selectors
import threading
import time
from dataclasses import dataclass, field
from typing import Any

STARTING, LOADING_WEIGHTS, COMPILING, READY = "Starting", "LoadingWeights", "Compiling", "Ready"
# Fragments of vLLM's log lines (0.26 to 0.32) that open a phase.
_OPENED_BY = (
    (b"Starting to load model", LOADING_WEIGHTS),
    # vLLM 0.26's V2 GPU model runner (seen on an H200, where the line above never came).
    (b"Loading model from scratch", LOADING_WEIGHTS),
    # The weight loader's line (on CPU the only one), then the GPU model runner's.
    (b"Loading weights took", COMPILING),
    (b"Model loading took", COMPILING),
)


def _write_all(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data) :]


@dataclass
class StartupPhases:
    """The phases of this server's start: (phase, unix time it opened), in order."""

    opened: list[tuple[str, float]] = field(default_factory=lambda: [(STARTING, time.time())])
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def open(self, phase: str, at: float | None = None) -> None:
        """Note that `phase` began (once: tensor-parallel workers each log the same lines)."""
        with self._lock:
            if phase not in {name for name, _ in self.opened} and self.opened[-1][0] != READY:
                self.opened.append((phase, time.time() if at is None else at))

    def ready(self) -> None:
        """The server serves: the last phase closes."""
        self.open(READY)

    def report(self) -> dict[str, Any]:
        """{"phase": the current phase, "since": when it opened (unix seconds), "seconds": how long each
        closed phase took}."""
        with self._lock:
            opened = list(self.opened)
        seconds = {name: round(nxt - at, 1) for (name, at), (_, nxt) in itertools.pairwise(opened)}
        phase, since = opened[-1]
        return {"phase": phase, "since": round(since, 3), "seconds": seconds}

    def scan(self, line: bytes) -> None:
        """Open the phase a log line announces, if it announces one."""
        for fragment, phase in _OPENED_BY:
            if fragment in line:
                self.open(phase)
                return

    def watch_output(self) -> None:
        """Route this process's stdout and stderr (and its children's) through pipes that a daemon
        thread copies to the original streams, scanning the lines until the server is ready."""
        pairs = {}
        for fd in (1, 2):
            read_end, write_end = os.pipe()
            pairs[read_end] = os.dup(fd)
            os.dup2(write_end, fd)
            os.close(write_end)
        threading.Thread(target=self._copy, args=(pairs,), name="lmi-output", daemon=True).start()

    def _copy(self, pairs: dict[int, int]) -> None:
        selector = selectors.DefaultSelector()
        partial: dict[int, bytes] = {}
        for read_end in pairs:
            selector.register(read_end, selectors.EVENT_READ)
            partial[read_end] = b""
        while selector.get_map():
            for key, _ in selector.select():
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    selector.unregister(key.fd)
                    continue
                # Never let a write error stop the copy: writers would block on a full pipe.
                with contextlib.suppress(OSError):
                    _write_all(pairs[key.fd], chunk)
                if self.opened[-1][0] == READY:
                    continue
                *lines, rest = (partial[key.fd] + chunk).split(b"\n")
                # Progress bars redraw with \r and no newline: keep the tail only.
                partial[key.fd] = rest[-4096:]
                for line in lines:
                    self.scan(line)
