"""Status from observed state: what the Deployment, its Pods and the spec say, as conditions.

Pure: the handler gathers the objects, this module decides. Conditions follow Kubernetes and kstatus
conventions: Ready, Progressing and Degraded for people and Argo CD; Reconciling and Stalled
(abnormal-true) for kstatus, hence Flux and `kubectl wait`. Advisories (BatchSizeDefaulted) are
conditions of their own, present only while they apply: they tell a person about a setting and never
change whether the model is Ready."""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lmi_operator.adapter_status import AdapterReport
from lmi_operator.api import FIRST_CLASS_OPTIONS, LMI_DEFAULT_BATCH_SIZE, EngineMode
from lmi_operator.fit_status import INSUFFICIENT_GPU_MEMORY, FitReport
from lmi_operator.group_status import crash_message, group_ready, ready_groups, shortage_message
from lmi_operator.render import CONFIG_HASH, template_of
from lmi_operator.render_cache import FETCH_CONTAINER
from lmi_operator.render_lws import LWS_KIND
from lmi_runtime.errors import ERROR_PREFIX
from lmi_runtime.options import EXIT_DOWNLOAD_FAILED, EXIT_DOWNLOAD_STALLED, PORT

READY, PROGRESSING, DEGRADED, RECONCILING, STALLED = (
    "Ready",
    "Progressing",
    "Degraded",
    "Reconciling",
    "Stalled",
)
# Advisory, abnormal-true: the spec leaves the batch size at LMI's async-mode default.
BATCH_SIZE_DEFAULTED = "BatchSizeDefaulted"
CONDITION_TYPES = (READY, PROGRESSING, DEGRADED, RECONCILING, STALLED, BATCH_SIZE_DEFAULTED)

# Reasons: Ready/Progressing and the problems that put Degraded (and Stalled) to True.
AVAILABLE = "Available"
ROLLOUT_IN_PROGRESS = "RolloutInProgress"
# The spec changed and the Deployment rendered from it is not live yet.
APPLYING = "Applying"
INSUFFICIENT_GPU = "InsufficientGPU"
IMAGE_PULL_FAILED = "ImagePullFailed"
CRASH_LOOP = "CrashLoop"
OOM_KILLED = "OOMKilled"
MISSING_SECRET = "MissingSecret"
STARTUP_TIMEOUT = "StartupTimeout"
INVALID_SPEC = "InvalidSpec"
# The spec needs an API the cluster does not serve (LeaderWorkerSet for a replica across nodes).
MISSING_PREREQUISITE = "MissingPrerequisite"
# A pod of a replica across nodes failed, and LeaderWorkerSet recreates its whole group.
WORKER_CRASHED = "WorkerCrashed"
# The init container could not fetch the model or an adapter into the cache, or its download stalled.
DOWNLOAD_FAILED = "DownloadFailed"
DOWNLOAD_STALLED = "DownloadStalled"
PROBLEM_REASONS = (
    INVALID_SPEC,
    MISSING_PREREQUISITE,
    INSUFFICIENT_GPU_MEMORY,
    MISSING_SECRET,
    INSUFFICIENT_GPU,
    IMAGE_PULL_FAILED,
    DOWNLOAD_FAILED,
    DOWNLOAD_STALLED,
    OOM_KILLED,
    WORKER_CRASHED,
    CRASH_LOOP,
    STARTUP_TIMEOUT,
)
# Reason of BatchSizeDefaulted: async mode without a batch size runs at LMI's default.
LMI_ASYNC_DEFAULT = "LMIAsyncDefault"
# The spec field that sets the batch size (max_num_seqs); engine.options and OPTION_* env may not.
BATCH_SIZE_FIELD = "spec." + FIRST_CLASS_OPTIONS["max_rolling_batch_size"]
# LMI keeps async mode's batch size small for fidelity; measured on an H200 (vLLM 0.26, an 8B model)
# async mode at 32 did 5.2-5.7k tokens/s where the engine did 15.7k at 256.
ASYNC_DEFAULT_MESSAGE = (
    f"async mode with LMI's default max_rolling_batch_size {LMI_DEFAULT_BATCH_SIZE['async']}; "
    "vLLM's engine reaches about 3x the throughput at 256 on an H200; "
    f"set {BATCH_SIZE_FIELD} to raise it"
)

