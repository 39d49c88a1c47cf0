"""The declared adapters, converged: the runtime loads, reloads and unloads adapters until the engine
serves exactly the declared set, and remembers what became of each (loaded, or why not).

The set comes from $LMI_ADAPTERS_FILE (or $LMI_ADAPTERS) at start-up, before the server reports
ready, and later from the operator through the management port (admin_server). An adapter that
cannot be loaded is reported with a reason and does not stop the model: the base model and the other
adapters serve. Sources that need fetching (s3://, hub ids) are fetched by `lmi-runtime fetch
--adapter` in a child process, so a stalled download ends that process, not the server.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lmi_runtime.adapters import AdapterError, AdapterRegistry
from lmi_runtime.errors import ERROR_PREFIX
from lmi_runtime.model_store import Source
from lmi_runtime.options import EXIT_DOWNLOAD_STALLED

logger = logging.getLogger(__name__)

LOADED = "Loaded"
FAILED = "Failed"

# Why an adapter is not loaded (the operator's status shows these reasons).
SOURCE_MISSING = "SourceMissing"
RANK_TOO_LARGE = "RankTooLarge"
BASE_MODEL_MISMATCH = "BaseModelMismatch"
DOWNLOAD_DENIED = "DownloadDenied"
DOWNLOAD_STALLED = "DownloadStalled"
NAME_CONFLICT = "NameConflict"
LOAD_FAILED = "LoadFailed"

# Fragments of vLLM's and S3's messages, in the order they are tried.
_REASONS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (RANK_TOO_LARGE, ("greater than max_lora_rank",)),
    (DOWNLOAD_DENIED, ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken")),
    (
        SOURCE_MISSING,
        (
            "NoSuchBucket",
            "NoSuchKey",
            "no objects under",
            "can not be found",
            "not found",
            "No adapter found",
            "No such file",
            "does not exist",
        ),
    ),
    (BASE_MODEL_MISMATCH, ("target_modules", "size mismatch", "shape", "not supported", "unexpected key")),
)


def classify(message: str) -> str:
    """The reason for a failure message of a fetch or of vLLM's adapter loading."""
    lowered = message.lower()
    for reason, fragments in _REASONS:
        if any(fragment.lower() in lowered for fragment in fragments):
            return reason
    return LOAD_FAILED


@dataclass(frozen=True)
class AdapterState:
    """What became of one declared adapter on this replica."""

    source: str
    state: str
    reason: str = ""
    message: str = ""


class FetchFailed(Exception):
    """`lmi-runtime fetch --adapter` failed; carries its error line and reason."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


async def fetch_adapter(name: str, source: str) -> str:
    """Where to load `source` from, fetching it first in a child process when it is s3:// or a hub
    id (the child's stall watchdog may end it; the server goes on)."""
    kind = Source(source, name)
    if not (kind.is_s3 or (kind.is_hub and not Path(source).exists())):
        return source
    # The server itself may run offline once its model is fetched; the child must reach the hub.
    environ = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "lmi_runtime",
        "fetch",
        "--adapter",
        source,
        "--label",
        f"adapter {name}",
        env=environ,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await child.communicate()
    if child.returncode == 0:
        return out.decode().strip().splitlines()[-1]
    lines = [line for line in err.decode(errors="replace").splitlines() if line.startswith(ERROR_PREFIX)]
    message = lines[-1][len(ERROR_PREFIX) :] if lines else f"fetch exited with {child.returncode}"
    reason = DOWNLOAD_STALLED if child.returncode == EXIT_DOWNLOAD_STALLED else classify(message)
    raise FetchFailed(reason, message)


class DeclaredAdapters:
    """The declared set on this replica and the state of each of its adapters."""

    def __init__(self, registry: AdapterRegistry) -> None:
        self.registry = registry
        self.states: dict[str, AdapterState] = {}
        self._lock = asyncio.Lock()

    async def converge(self, wanted: Mapping[str, str]) -> None:
        """Load what is new, reload what changed source or failed before, unload what is no longer
        declared; one convergence at a time."""
        async with self._lock:
            for name in sorted(set(self.states) - set(wanted)):
                if self.states.pop(name).state == LOADED:
                    await self.registry.unregister(name)
            for name, source in sorted(wanted.items()):
                current = self.states.get(name)
                if current is not None and current.source == source and current.state == LOADED:
                    continue
                self.states[name] = await self._load(name, source, current)

    async def _load(self, name: str, source: str, current: AdapterState | None) -> AdapterState:
        registered = name in self.registry.names()
        if registered and (current is None or current.state != LOADED):
            return AdapterState(
                source, FAILED, NAME_CONFLICT, f"adapter {name} is already served from the model folder"
            )
        try:
            path = await fetch_adapter(name, source)
            if registered:
                await self.registry.update(name, path)
            else:
                await self.registry.register(name, path)
        except FetchFailed as error:
            logger.error("adapter %s from %s: %s", name, source, error.message)
            return AdapterState(source, FAILED, error.reason, error.message)
        except AdapterError as error:
            logger.error("adapter %s from %s: %s", name, source, error.message)
            return AdapterState(source, FAILED, classify(error.message), error.message)
        return AdapterState(source, LOADED)

    def report(self) -> dict[str, Any]:
        """{"adapters": [{name, source, state, reason, message}]}, sorted by name."""
        return {"adapters": [{"name": name, **asdict(self.states[name])} for name in sorted(self.states)]}
