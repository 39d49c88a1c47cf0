"""Kubernetes Events about LMIModels, aggregated as client-go's recorder does: an event that repeats
(same object, type, reason and message) bumps the existing Event's count and lastTimestamp instead
of creating another object, so a flapping model cannot flood its namespace with Events."""

from __future__ import annotations

import collections
import datetime
import logging
from dataclasses import dataclass

from lmi_operator import metrics
from lmi_operator.api import API_VERSION, KIND
from lmi_operator.kube import ApiError, KubeClient, object_path

log = logging.getLogger(__name__)

COMPONENT = "lmi-operator"
# Events remembered for aggregation (client-go's correlator keeps 4096 too); the oldest go first.
CACHE_SIZE = 4096
MESSAGE_CHARS = 1024


@dataclass(frozen=True)
class Subject:
    """The LMIModel an event is about."""

    namespace: str
    name: str
    uid: str | None


@dataclass
class _Recorded:
    name: str
    count: int


class EventRecorder:
    """Records Events through `client`; never raises (an Event is a courtesy, not the reconcile)."""

    def __init__(self, client: KubeClient, cache_size: int = CACHE_SIZE) -> None:
        self.client = client
        self.cache_size = cache_size
        self._recorded: collections.OrderedDict[tuple[str, ...], _Recorded] = collections.OrderedDict()
        # The keys of each model's Events, so that a deleted model's go with it (memory under churn).
        self._by_model: dict[tuple[str, str], set[tuple[str, ...]]] = {}

    def forget(self, namespace: str, name: str) -> None:
        """The model is gone: its Events will not repeat (a new one of that name has another uid)."""
        for key in self._by_model.pop((namespace, name), ()):
            self._recorded.pop(key, None)

    async def record(self, subject: Subject, reason: str, message: str, normal: bool) -> None:
        """A Normal (or Warning) Event with `reason` and `message` on `subject`."""
        kind = "Normal" if normal else "Warning"
        message = message[:MESSAGE_CHARS]
        key = (subject.namespace, subject.name, subject.uid or "", kind, reason, message)
        now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        try:
            if (seen := self._recorded.get(key)) is not None and await self._bump(subject, seen, now):
                self._recorded.move_to_end(key)
                return
            created = await self.client.request(
                "POST",
                object_path("v1", "Event", subject.namespace),
                body=_event(subject, kind, reason, message, now),
            )
        except ApiError as err:
            log.warning(
                "could not record event %s on %s/%s: %s", reason, subject.namespace, subject.name, err
            )
            return
        metrics.API_WRITES.labels("Event").inc()
        self._recorded[key] = _Recorded(created["metadata"]["name"], 1)
        self._by_model.setdefault((subject.namespace, subject.name), set()).add(key)
        while len(self._recorded) > self.cache_size:
            oldest, _ = self._recorded.popitem(last=False)
            model = (oldest[0], oldest[1])
            keys = self._by_model.get(model, set())
            keys.discard(oldest)
            if not keys:
                self._by_model.pop(model, None)

    async def _bump(self, subject: Subject, seen: _Recorded, now: str) -> bool:
        """Count one more occurrence on the Event recorded before; False when it is gone (expired)."""
        path = object_path("v1", "Event", subject.namespace, seen.name)
        try:
            await self.client.merge_patch(path, {"count": seen.count + 1, "lastTimestamp": now})
        except ApiError as err:
            if err.status == 404:
                return False
            raise
        metrics.API_WRITES.labels("Event").inc()
        seen.count += 1
        return True


def _event(subject: Subject, kind: str, reason: str, message: str, now: str) -> dict[str, object]:
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"generateName": f"{subject.name}.", "namespace": subject.namespace},
        "involvedObject": {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "name": subject.name,
            "namespace": subject.namespace,
            "uid": subject.uid,
        },
        "reason": reason,
        "message": message,
        "type": kind,
        "source": {"component": COMPONENT},
        "firstTimestamp": now,
        "lastTimestamp": now,
        "count": 1,
    }
