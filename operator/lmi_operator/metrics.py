"""Prometheus metrics of the operator: reconciles, errors, durations, writes and models by condition."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

REGISTRY = CollectorRegistry()

RECONCILES = Counter(
    "lmi_operator_reconciles",
    "Reconcile steps of LMIModels (children, status), by result.",
    ["step", "result"],
    registry=REGISTRY,
)
RECONCILE_SECONDS = Histogram(
    "lmi_operator_reconcile_duration_seconds",
    "Time one reconcile step (children, status) took.",
    ["step"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    registry=REGISTRY,
)
API_WRITES = Counter(
    "lmi_operator_api_writes",
    "Writes the operator sent to the API server, by kind.",
    ["kind"],
    registry=REGISTRY,
)
API_REQUESTS = Counter(
    "lmi_operator_api_requests",
    "Requests the reconciler sent to the API server, by method.",
    ["method"],
    registry=REGISTRY,
)
MODELS = Gauge(
    "lmi_operator_models", "LMIModels by the reason of their Ready condition.", ["reason"], registry=REGISTRY
)
CACHED_MODELS = Gauge(
    "lmi_operator_cached_models",
    "Models the operator keeps state for: live ones, and deleted ones whose children are still going.",
    registry=REGISTRY,
)
QUEUE_DEPTH = Gauge("lmi_operator_queue_depth", "Keys waiting or in flight.", registry=REGISTRY)
LEADER = Gauge("lmi_operator_leader", "1 while this replica holds the Lease.", registry=REGISTRY)


def serve(port: int) -> None:
    """Expose /metrics on `port` in a background thread."""
    start_http_server(port, addr="0.0.0.0", registry=REGISTRY)
