"""Judging the declared adapters from what each ready replica's management port said (pure).

An adapter counts as loaded on a replica when the replica reports it Loaded from the declared
source; AdaptersReady holds when every declared adapter is loaded on every ready replica. A replica
not asked yet counts as loading; one that did not answer counts as not loaded, with reason
Unreachable."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

ADAPTERS_READY = "AdaptersReady"
ALL_LOADED = "AllLoaded"
LOADING = "Loading"
ADAPTER_FAILED = "AdapterFailed"
NO_READY_REPLICAS = "NoReadyReplicas"
UNREACHABLE = "Unreachable"

LOADED = "Loaded"  # the runtime's state of a loaded adapter (lmi_runtime.adapter_set.LOADED)
MESSAGE_CHARS = 1024
NO_ANSWER = "the management port did not answer, or refused the operator's signature"

# A replica's answer: its GET /lmi/adapters document, or UNANSWERED.
Answer = Mapping[str, Any]
UNANSWERED: Answer = {}


@dataclass(frozen=True)
class AdapterReport:
    """What was judged: status.adapters, status.adaptersLoaded and the AdaptersReady condition."""

    adapters: list[dict[str, Any]] = field(default_factory=list)
    loaded: str = "0/0"
    condition: dict[str, str] = field(default_factory=dict)

    @property
    def converged(self) -> bool:
        """Whether AdaptersReady holds."""
        return self.condition.get("status") == "True"

    @property
    def failed(self) -> bool:
        """Whether a replica failed to load an adapter or did not answer (retrying soon will not help)."""
        return self.condition.get("reason") == ADAPTER_FAILED


def needs_update(declared: Mapping[str, str], answer: Answer) -> bool:
    """Whether a replica must be sent the declared set: it serves another set, or one of the
    declared adapters is not loaded from its source there (a failed one is retried)."""
    served = {a.get("name"): a for a in answer.get("adapters", []) if isinstance(a, Mapping)}
    return set(served) != set(declared) or any(
        served[name].get("source") != source or served[name].get("state") != LOADED
        for name, source in declared.items()
    )


def _cut(text: str) -> str:
    return text if len(text) <= MESSAGE_CHARS else text[: MESSAGE_CHARS - 3] + "..."


def judge(
    declared: Mapping[str, str], ready_pods: Sequence[str], answers: Mapping[str, Answer | None]
) -> AdapterReport:
    """status.adapters and AdaptersReady for `declared` {name: source} over the ready replicas,
    given each one's last answer (None: not asked yet; UNANSWERED: it did not answer)."""
    total = len(ready_pods)
    if total == 0:
        # Nothing is served yet, so no rows: each row costs the API server on every status write
        # while the pods start (bench/operator_scale.py); adaptersLoaded still counts the declared.
        no_replica = _condition(False, NO_READY_REPLICAS, "no ready replica to load adapters on")
        return AdapterReport([], f"0/{len(declared)}", no_replica)
    rows: list[dict[str, Any]] = []
    failures: list[str] = []
    everywhere = 0
    # A replica that did not answer is named once, in the condition, not in every adapter's row.
    silent = [pod for pod in sorted(ready_pods) if answers.get(pod) is not None and not answers[pod]]
    for name, source in sorted(declared.items()):
        loaded = 0
        why: tuple[str, str] | None = None
        for pod in sorted(ready_pods):
            answer = answers.get(pod)
            if not answer:  # not asked yet, or UNANSWERED
                continue
            state = next((a for a in answer.get("adapters", []) if a.get("name") == name), None)
            if state is not None and state.get("source") == source and state.get("state") == LOADED:
                loaded += 1
            elif state is not None and state.get("source") == source and state.get("reason"):
                why = (str(state["reason"]), f"pod {pod}: {state.get('message', '')}")
        row: dict[str, Any] = {"name": name, "source": source, "loaded": f"{loaded}/{total}"}
        if why is not None:
            row |= {"reason": why[0], "message": _cut(why[1])}
            failures.append(f"{name}: {why[0]} ({why[1]})")
        elif silent and loaded < total:
            row["reason"] = UNREACHABLE
        everywhere += loaded == total
        rows.append(row)
    failures += [f"pod {pod}: {NO_ANSWER}" for pod in silent]
    summary = f"{everywhere}/{len(declared)}"
    if everywhere == len(declared):
        condition = _condition(True, ALL_LOADED, f"{len(declared)} adapters loaded on {total} ready replicas")
    elif failures:
        condition = _condition(False, ADAPTER_FAILED, _cut("; ".join(failures)))
    else:
        pending = [f"{r['name']} on {r['loaded']}" for r in rows if r["loaded"] != f"{total}/{total}"]
        condition = _condition(False, LOADING, _cut("loading: " + ", ".join(pending)))
    return AdapterReport(rows, summary, condition)


def _condition(status: bool, reason: str, message: str) -> dict[str, str]:
    return {
        "type": ADAPTERS_READY,
        "status": "True" if status else "False",
        "reason": reason,
        "message": message,
    }
