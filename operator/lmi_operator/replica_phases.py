"""Each replica's start-up phase, and how long each phase took, from its pod and its runtime. Pure.

The pod tells Pending (not scheduled, image, volumes), Downloading (the init container `fetch` runs)
and Ready; between the model server's container start and Ready, the runtime's own GET /startup
report (read by `status_report`) tells Starting, LoadingWeights and Compiling. Without that report
(TLS, a NetworkPolicy in the way, an older image) the phase there is Starting."""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence
from typing import Any

from lmi_operator.render_cache import FETCH_CONTAINER
from lmi_operator.status import parse_time, rfc3339
from lmi_runtime.startup_phases import COMPILING, LOADING_WEIGHTS, READY, STARTING

PENDING, DOWNLOADING = "Pending", "Downloading"
PHASES = (PENDING, DOWNLOADING, STARTING, LOADING_WEIGHTS, COMPILING, READY)
SERVER_CONTAINER = "model-server"
# Most replicas listed in the status (the least advanced first).
MAX_LISTED = 32


def _status_of(statuses: Sequence[Mapping[str, Any]], name: str) -> Mapping[str, Any]:
    return next((cs for cs in statuses if cs.get("name") == name), {})


def server_starting(pod: Mapping[str, Any]) -> bool:
    """Whether the model server's container runs but is not ready yet (its /startup is worth a read)."""
    server = _status_of(pod.get("status", {}).get("containerStatuses", []), SERVER_CONTAINER)
    return bool(server.get("state", {}).get("running")) and not server.get("ready")


def server_ready(pod: Mapping[str, Any]) -> bool:
    """Whether the model server's container is ready (it serves, and its management port answers)."""
    server = _status_of(pod.get("status", {}).get("containerStatuses", []), SERVER_CONTAINER)
    return bool(server.get("ready")) and bool(pod.get("status", {}).get("podIP"))


def _seconds(start: datetime.datetime | None, end: datetime.datetime | None) -> int | None:
    return max(0, int((end - start).total_seconds())) if start and end else None


def replica_phase(pod: Mapping[str, Any], runtime: Mapping[str, Any] | None) -> dict[str, Any]:
    """One replica's entry: {pod, phase, since, seconds}. `runtime` is its last GET /startup answer."""
    status = pod.get("status", {})
    created = parse_time(pod.get("metadata", {}).get("creationTimestamp"))
    fetch = _status_of(status.get("initContainerStatuses", []), FETCH_CONTAINER)
    server = _status_of(status.get("containerStatuses", []), SERVER_CONTAINER)
    fetch_state = fetch.get("state", {})
    fetch_started = parse_time(
        (fetch_state.get("running") or fetch_state.get("terminated") or {}).get("startedAt")
    )
    done = fetch_state.get("terminated") or {}
    fetch_finished = parse_time(done.get("finishedAt")) if done.get("exitCode") == 0 else None
    server_started = parse_time((server.get("state", {}).get("running") or {}).get("startedAt"))
    seconds: dict[str, int] = {}
    if (pending := _seconds(created, fetch_started or server_started)) is not None:
        seconds[PENDING] = pending
    if (downloading := _seconds(fetch_started, fetch_finished)) is not None:
        seconds[DOWNLOADING] = downloading
    if runtime is not None and server_started is not None:
        seconds |= {k: int(v) for k, v in runtime.get("seconds", {}).items() if k in PHASES}
    if server.get("ready"):
        ready: Mapping[str, Any] = next(
            (c for c in status.get("conditions", []) if c.get("type") == "Ready"), {}
        )
        phase, since = READY, parse_time(ready.get("lastTransitionTime"))
    elif server_started is not None:
        phase, since = STARTING, server_started
        if runtime is not None and runtime.get("phase") in PHASES and runtime.get("phase") != READY:
            phase = str(runtime["phase"])
            since = datetime.datetime.fromtimestamp(float(runtime["since"]), datetime.UTC).replace(
                microsecond=0
            )
    elif fetch_state.get("running") or (fetch and not fetch_finished and fetch_started):
        phase, since = DOWNLOADING, fetch_started
    else:
        phase, since = PENDING, created
    entry: dict[str, Any] = {
        "pod": pod.get("metadata", {}).get("name", "?"),
        "phase": phase,
        "seconds": seconds,
    }
    if since is not None:
        entry["since"] = rfc3339(since)
    return entry


def startup_status(
    pods: Sequence[Mapping[str, Any]], runtime: Mapping[str, Mapping[str, Any]]
) -> dict[str, Any] | None:
    """status.startup: every replica's entry, least advanced first, and the least advanced phase
    (None without pods). `runtime` maps pod names to their last GET /startup answers."""
    if not pods:
        return None
    entries = [replica_phase(pod, runtime.get(pod.get("metadata", {}).get("name", ""))) for pod in pods]
    entries.sort(key=lambda e: (PHASES.index(e["phase"]), e.get("since", ""), e["pod"]))
    return {"phase": entries[0]["phase"], "replicas": entries[:MAX_LISTED]}
