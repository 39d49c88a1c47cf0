"""How many replicas each GPU profile of a model asks for (spec.profiles), decided from counts alone.

Each profile (a GPU type with the settings that suit it, in preference order) has a Deployment. The
caller observes per profile whether the model fits its GPU (the memory estimate), how many more
replicas the free GPUs of its nodes hold, and how many replicas its Deployment asks for, has bound to
nodes and has ready; `plan_profiles` answers how many each Deployment should ask for now.

The ideal placement fills the profiles in order. A profile whose GPU cannot hold the model takes
none; one that can takes up to the replicas it has bound to nodes (they keep their GPUs) plus those
its free GPUs hold. Replicas that no profile has free GPUs for go to the first profile that fits,
where they wait (Pending) for GPUs: a fallback with room would have taken them already, and the
preferred type is where a replica should start once GPUs free up there (or a cluster autoscaler adds
a node of that type). With no profile that fits, every profile gets none and the plan says so.

The replicas asked for move toward the ideal without the ready replicas dropping below the desired
count, so that replicas on a fallback move back to the preferred type without a dip:
- a profile at or below its ideal is raised to it at once, so new replicas start on the preferred
  type while the fallback ones keep serving;
- a profile above its ideal drops at once its replicas that are not bound to a node (a Deployment
  scaled down deletes unscheduled pods first, then not-ready ones, then ready ones), which serve
  nothing and might never start; it keeps its bound ones, which serve or are about to;
- then profiles above their ideal give up bound replicas, least preferred first, only as far as the
  ready replicas kept exceed the desired count: each replica given up is counted as a ready one lost,
  so the ready count stays at or above the desired one whichever pods the Deployment deletes.
Iterated as new replicas become ready, this reaches the ideal.

The planner treats profiles as selecting separate nodes: where two profiles' nodes overlap, the
caller's free counts overlap too. Pure: no I/O, no Kubernetes objects.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

# Why a profile asks for what it does (for the status):
# Placed: the ideal puts replicas here and its GPUs hold them.
# WaitingForGPUs: the ideal puts replicas here beyond what its GPUs hold (no profile had room for them).
# Draining: more replicas than the ideal, kept serving until replicas elsewhere are ready.
# NotNeeded: profiles before it hold every replica.
# NoFreeGPUs: replicas are still to place but its nodes have no free GPUs for one.
# InsufficientGPUMemory: the model does not fit its GPU.
ProfileReason = Literal[
    "Placed", "WaitingForGPUs", "Draining", "NotNeeded", "NoFreeGPUs", "InsufficientGPUMemory"
]


@dataclass(frozen=True)
class ProfileObservation:
    """What the caller sees of one profile; counts are replicas (pods), never negative.

    `free_slots`: replicas the nodes matching the profile could still take, the sum over those nodes
    of free GPUs // GPUs per replica, not counting GPUs held by this model's own pods. `current`: the
    replicas its Deployment asks for; `scheduled`: its pods bound to a node (they hold their GPUs);
    `ready`: its ready pods."""

    name: str
    fits: bool
    free_slots: int
    current: int = 0
    scheduled: int = 0
    ready: int = 0


@dataclass(frozen=True)
class ProfileTarget:
    """What one profile's Deployment should ask for now (`replicas`), the ideal it moves toward and why."""

    name: str
    replicas: int
    ideal: int
    reason: ProfileReason


@dataclass(frozen=True)
class ProfilePlan:
    """The targets of every profile, in preference order. `active` is the most preferred profile the
    ideal places replicas on (the chosen profile the status reports), None when it places none;
    `insufficient_memory` says that the model fits no profile's GPU."""

    targets: tuple[ProfileTarget, ...]
    active: str | None
    insufficient_memory: bool

    def replicas(self) -> dict[str, int]:
        """Replicas to ask for by profile name."""
        return {target.name: target.replicas for target in self.targets}


def plan_profiles(desired: int, observed: Sequence[ProfileObservation]) -> ProfilePlan:
    """The replicas each profile asks for now, for `desired` replicas over `observed` (most preferred
    first); see the module's docstring for the rules."""
    if not any(profile.fits for profile in observed):
        targets = tuple(ProfileTarget(p.name, 0, 0, "InsufficientGPUMemory") for p in observed)
        return ProfilePlan(targets, None, insufficient_memory=True)
    ideal, reasons = _ideal(desired, observed)
    replicas = _toward(desired, observed, ideal)
    targets = tuple(
        ProfileTarget(p.name, n, i, "Draining" if n > i else reason)
        for p, n, i, reason in zip(observed, replicas, ideal, reasons, strict=True)
    )
    active = next((p.name for p, i in zip(observed, ideal, strict=True) if i > 0), None)
    return ProfilePlan(targets, active, insufficient_memory=False)


def _ideal(desired: int, observed: Sequence[ProfileObservation]) -> tuple[list[int], list[ProfileReason]]:
    """The ideal replicas per profile and why; at least one profile fits."""
    left = desired
    ideal: list[int] = []
    reasons: list[ProfileReason] = []
    for profile in observed:
        room = profile.scheduled + profile.free_slots if profile.fits else 0
        take = min(left, room)
        ideal.append(take)
        if not profile.fits:
            reasons.append("InsufficientGPUMemory")
        elif take > 0:
            reasons.append("Placed")
        else:
            reasons.append("NoFreeGPUs" if left > 0 else "NotNeeded")
        left -= take
    if left > 0:
        first_fit = next(i for i, profile in enumerate(observed) if profile.fits)
        ideal[first_fit] += left
        reasons[first_fit] = "WaitingForGPUs"
    return ideal, reasons


def _toward(desired: int, observed: Sequence[ProfileObservation], ideal: list[int]) -> list[int]:
    """The replicas to ask for now on the way from `current` to `ideal`, never below the ideal."""
    # Raise at once; above the ideal, drop the pods not bound to a node.
    replicas = [
        i if i >= p.current else max(i, min(p.current, p.scheduled))
        for p, i in zip(observed, ideal, strict=True)
    ]
    spare = sum(min(p.ready, n) for p, n in zip(observed, replicas, strict=True)) - desired
    for k in reversed(range(len(observed))):
        cut = min(replicas[k] - ideal[k], max(spare, 0))
        replicas[k] -= cut
        spare -= cut
    return replicas
