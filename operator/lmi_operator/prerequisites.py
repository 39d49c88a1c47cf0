"""Whether the cluster serves the APIs a spec needs: LeaderWorkerSet for a replica across nodes.

Asked of the API server's discovery (GET /apis/<group>/<version>) only when a model needs the API,
so that a cluster without LeaderWorkerSet runs every other model as before. An API found served is
remembered until an apply of it is answered 404 (its CRD removed since); one not served is asked
about again after MISSING_RECHECK_SECONDS, and the model waits
with a condition that names what to install (nothing of it is applied meanwhile). Once the CRD is
installed the model is applied without a restart: kopf's scan of the CRDs (handlers) starts the
LeaderWorkerSets' watch by itself. An operator watching a list of namespaces does not scan the CRDs,
so there an API missing at the first look stays missing until a restart, and the message says so."""

from __future__ import annotations

import time

from lmi_operator.api import LMIModelSpec
from lmi_operator.kube import PLURALS, KubeClient
from lmi_operator.render_lws import LWS_API_VERSION, LWS_KIND

LWS_PLURAL = PLURALS[LWS_API_VERSION, LWS_KIND]

MISSING_RECHECK_SECONDS = 10.0


def missing_lws_message(nodes: int, rescans: bool) -> str:
    """The condition's message when the cluster does not serve LeaderWorkerSet (`rescans`: whether
    this operator notices it once installed, else it must be restarted)."""
    then = (
        "the model is applied once it is served"
        if rescans
        else "then restart the operator: watching a list of namespaces, it sees new APIs at start-up only"
    )
    return (
        f"spec.resources.nodes {nodes} runs each replica as a LeaderWorkerSet group of {nodes} pods, and "
        f"this cluster does not serve {LWS_PLURAL}.{LWS_API_VERSION}: install LeaderWorkerSet "
        f"(v0.8.0 or later, docs/multi-node.md); {then}"
    )


class Prerequisites:
    """The APIs the cluster serves, as far as the models asked."""

    def __init__(self, client: KubeClient, rescans: bool = True) -> None:
        self.client = client
        # Whether an API installed later is watched (kopf scans the CRDs: handlers); if not, an API
        # found missing stays missing for this process, as its watch would.
        self.rescans = rescans
        self._served: set[tuple[str, str]] = set()
        # When an API found missing may be asked about again (time.monotonic()).
        self._missing_until: dict[tuple[str, str], float] = {}

    async def served(self, api_version: str, plural: str) -> bool:
        """Whether the API server serves `plural` in `api_version` (a group/version)."""
        api = (api_version, plural)
        if api in self._served:
            return True
        if time.monotonic() < self._missing_until.get(api, 0.0):
            return False
        resources = await self.client.get(f"/apis/{api_version}")
        if resources is not None and any(r.get("name") == plural for r in resources.get("resources", [])):
            self._served.add(api)
            self._missing_until.pop(api, None)
            return True
        self._missing_until[api] = (
            time.monotonic() + MISSING_RECHECK_SECONDS if self.rescans else float("inf")
        )
        return False

    def not_served(self, api_version: str, plural: str) -> None:
        """The API server answered 404 for `plural` in `api_version`: its CRD was removed since it was
        found served. Asked about again at the next look."""
        self._served.discard((api_version, plural))

    async def missing(self, spec: LMIModelSpec) -> str | None:
        """Why `spec` cannot be applied in this cluster, or None when everything it needs is served."""
        if spec.resources.nodes > 1 and not await self.served(LWS_API_VERSION, LWS_PLURAL):
            return missing_lws_message(spec.resources.nodes, self.rescans)
        return None
