"""Bringing each ready replica to the declared adapters through its management port.

For every ready replica of a model with LoRA, the operator asks what it serves (GET /lmi/adapters on
the pod's IP and admin port, signed with the operator's key: lmi_runtime.admin_auth) and sends the
declared set (PUT) when it differs or an adapter failed there (so a failure is retried at each
look). A report reads the last answers and starts a look at each replica in the background (one at a
time per replica, and no more often than every LOOK_INTERVAL_SECONDS unless the declared set
changed: a burst of pod events makes one look); a look that changes what is known asks for the
model's status to be reported again (`notify`). Only a replica's first look is awaited, briefly
(FIRST_ANSWER_WAIT_SECONDS): a replica that just became ready answers in milliseconds, so its report
carries the answer in one status write instead of two ("loading", then the answer), and each status
write of a model with adapters costs the API server about 2.5x a plain one
(bench/status_write_cost.py). A load (PUT) holds a report no longer than that. The answers feed
status.adapters (adapter_status); a replica that does not answer, or refuses the signature, is
Unreachable."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import aiohttp

from lmi_operator.adapter_status import UNANSWERED, Answer, needs_update
from lmi_operator.cache import Key
from lmi_runtime.admin_auth import Signer
from lmi_runtime.options import ADMIN_ADAPTERS_PATH, ADMIN_PORT

READ_TIMEOUT_SECONDS = 2.0
LOAD_TIMEOUT_SECONDS = 900.0
LOOK_INTERVAL_SECONDS = 5.0
FIRST_ANSWER_WAIT_SECONDS = 0.5


class AdapterSync:
    """Each replica's last answer, and the looks in flight; `updates` counts the PUTs sent."""

    def __init__(self, signer: Signer) -> None:
        self.signer = signer
        self.updates = 0
        self.notify: Callable[[Key], None] | None = None  # asks for the model's status again
        self._answers: dict[tuple[Key, str], Answer] = {}
        self._looks: dict[tuple[Key, str], asyncio.Task[None]] = {}
        # The declared set each replica was last looked at for, and when that look began.
        self._looked: dict[tuple[Key, str], tuple[dict[str, str], float]] = {}

    async def answers(
        self, key: Key, declared: Mapping[str, str], pods: Sequence[Mapping[str, Any]]
    ) -> dict[str, Answer | None]:
        """The last answer of each pod (None: no look has finished yet), by pod name; a look at
        each pod is started unless one is in flight or one began for the same set lately, and a
        pod's first look is awaited for up to FIRST_ANSWER_WAIT_SECONDS."""
        names = {str(p["metadata"]["name"]) for p in pods}
        for gone in [k for k in {*self._answers, *self._looks} if k[0] == key and k[1] not in names]:
            self._answers.pop(gone, None)
            self._looked.pop(gone, None)
            if (look := self._looks.pop(gone, None)) is not None:
                look.cancel()
        now = time.monotonic()
        for pod in pods:
            name = str(pod["metadata"]["name"])
            look = self._looks.get((key, name))
            if look is not None and not look.done():
                continue
            wanted, since = self._looked.get((key, name), ({}, now - LOOK_INTERVAL_SECONDS))
            if wanted == declared and now - since < LOOK_INTERVAL_SECONDS:
                continue
            self._looked[key, name] = (dict(declared), now)
            ip = str(pod["status"]["podIP"])
            self._looks[key, name] = asyncio.create_task(self._look(key, name, ip, dict(declared)))
        first = [
            look
            for name in names
            if (key, name) not in self._answers and (look := self._looks.get((key, name))) is not None
        ]
        if first:
            await asyncio.wait(first, timeout=FIRST_ANSWER_WAIT_SECONDS)
        return {name: self._answers.get((key, name)) for name in sorted(names)}

    async def _look(self, key: Key, pod: str, ip: str, declared: dict[str, str]) -> None:
        async with aiohttp.ClientSession() as session:
            answer = await self._call(session, "GET", ip, READ_TIMEOUT_SECONDS)
            if answer and needs_update(declared, answer):
                self.updates += 1
                answer = await self._call(session, "PUT", ip, LOAD_TIMEOUT_SECONDS, {"adapters": declared})
        changed = self._answers.get((key, pod)) != answer
        self._answers[key, pod] = answer
        if changed and self.notify is not None:
            self.notify(key)

    async def _call(
        self, session: aiohttp.ClientSession, method: str, ip: str, timeout: float, body: object = None
    ) -> Answer:
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
                    return UNANSWERED
                answer = await response.json()
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return UNANSWERED
        valid = isinstance(answer, dict) and isinstance(answer.get("adapters"), list)
        return answer if valid else UNANSWERED

    def forget(self, key: Key) -> None:
        """The model is gone: stop its looks and drop its answers."""
        for look in [k for k in self._looks if k[0] == key]:
            self._looks.pop(look).cancel()
        for answer in [k for k in self._answers if k[0] == key]:
            del self._answers[answer]
        for looked in [k for k in self._looked if k[0] == key]:
            del self._looked[looked]
