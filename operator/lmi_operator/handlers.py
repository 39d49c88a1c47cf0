"""kopf glue: watch LMIModels and their children, and hand every event to the Reconciler.

Only low-level handlers (on.event) that return None: kopf then writes nothing on the objects (no
diff-base or progress annotations, no finalizers), which keeps a no-op resync at zero writes. The
handlers are coroutines so that kopf calls them on its event loop, where the Reconciler's queues live
(kopf runs plain functions in a thread pool, one hop per event, and asyncio queues are not
thread-safe)."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from typing import Any

import kopf

from lmi_operator.api import GROUP, PLURAL, VERSION
from lmi_operator.kube import Credentials, client_session
from lmi_operator.reconciler import Reconciler
from lmi_operator.render import MANAGED_SELECTOR

# The children watched, (group, version, plural) -> kind; "" is the core group.
CHILDREN: dict[tuple[str, str, str], str] = {
    ("", "v1", "configmaps"): "ConfigMap",
    ("", "v1", "services"): "Service",
    ("apps", "v1", "deployments"): "Deployment",
    ("policy", "v1", "poddisruptionbudgets"): "PodDisruptionBudget",
    ("autoscaling", "v2", "horizontalpodautoscalers"): "HorizontalPodAutoscaler",
    ("", "v1", "persistentvolumeclaims"): "PersistentVolumeClaim",
    ("batch", "v1", "jobs"): "Job",
    # Served only where LeaderWorkerSet is installed: kopf watches it once its CRD is there.
    ("leaderworkerset.x-k8s.io", "v1", "leaderworkersets"): "LeaderWorkerSet",
}


class RetryForever:
    """kopf's request backoffs: 1, 1, 2, 3 s, then every 5 s without end.

    kopf gives up on a request after its last backoff and the watcher of that resource ends for good
    while the process lives on (nolar/kopf#1276): after an API outage longer than the backoffs, the
    children's changes were no longer seen. Retrying like client-go's reflectors do, with short
    steps, also resumes the watches within seconds of the API's return. Re-iterable and unsized, so
    that every request starts its own sequence and kopf sets no attempt limit.
    """

    def __iter__(self) -> Iterator[float]:
        return itertools.chain((1.0, 1.0, 2.0, 3.0), itertools.repeat(5.0))


def _object(event: Any, kind: str | None = None) -> tuple[dict[str, Any], bool, bool]:
    """The object, whether it was deleted, and whether it came from a (re-)list (kopf's type None)."""
    obj: dict[str, Any] = event["object"]
    if kind is not None:
        # Watch events of the core group omit kind on some paths; the reconciler keys on it.
        obj.setdefault("kind", kind)
    return obj, event.get("type") == "DELETED", event.get("type") is None


def build(reconciler: Reconciler, creds: Credentials) -> tuple[kopf.OperatorRegistry, kopf.OperatorSettings]:
    """A kopf registry with the operator's handlers, and kopf settings that keep it quiet."""
    registry = kopf.OperatorRegistry()

    @kopf.on.login(registry=registry)
    async def login(**_: Any) -> kopf.AiohttpSession:
        # kopf's watches use the operator's own session set-up (TLS with tls-server-name, proxy),
        # which kopf's ConnectionInfo cannot express. kopf logs in again after a 401, which reads
        # the token again (a rotated ServiceAccount token, an exec plugin's expired one).
        token = creds.bearer()
        return kopf.AiohttpSession(
            server=creds.server,
            default_namespace=creds.namespace,
            aiohttp_session=client_session(
                creds, headers={"Authorization": f"Bearer {token}"} if token else None, limit=0
            ),
        )

    @kopf.on.event(GROUP, VERSION, PLURAL, registry=registry)
    async def model_event(event: Any, **_: Any) -> None:
        reconciler.cache.observe_model(*_object(event))

    for (group, version, plural), kind in CHILDREN.items():

        async def child_event(event: Any, _kind: str = kind, **_: Any) -> None:
            reconciler.cache.observe_child(*_object(event, _kind))

        kopf.on.event(group, version, plural, registry=registry, id=f"{plural}-event")(child_event)

    @kopf.on.event("", "v1", "pods", registry=registry)
    async def pod_event(event: Any, **_: Any) -> None:
        reconciler.cache.observe_pod(*_object(event, "Pod"))

    kopf_settings = kopf.OperatorSettings()
    # Watch only our children, filtered by the API server rather than in this process.
    for _, _, plural in (*CHILDREN, ("", "v1", "pods")):
        kopf_settings.watching.label_selectors[plural] = MANAGED_SELECTOR
    # Cluster-wide, kopf watches the CRDs to start a child kind's watch when its CRD is installed
    # after the operator started (LeaderWorkerSet, prerequisites). Watching a list of namespaces, it
    # would also list the cluster's namespaces, which such an operator may not (and our endless
    # request retries would never let kopf fall back): the kinds served at start-up are watched.
    kopf_settings.scanning.disabled = bool(reconciler.settings.namespaces)
    kopf_settings.posting.enabled = False
    kopf_settings.watching.server_timeout = 300
    kopf_settings.watching.client_timeout = 330
    kopf_settings.watching.connect_timeout = 10
    kopf_settings.networking.request_timeout = 30
    kopf_settings.networking.error_backoffs = RetryForever()
    logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    return registry, kopf_settings
