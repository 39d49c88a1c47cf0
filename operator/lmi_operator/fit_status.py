"""Whether a model fits the GPUs it may be scheduled on, judged before its Deployment exists.

The facts come from the inspection Job (render_inspect.py): its pod runs `lmi-runtime inspect
--message-file /dev/termination-log`, so the kubelet hands its one-line JSON document to the pod's
status, where the operator reads it without any other channel. Once recorded in status.modelFacts,
the facts stand for as long as spec.model.id and its revision stay the same.

The condition FitsGPUMemory says what was judged: True (Fits) with the headroom, False
(InsufficientGPUMemory: no GPU type the model may land on can hold it; no Deployment is created)
with the numbers and what would fit, Unknown while the model is inspected (Inspecting), when the
inspection failed (InspectionFailed: the model is deployed anyway, unjudged, and the message says
why) or when no node has GPUs to judge against (NoGPUNodes: node pools that scale from zero).
Pure."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from lmi_operator.capacity import Engine, estimate, explain, needs, short_of, what_fits
from lmi_runtime.model_facts import ModelFacts, ModelFactsError

FITS_GPU_MEMORY = "FitsGPUMemory"
FITS = "Fits"
INSUFFICIENT_GPU_MEMORY = "InsufficientGPUMemory"
INSPECTING = "Inspecting"
INSPECTION_FAILED = "InspectionFailed"
NO_GPU_NODES = "NoGPUNodes"
# Waiting reasons of the inspection's container that do not pass by themselves.
STUCK = frozenset({"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "CreateContainerConfigError"})


@dataclass(frozen=True)
class GpuType:
    """One GPU product of the nodes a model may be scheduled on."""

    product: str
    memory: int  # bytes of one GPU
    per_node: int  # the most GPUs one node of this product has


@dataclass(frozen=True)
class Inspection:
    """What the inspection says so far: the status.modelFacts document, or why there is none
    (`error` None and `facts` None: still running). `job_needed`: the model's own Job is the one
    that inspects it; False once the facts are in the model's status, and for a model whose source
    another model's Job inspects (until then the Job stays: it is the record of its result)."""

    facts: Mapping[str, Any] | None = None
    error: str | None = None
    job_needed: bool = True
    # Why a running inspection waits (its pod cannot be scheduled yet), for the Inspecting message.
    waiting: str | None = None


@dataclass(frozen=True)
class FitReport:
    """The judgement: the FitsGPUMemory condition (without timestamps), the facts for status, and
    whether the Deployment may be created; with spec.profiles, whether each profile may hold the
    model (`profile_fits`, by name: False only where it was judged not to fit)."""

    condition: Mapping[str, str]
    facts: Mapping[str, Any] | None
    deploy: bool
    keep_job: bool = True
    profile_fits: Mapping[str, bool] = field(default_factory=dict)

    @property
    def inspecting(self) -> bool:
        """Whether the inspection is still running."""
        return self.condition["reason"] == INSPECTING

    @property
    def insufficient(self) -> bool:
        """Whether the model fits none of the GPU types: Ready is False with this report's message."""
        return self.condition["reason"] == INSUFFICIENT_GPU_MEMORY


def _condition(status: str, reason: str, message: str) -> dict[str, str]:
    return {"type": FITS_GPU_MEMORY, "status": status, "reason": reason, "message": message}


def facts_of(document: Mapping[str, Any]) -> ModelFacts:
    """The facts of a status.modelFacts document (which also names its source and revision)."""
    return ModelFacts.from_status({k: v for k, v in document.items() if k not in ("source", "revision")})


def source_of(facts: Mapping[str, Any] | None) -> tuple[str, str | None] | None:
    """(source, revision) that a status.modelFacts document was read from."""
    if not facts:
        return None
    return str(facts.get("source", "")), facts.get("revision")


def inspection_of(
    job: Mapping[str, Any] | None, pods: list[Mapping[str, Any]], source: str, revision: str | None
) -> Inspection:
    """What the model's current inspection Job `job` and its `pods` say (a Job of another source is
    not theirs: the caller passes the Job named for this one, or None)."""
    if job is None:
        return Inspection()
    name = job["metadata"]["name"]
    # Unschedulable may pass by itself (a node short of CPU for now): the inspection waits, saying
    # why, until the scheduler places the pod or the Job's deadline fails it.
    unschedulable: str | None = None
    for pod in pods:
        if pod["metadata"].get("labels", {}).get("job-name") != name:
            continue
        status = pod.get("status", {})
        for cs in status.get("containerStatuses", []):
            if (terminated := cs.get("state", {}).get("terminated")) is not None:
                return read_message(str(terminated.get("message", "")), source, revision)
            waiting = cs.get("state", {}).get("waiting") or {}
            if waiting.get("reason") in STUCK:
                # It would wait out its deadline: the model is deployed now, and says why unjudged.
                reason, message = waiting["reason"], waiting.get("message", "")
                return Inspection(error=f"pod {pod['metadata']['name']}: {reason}: {message}".strip())
        for cond in status.get("conditions", []):
            if cond.get("type") == "PodScheduled" and cond.get("reason") == "Unschedulable":
                unschedulable = (
                    f"pod {pod['metadata']['name']} cannot be scheduled ({cond.get('message', '')}); "
                    "LMI_OPERATOR_INSPECTION_SCHEDULING (chart: operator.inspectionScheduling) places it"
                )
    for cond in job.get("status", {}).get("conditions", []):
        if cond.get("type") == "Failed" and cond.get("status") == "True":
            failed = f"Job {name}: {cond.get('reason')}: {cond.get('message', '')}".strip()
            return Inspection(error=f"{failed}; {unschedulable}" if unschedulable else failed)
    return Inspection(waiting=unschedulable)


