"""Bringing each ready replica to the declared adapters through its management port.

The operator asks every ready replica of a model with LoRA what it serves (GET /lmi/adapters on
the pod's IP and admin port, signed with the operator's key: lmi_runtime.admin_auth) and sends the
declared set (PUT) to those that differ, or that failed to load one (retried each time the status
is reported). A PUT may take as long as a download, so it runs in the background, one per replica
at a time, and asks for the model's status to be reported again when it ends; until then the GET's
answer shows the progress. The answers feed status.adapters (adapter_status); a replica that does
not answer, or refuses the signature, is Unreachable."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import aiohttp

from lmi_operator.adapter_status import needs_update
from lmi_operator.cache import Key
from lmi_runtime.admin_auth import Signer
from lmi_runtime.options import ADMIN_ADAPTERS_PATH, ADMIN_PORT

READ_TIMEOUT_SECONDS = 2.0
LOAD_TIMEOUT_SECONDS = 900.0


class AdapterSync:
    """Reads and converges the replicas' adapters; `updates` counts the PUTs sent (for the bench)."""

    def __init__(self, signer: Signer) -> None:
        self.signer = signer
        self.updates = 0
        self.notify: Callable[[Key], None] | None = None  # called with the model's key when a PUT ends
        self._inflight: dict[tuple[Key, str], tuple[dict[str, str], asyncio.Task[None]]] = {}

    async def sync(
        self, key: Key, declared: Mapping[str, str], pods: Sequence[Mapping[str, Any]]
    ) -> dict[str, Mapping[str, Any] | None]:
        """Each pod's current answer (None where it did not answer), by pod name; replicas that
        differ from `declared` are sent it in the background."""
        address = {str(p["metadata"]["name"]): str(p["status"]["podIP"]) for p in pods}
        async with aiohttp.ClientSession() as session:
            answers = await asyncio.gather(
                *(self._call(session, "GET", ip, READ_TIMEOUT_SECONDS) for ip in address.values())
            )
        result = dict(zip(address, answers, strict=True))
        for gone in [k for k in self._inflight if k[0] == key and k[1] not in result]:
            self._inflight.pop(gone)[1].cancel()
        for pod, answer in result.items():
            if answer is not None and needs_update(declared, answer):
                self._send(key, pod, address[pod], dict(declared))
        return result

    def _send(self, key: Key, pod: str, ip: str, declared: dict[str, str]) -> None:
        running = self._inflight.get((key, pod))
        if running is not None and not running[1].done() and running[0] == declared:
            return
        if running is not None:
            running[1].cancel()
        self.updates += 1
        self._inflight[key, pod] = (declared, asyncio.create_task(self._put(key, ip, declared)))

    async def _put(self, key: Key, ip: str, declared: dict[str, str]) -> None:
        async with aiohttp.ClientSession() as session:
            await self._call(session, "PUT", ip, LOAD_TIMEOUT_SECONDS, {"adapters": declared})
        if self.notify is not None:
            self.notify(key)

    async def _call(
        self, session: aiohttp.ClientSession, method: str, ip: str, timeout: float, body: object = None
    ) -> Mapping[str, Any] | None:
        data = b"" if body is None else json.dumps(body).encode()
        headers = {
            "Authorization": self.signer.authorization(method, ADMIN_ADAPTERS_PATH, data),
            "Content-Type": "application/json",
        }
        url = f"http://{ip}:{ADMIN_PORT}{ADMIN_ADAPTERS_PATH}"
        try:
            async with session.request(
                method, url, data=data, headers=headers, timeout=aiohttp.ClientTimeout(total=timeout)
            ) as response:
                if response.status != 200:
                    return None
                answer = await response.json()
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return None
        return answer if isinstance(answer, dict) and isinstance(answer.get("adapters"), list) else None

    def forget(self, key: Key) -> None:
        """The model is gone: stop what is in flight for it."""
        for inflight in [k for k in self._inflight if k[0] == key]:
            self._inflight.pop(inflight)[1].cancel()
