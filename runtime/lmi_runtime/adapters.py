"""LoRA adapters: the folders under <model dir>/adapters, and LMI's adapter operations on the engine.

Adapters live in vLLM's own registry (OpenAIServingModels.lora_requests), so the OpenAI routes and
/v1/models see exactly what the LMI API registered.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmi_runtime.errors import RuntimeConfigError
from lmi_runtime.vllm_compat import vllm_attr

logger = logging.getLogger(__name__)

ADAPTERS_DIR = "adapters"
LORA_DISABLED = "LoRA is not enabled."


class AdapterError(Exception):
    """An adapter operation that cannot be done; carries the HTTP status LMI answers with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def preload_dirs(model_dir: Path, enable_lora: bool) -> dict[str, Path]:
    """Adapters to register at start-up: every sub-folder of <model dir>/adapters, by name."""
    root = model_dir / ADAPTERS_DIR
    found = {entry.name: entry for entry in sorted(root.iterdir()) if entry.is_dir()} if root.is_dir() else {}
    if found and not enable_lora:
        raise RuntimeConfigError(
            f"{root} holds adapters ({', '.join(found)}) but LoRA is off: set option.enable_lora=true"
        )
    return found


def check_declared(
    declared: Mapping[str, str], origin: str, folders: Mapping[str, Path], enable_lora: bool
) -> None:
    """Refuse a declared set that cannot be served at all: adapters while LoRA is off, or a name that
    a folder under <model dir>/adapters already takes."""
    if declared and not enable_lora:
        raise RuntimeConfigError(f"{origin} lists adapters but LoRA is off: set option.enable_lora=true")
    if clash := sorted(set(declared) & set(folders)):
        raise RuntimeConfigError(f"{origin}: adapter {clash[0]!r} is also a folder under {ADAPTERS_DIR}/")


def _error_of(result: Any) -> tuple[int, str] | None:
    """(status, message) of a vLLM ErrorResponse (nested in 0.32, flat before), else None."""
    if isinstance(result, str) or result is None:
        return None
    error = getattr(result, "error", result)
    return int(getattr(error, "code", 500)), str(getattr(error, "message", error))


@dataclass
class AdapterRegistry:
    """LMI's adapter operations over vLLM's model registry and engine."""

    models: Any  # vLLM OpenAIServingModels
    engine: Any  # vLLM EngineClient
    enabled: bool

    def _require_enabled(self) -> None:
        if not self.enabled:
            raise AdapterError(400, LORA_DISABLED)

    def names(self) -> list[str]:
        """Registered adapter names, sorted."""
        return sorted(self.models.lora_requests) if self.enabled else []

    def resolve(self, name: str) -> str:
        """`name` if it is a registered adapter; otherwise an error listing the known ones."""
        self._require_enabled()
        if name not in self.models.lora_requests:
            raise AdapterError(
                404, f"LoRA adapter {name} not found in registry. Available adapters: {self.names()}"
            )
        return name

    def describe(self, name: str) -> dict[str, str]:
        """{"name", "src"} of one adapter."""
        request = self.models.lora_requests[self.resolve(name)]
        return {"name": name, "src": str(request.lora_path)}

    def list(self) -> list[dict[str, str]]:
        """All adapters as {"name", "src"}."""
        self._require_enabled()
        return [self.describe(name) for name in self.names()]

    async def _load(self, name: str, src: str) -> None:
        request = vllm_attr("LoadLoRAAdapterRequest")(lora_name=name, lora_path=src)
        failure = _error_of(await self.models.load_lora_adapter(request))
        if failure is not None:
            raise AdapterError(*failure)

    async def register(self, name: str, src: str) -> None:
        """Load an adapter from `src` under `name`."""
        self._require_enabled()
        if not name or not src:
            raise AdapterError(400, "both name and src are required")
        if name in self.models.lora_requests:
            raise AdapterError(409, f"adapter {name} is already registered; update it instead")
        await self._load(name, src)
        logger.info("registered adapter %s from %s", name, src)

    async def update(self, name: str, src: str | None) -> None:
        """Reload an adapter, from a new `src` if given; the old weights are released first."""
        current = self.describe(name)
        await self.unregister(name)
        await self._load(name, src or current["src"])
        logger.info("updated adapter %s from %s", name, src or current["src"])

    async def unregister(self, name: str) -> None:
        """Forget an adapter and free its slot in the engine."""
        lora_id = self.models.lora_requests[self.resolve(name)].lora_int_id
        request = vllm_attr("UnloadLoRAAdapterRequest")(lora_name=name)
        failure = _error_of(await self.models.unload_lora_adapter(request))
        if failure is not None:
            raise AdapterError(*failure)
        # vLLM's unload only forgets the name; the engine keeps the weights until told.
        await self.engine.remove_lora(lora_id)
        logger.info("deleted adapter %s", name)
