"""Helpers for the processes the local cluster starts: free ports, health checks and children that
die with us."""

from __future__ import annotations

import ctypes
import signal
import socket
import urllib.request

_PR_SET_PDEATHSIG = 1


def free_port() -> int:
    """A port on 127.0.0.1 that is free now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def http_ok(url: str) -> bool:
    """Whether a plain-HTTP health endpoint answers 200 (within 2 s)."""
    with urllib.request.urlopen(url, timeout=2) as resp:
        return bool(resp.status == 200)


def die_with_parent() -> None:
    """preexec_fn of a child: a test run killed with SIGKILL cannot run its finalizers, so the
    kernel stops the child (SIGTERM) when its parent dies."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