# Exit statuses of the init container `lmi-runtime fetch` (model_store) and what they mean.
_DOWNLOAD_EXITS = {EXIT_DOWNLOAD_FAILED: DOWNLOAD_FAILED, EXIT_DOWNLOAD_STALLED: DOWNLOAD_STALLED}
_IMAGE_PULL = {"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull"}
# The most of a crashed container's termination message a condition quotes: one line a person acts
# on, not the whole log tail (FallbackToLogsOnError puts up to 80 lines there).
LAST_WORDS_CHARS = 512


@dataclass(frozen=True)
class Problem:
    """Something that keeps the model from serving, with a message that names what to fix."""

    reason: str
    message: str


@dataclass(frozen=True)
class Observed:
    """Everything the status is derived from, gathered by the handler."""

    name: str
    namespace: str
    generation: int
    desired_replicas: int
    gpus_per_replica: int
    gpu_resource: str
    startup_timeout_seconds: int
    # The live workloads of the model by name: one Deployment, one per profile (render), or one
    # LeaderWorkerSet when a replica spans nodes.
    deployments: Mapping[str, Mapping[str, Any]]
    # The Deployment generation whose rollout counts, by name: the one the operator last applied.
    # Changes by others that bump the generation without touching the template do not count.
    deployment_generations: Mapping[str, int] = field(default_factory=dict)
    pods: Sequence[Mapping[str, Any]] = ()
    invalid_spec: str | None = None
    free_gpus_by_node: Mapping[str, int] | None = None
    # The most GPUs one node has (allocatable), counted with free_gpus_by_node.
    largest_node_gpus: int | None = None
    engine_options: Mapping[str, str] = field(default_factory=dict)
    selector: str = ""
    # The config hash of each Deployment rendered from this generation's spec, by name: until every
    # one exists and its pod template carries it, this generation is not applied and cannot be Ready
    # (empty: the spec could not be rendered).
    config_hashes: Mapping[str, str] = field(default_factory=dict)
    # The spec's engine.mode and engine.maxRollingBatchSize as written (None: unset, LMI's default of
    # the mode applies); the mode is None when the spec could not be read or applied.
    engine_mode: EngineMode | None = None
    max_rolling_batch_size: int | None = None
    # status.startup as `replica_phases` makes it (None: no pods, or the spec could not be read).
    startup: Mapping[str, Any] | None = None
    # With LoRA: the declared adapters judged from the replicas' answers (adapter_status).
    adapters: AdapterReport | None = None
    # With GPUs: whether the model fits them (fit_status); None for a CPU model or an unread spec.
    fit: FitReport | None = None
    # With spec.profiles: status.profile and status.profiles (profile_check.profile_status).
    profiles: Mapping[str, Any] | None = None
    # Pods of one replica (spec.resources.nodes): above 1, a replica is a LeaderWorkerSet group.
    nodes_per_replica: int = 1
    # The last failed pod seen of each group not whole and Ready since, by group index (cache).
    group_failures: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    # Why the spec cannot be applied in this cluster (an API it needs is not served), if it cannot.
    missing_prerequisite: str | None = None
    now: datetime.datetime = field(default_factory=lambda: datetime.datetime.now(datetime.UTC))


def parse_time(value: str | None) -> datetime.datetime | None:
    """A Kubernetes timestamp (RFC 3339, whole seconds, UTC), or None."""
    if not value:
        return None
    return datetime.datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.UTC)


def rfc3339(ts: datetime.datetime) -> str:
    """A timestamp as Kubernetes writes them."""
    return ts.strftime("%Y-%m-%dT%H:%M:%SZ")


