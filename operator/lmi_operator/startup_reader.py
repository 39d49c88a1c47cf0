"""Reading the runtime's GET /startup from the replicas that are starting, for status.startup.

The operator asks the pod itself (its IP and the server's port), as Prometheus scrapes it: only while
the model server's container runs and is not ready yet, and once more when it turns ready (the report
then holds every phase's duration). A pod that does not answer within a second (HTTPS, a NetworkPolicy
in the way, an image without the route) keeps the phase its pod status shows."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

import aiohttp

from lmi_operator.cache import Key
from lmi_operator.replica_phases import SERVER_CONTAINER, server_starting
from lmi_runtime.options import PORT, STARTUP_PATH
from lmi_runtime.startup_phases import READY

TIMEOUT_SECONDS = 1.0


def _https(pod: Mapping[str, Any]) -> bool:
    containers = pod.get("spec", {}).get("containers", [])
    server: Mapping[str, Any] = next((c for c in containers if c.get("name") == SERVER_CONTAINER), {})
    return bool(server.get("readinessProbe", {}).get("httpGet", {}).get("scheme") == "HTTPS")


class StartupReader:
    """The last /startup answer of each replica of each model."""

    def __init__(self) -> None:
        self._reports: dict[Key, dict[str, Mapping[str, Any]]] = {}

    async def read(self, key: Key, pods: Sequence[Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
        """Ask the replicas that are starting (or just turned ready) and return every known answer."""
        known = self._reports.setdefault(key, {})
        names = {str(p.get("metadata", {}).get("name")) for p in pods}
        for gone in set(known) - names:
            del known[gone]
        wanted = [
            p
            for p in pods
            if p.get("status", {}).get("podIP")
            and not _https(p)
            and (
                server_starting(p)
                or (p["metadata"]["name"] in known and known[p["metadata"]["name"]].get("phase") != READY)
            )
        ]
        if wanted:
            timeout = aiohttp.ClientTimeout(total=TIMEOUT_SECONDS)
            async with aiohttp.ClientSession(timeout=timeout) as session:
                answers = await asyncio.gather(*(self._get(session, p) for p in wanted))
            for pod, answer in zip(wanted, answers, strict=True):
                if answer is not None:
                    known[pod["metadata"]["name"]] = answer
        return dict(known)

    @staticmethod
    async def _get(session: aiohttp.ClientSession, pod: Mapping[str, Any]) -> Mapping[str, Any] | None:
        url = f"http://{pod['status']['podIP']}:{PORT}{STARTUP_PATH}"
        try:
            async with session.get(url) as response:
                if response.status != 200:
                    return None
                answer = await response.json()
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return None
        return answer if isinstance(answer, dict) and "phase" in answer else None

    def forget(self, key: Key) -> None:
        """The model is gone."""
        self._reports.pop(key, None)