def read_message(message: str, source: str, revision: str | None) -> Inspection:
    """The inspection pod's termination message: `{"facts": {...}, "source": ..., "revision": ...}`
    or `{"error": "...", "source": ...}` (lmi-runtime inspect --message-file)."""
    try:
        document = json.loads(message) if message.strip() else None
    except ValueError:
        document = None
    if not isinstance(document, dict):
        return Inspection(error="the inspection pod ended without its result in its termination message")
    if document.get("error"):
        return Inspection(error=str(document["error"]))
    facts = document.get("facts")
    if not isinstance(facts, dict):
        return Inspection(error="the inspection's result has no facts")
    try:
        facts_of(facts)
    except ModelFactsError as err:
        return Inspection(error=f"the inspection's result is unreadable: {err}")
    return Inspection(facts={"source": source, **({"revision": revision} if revision else {}), **facts})


def judge(inspection: Inspection, engine: Engine, gpus: list[GpuType], job: str) -> FitReport:
    """Judge the model's fit on each GPU type it may land on; the Deployment is held back only while
    the model is inspected and when it fits none of them."""
    keep = inspection.job_needed
    if inspection.facts is None:
        if inspection.error is not None:
            message = f"not judged: {inspection.error}; the Deployment is created without the check"
            return FitReport(_condition("Unknown", INSPECTION_FAILED, message), None, True, keep)
        message = f"Job {job} reads config.json and the safetensors headers; the Deployment waits for it"
        if inspection.waiting is not None:
            message += f": {inspection.waiting}"
        return FitReport(_condition("Unknown", INSPECTING, message), None, False, keep)
    facts = facts_of(inspection.facts)
    if not gpus:
        message = "no schedulable node with GPUs to judge against (node pools scaled to zero?)"
        return FitReport(_condition("Unknown", NO_GPU_NODES, message), inspection.facts, True, keep)
    verdicts = [(gpu, estimate(facts, engine, gpu.memory)) for gpu in sorted(gpus, key=lambda g: -g.memory)]
    fitting = [(gpu, est) for gpu, est in verdicts if est.fits]
    if fitting:
        gpu, est = fitting[0]
        message = explain(est, gpu.product, [])
        if short := [g.product for g, e in verdicts if not e.fits]:
            message += f"; does not fit {', '.join(short)}"
        return FitReport(_condition("True", FITS, message), inspection.facts, True, keep)
    # The need is the same on every GPU type; what each has and what would fit it differ.
    shorts = [
        short_of(est, gpu.product, what_fits(facts, engine, gpu.memory, gpu.per_node))
        for gpu, est in verdicts
    ]
    message = f"{needs(verdicts[0][1])}; {'; '.join(shorts)}"
    return FitReport(_condition("False", INSUFFICIENT_GPU_MEMORY, message), inspection.facts, False, keep)


def combine(reports: Mapping[str, FitReport]) -> FitReport:
    """One judgement of a model with profiles from each profile's (by name, in preference order):
    it fits where any profile fits, and does not where none does; each message is named by profile.
    The inspection is the same for all, so while it runs or when it failed, so does the model."""
    first = next(iter(reports.values()))
    if first.facts is None:
        return FitReport(first.condition, None, first.deploy, first.keep_job, {n: True for n in reports})
    fits = {name: r.condition["status"] != "False" for name, r in reports.items()}
    message = "; ".join(f"profile {name}: {r.condition['message']}" for name, r in reports.items())
    statuses = {r.condition["status"] for r in reports.values()}
    if "True" in statuses:
        condition = _condition("True", FITS, message)
    elif statuses == {"False"}:
        condition = _condition("False", INSUFFICIENT_GPU_MEMORY, f"no profile fits: {message}")
    else:
        condition = dict(next(r.condition for r in reports.values() if r.condition["status"] == "Unknown"))
        condition["message"] = message
    return FitReport(condition, first.facts, any(fits.values()), first.keep_job, fits)