def _container_statuses(pod: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    status = pod.get("status", {})
    statuses: list[Mapping[str, Any]] = status.get("initContainerStatuses", []) + status.get(
        "containerStatuses", []
    )
    return statuses


def _insufficient_gpu(obs: Observed, pod: Mapping[str, Any]) -> Problem | None:
    for cond in pod.get("status", {}).get("conditions", []):
        if cond.get("type") != "PodScheduled" or cond.get("reason") != "Unschedulable":
            continue
        message = str(cond.get("message", ""))
        if f"Insufficient {obs.gpu_resource}" not in message:
            return None
        if obs.nodes_per_replica > 1:
            needed = shortage_message(
                obs.gpus_per_replica, obs.nodes_per_replica, obs.gpu_resource, obs.free_gpus_by_node
            )
            return Problem(INSUFFICIENT_GPU, f"{needed}; scheduler: {message}")
        free = ""
        if obs.free_gpus_by_node is not None:
            best = max(obs.free_gpus_by_node.values(), default=0)
            nodes = ", ".join(f"{n}={c}" for n, c in sorted(obs.free_gpus_by_node.items()))
            free = f"; at most {best} free on one node ({nodes or 'no GPU nodes'})"
        if obs.largest_node_gpus is not None and obs.gpus_per_replica > obs.largest_node_gpus:
            free += (
                f"; no node has {obs.gpus_per_replica} (the most is {obs.largest_node_gpus}): a replica "
                "larger than one node needs spec.resources.nodes (docs/multi-node.md)"
            )
        return Problem(
            INSUFFICIENT_GPU,
            f"requested {obs.gpus_per_replica} {obs.gpu_resource} per replica{free}; scheduler: {message}",
        )
    return None


def last_words(message: str) -> str:
    """The line of a termination message that says why the container stopped: the runtime's own
    one-line error when the log tail holds one, else the last line (a traceback's exception),
    cut to LAST_WORDS_CHARS."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith(ERROR_PREFIX)]
    line = (errors or lines or [""])[-1]
    return line if len(line) <= LAST_WORDS_CHARS else line[: LAST_WORDS_CHARS - 3] + "..."


def _termination(terminated: Mapping[str, Any]) -> str:
    """How a container last stopped: exit code, kubelet's reason and its last words."""
    text = f"last exit: code {terminated.get('exitCode', '?')}, {terminated.get('reason', 'unknown reason')}"
    words = last_words(str(terminated.get("message", "")))
    return f"{text}: {words}" if words else text


def _ran_seconds(terminated: Mapping[str, Any]) -> int | None:
    started, finished = parse_time(terminated.get("startedAt")), parse_time(terminated.get("finishedAt"))
    if started is None or finished is None or terminated.get("reason") == "OOMKilled":
        return None
    return int((finished - started).total_seconds())


def pod_problem(obs: Observed, pod: Mapping[str, Any]) -> Problem | None:
    """What is wrong with one pod, if anything, most actionable first."""
    if problem := _insufficient_gpu(obs, pod):
        return problem
    pod_name = pod.get("metadata", {}).get("name", "?")
    for cs in _container_statuses(pod):
        waiting = cs.get("state", {}).get("waiting") or {}
        reason = waiting.get("reason", "")
        detail = waiting.get("message", "")
        if reason in _IMAGE_PULL:
            return Problem(
                IMAGE_PULL_FAILED, f"pod {pod_name}: image {cs.get('image')}: {reason} {detail}".strip()
            )
        if reason == "CreateContainerConfigError" and "secret" in detail.lower():
            # The kubelet's word (the operator reads no Secret): 'secret "x" not found' or
            # "couldn't find key k in Secret ns/x".
            return Problem(
                MISSING_SECRET,
                f"pod {pod_name}: {detail} (a Secret the spec names: spec.model.hfTokenSecretRef, "
                "spec.model.s3.credentialsSecretRef or spec.env)",
            )
        terminated = cs.get("state", {}).get("terminated") or cs.get("lastState", {}).get("terminated") or {}
        if cs.get("name") == FETCH_CONTAINER and terminated.get("exitCode") in _DOWNLOAD_EXITS:
            return Problem(
                _DOWNLOAD_EXITS[terminated["exitCode"]],
                f"pod {pod_name}: {last_words(str(terminated.get('message', '')))} "
                f"(attempts: {cs.get('restartCount', 0) + 1})",
            )
        if (ran := _ran_seconds(terminated)) is not None and ran >= obs.startup_timeout_seconds:
            # The kubelet stops a container whose start outlasts the startup probe's budget: a last
            # run that long, never ready, was that stop (not a crash), whatever its exit code.
            return Problem(
                STARTUP_TIMEOUT,
                f"pod {pod_name}: container {cs.get('name')} was restarted after {ran}s without becoming "
                f"ready, over spec.startup.timeoutSeconds={obs.startup_timeout_seconds} "
                f"(restarts: {cs.get('restartCount', 0)}); status.startup shows the phase it is in now",
            )
        if terminated.get("reason") == "OOMKilled":
            return Problem(
                OOM_KILLED,
                f"pod {pod_name}: container {cs.get('name')} was OOMKilled "
                f"(restarts: {cs.get('restartCount', 0)}, {_termination(terminated)}); "
                "raise spec.resources.memory",
            )
        if reason == "CrashLoopBackOff":
            return Problem(
                CRASH_LOOP,
                f"pod {pod_name}: container {cs.get('name')} is crash-looping "
                f"(restarts: {cs.get('restartCount', 0)}, {_termination(terminated)})",
            )
        started = parse_time((cs.get("state", {}).get("running") or {}).get("startedAt"))
        if started and not cs.get("ready") and not cs.get("started", False):
            loading = (obs.now - started).total_seconds()
            if loading > obs.startup_timeout_seconds:
                return Problem(
                    STARTUP_TIMEOUT,
                    f"pod {pod_name}: not ready after {int(loading)}s, over spec.startup.timeoutSeconds="
                    f"{obs.startup_timeout_seconds}",
                )
    return None


def spec_applied(obs: Observed) -> bool:
    """Whether every workload rendered from this generation exists with that pod template."""
    if not obs.config_hashes:
        return bool(obs.deployments)
    return all(
        name in obs.deployments
        and template_of(obs.deployments[name]).get("metadata", {}).get("annotations", {}).get(CONFIG_HASH)
        == wanted
        for name, wanted in obs.config_hashes.items()
    )


def _deployment_numbers(obs: Observed) -> tuple[int, int, int, int, bool]:
    """Replicas, ready, updated and available over the model's workloads, and whether each
    Deployment's controller has seen the generation the operator applied."""
    numbers = [0, 0, 0, 0]
    current = spec_applied(obs)
    for name, dep in obs.deployments.items():
        st = dep.get("status", {})
        if dep.get("kind") == LWS_KIND:
            # LeaderWorkerSet counts groups, without an observedGeneration to date its counts by: a
            # group is ready when every pod of it is and runs this generation's template, as the
            # pods show it now (the controller's count lags a pod's loss); available once ready
            # (there is no availableReplicas of its own).
            wanted = obs.config_hashes.get(name)
            ready = min(int(st.get("readyReplicas", 0)), ready_groups(obs.pods, wanted))
            counts = (int(st.get("replicas", 0)), ready, int(st.get("updatedReplicas", 0)), ready)
        else:
            needed = obs.deployment_generations.get(name) or dep.get("metadata", {}).get("generation", 1)
            current = current and st.get("observedGeneration", 0) >= needed
            counts = (
                int(st.get("replicas", 0)),
                int(st.get("readyReplicas", 0)),
                int(st.get("updatedReplicas", 0)),
                int(st.get("availableReplicas", 0)),
            )
        numbers = [n + c for n, c in zip(numbers, counts, strict=True)]
    return numbers[0], numbers[1], numbers[2], numbers[3], bool(current)


def problem_of(obs: Observed) -> Problem | None:
    """The most important reason the model cannot serve as specified, if there is one."""
    if obs.invalid_spec:
        return Problem(INVALID_SPEC, obs.invalid_spec)
    if obs.missing_prerequisite:
        return Problem(MISSING_PREREQUISITE, obs.missing_prerequisite)
    if obs.fit is not None and obs.fit.insufficient:
        return Problem(INSUFFICIENT_GPU_MEMORY, str(obs.fit.condition["message"]))
    problems = [p for pod in obs.pods if (p := pod_problem(obs, pod))]
    problems += [
        Problem(WORKER_CRASHED, message)
        for group, pod in sorted(obs.group_failures.items())
        if not group_ready(obs.pods, group) and (message := crash_message(pod, _termination))
    ]
    if not problems:
        return None
    return min(problems, key=lambda p: PROBLEM_REASONS.index(p.reason))


def _condition(ctype: str, status: bool, reason: str, message: str) -> dict[str, str]:
    return {"type": ctype, "status": "True" if status else "False", "reason": reason, "message": message}


def advisories(obs: Observed) -> list[dict[str, str]]:
    """The advisory conditions that apply to the spec (without timestamps); each is left out, and so
    removed from the status, once the spec no longer calls for it."""
    if obs.engine_mode == "async" and obs.max_rolling_batch_size is None:
        return [_condition(BATCH_SIZE_DEFAULTED, True, LMI_ASYNC_DEFAULT, ASYNC_DEFAULT_MESSAGE)]
    return []


def conditions_for(obs: Observed) -> list[dict[str, str]]:
    """The five health conditions, AdaptersReady with LoRA, FitsGPUMemory with GPUs, then the
    advisories (without timestamps), for what was observed."""
    replicas, ready, updated, available, current = _deployment_numbers(obs)
    desired = obs.desired_replicas
    problem = problem_of(obs)
    rolled_out = bool(obs.deployments) and current and updated >= desired and replicas == updated
    # An invalid spec (or one the cluster cannot run) was not applied: what runs serves an older
    # generation, not this one.
    applied = problem is None or problem.reason not in (INVALID_SPEC, MISSING_PREREQUISITE)
    serving = applied and rolled_out and available >= desired and ready >= desired

    progress_reason = ROLLOUT_IN_PROGRESS
    workload = LWS_KIND if obs.nodes_per_replica > 1 else "Deployment"
    if problem is not None and problem.reason == INVALID_SPEC:
        progress_msg = "spec not applied: fix the spec"
    elif not obs.deployments and obs.fit is not None and obs.fit.inspecting:
        progress_msg = f"inspecting the model: {obs.fit.condition['message']}"
    elif not obs.deployments:
        progress_msg = f"creating the {workload}"
    elif not spec_applied(obs):
        progress_reason, progress_msg = APPLYING, f"applying generation {obs.generation} to the {workload}"
    else:
        progress_msg = f"{updated}/{desired} replicas updated, {available}/{desired} available" + (
            f", {replicas - updated} old replicas terminating" if replicas > updated else ""
        )

    if serving:
        ready_c = _condition(READY, True, AVAILABLE, f"{ready}/{desired} replicas ready")
    elif problem is not None:
        ready_c = _condition(READY, False, problem.reason, problem.message)
    else:
        ready_c = _condition(READY, False, progress_reason, progress_msg)

    progressing = not serving and problem is None
    progressing_c = _condition(
        PROGRESSING,
        progressing,
        progress_reason if progressing else (problem.reason if problem else AVAILABLE),
        progress_msg if progressing else (problem.message if problem else "rollout complete"),
    )
    degraded_c = _condition(
        DEGRADED,
        problem is not None,
        problem.reason if problem else AVAILABLE,
        problem.message if problem else "no problems observed",
    )
    return [
        ready_c,
        progressing_c,
        degraded_c,
        _condition(RECONCILING, progressing, progressing_c["reason"], progressing_c["message"]),
        # Serving but degraded (say, a Secret deleted under running pods) is not a failed rollout.
        _condition(STALLED, problem is not None and not serving, degraded_c["reason"], degraded_c["message"]),
        *([dict(obs.adapters.condition)] if obs.adapters is not None else []),
        *([dict(obs.fit.condition)] if obs.fit is not None else []),
        *advisories(obs),
    ]


# The status schema caps each engineOptions value at 4096 bytes; a longer value (a big
# speculative_config) is shown cut, or the whole status write would be refused.
OPTION_VALUE_BYTES = 4096


def _fit(value: str) -> str:
    raw = value.encode()
    if len(raw) <= OPTION_VALUE_BYTES:
        return value
    return raw[: OPTION_VALUE_BYTES - 16].decode(errors="ignore") + "...(truncated)"


def build_status(obs: Observed, previous: Mapping[str, Any] | None) -> dict[str, Any]:
    """The complete status object; lastTransitionTime is kept from `previous` when a condition's
    status did not change, so that an unchanged world yields an identical status (and no write)."""
    before = {c.get("type"): c for c in (previous or {}).get("conditions", [])}
    conditions = []
    for cond in conditions_for(obs):
        old = before.get(cond["type"])
        changed = old is None or old.get("status") != cond["status"]
        stamp = rfc3339(obs.now) if changed or not old else old.get("lastTransitionTime", rfc3339(obs.now))
        conditions.append(cond | {"lastTransitionTime": stamp, "observedGeneration": obs.generation})
    replicas, ready, _, _, _ = _deployment_numbers(obs)
    return (
        {
            "observedGeneration": obs.generation,
            "replicas": replicas,
            "readyReplicas": ready,
            "ready": f"{ready}/{obs.desired_replicas}",
            "selector": obs.selector,
            "endpoint": f"http://{obs.name}.{obs.namespace}.svc.cluster.local:{PORT}",
            "conditions": conditions,
        }
        # Left out rather than empty (an unread or unapplied spec): applied over the options written
        # before, an empty map would become null, which the schema refuses.
        | (
            {"engineOptions": {k: _fit(v) for k, v in sorted(obs.engine_options.items())}}
            if obs.engine_options
            else {}
        )
        | ({"startup": dict(obs.startup)} if obs.startup is not None else {})
        | (
            {"adapters": obs.adapters.adapters, "adaptersLoaded": obs.adapters.loaded}
            if obs.adapters is not None
            else {}
        )
        | ({"modelFacts": dict(obs.fit.facts)} if obs.fit is not None and obs.fit.facts is not None else {})
        | (dict(obs.profiles) if obs.profiles is not None else {})
    )
