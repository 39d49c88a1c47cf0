"""Applying a model's children: what the spec renders to, written only where the live copy differs.

A child is applied when it is missing, when it was applied from another rendering (the hash
annotation every rendered child carries differs: so fields removed from the spec leave the child
too), or when someone edited it by hand since (the rendered fields are no longer contained in it).
Children the spec no longer asks for (PDB, HPA, cache claim, the inspection Job of a former source,
the Deployment and ConfigMap of a profile taken out of spec.profiles, the Deployment of a model
whose replicas now span nodes and the LeaderWorkerSet of one whose replicas no longer do) are
deleted."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from lmi_operator import metrics
from lmi_operator.api import LMIModel
from lmi_operator.cache import OPTIONAL_KINDS, Key, ModelCache
from lmi_operator.drift import contains
from lmi_operator.fit_status import FitReport
from lmi_operator.kube import ApiError, KubeClient, object_path
from lmi_operator.prerequisites import LWS_PLURAL, Prerequisites
from lmi_operator.profile_plan import ProfilePlan
from lmi_operator.render import APPLIED_HASH, WORKLOAD_KINDS, render
from lmi_operator.render_lws import LWS_API_VERSION, LWS_KIND
from lmi_operator.settings import OperatorSettings

# What is deleted when the spec no longer renders it, kind -> apiVersion. The Service is always rendered.
PRUNED_KINDS = {**OPTIONAL_KINDS, "ConfigMap": "v1", "Deployment": "apps/v1", LWS_KIND: LWS_API_VERSION}


def namespace_going(err: ApiError) -> bool:
    """Whether the API refused because the namespace is gone or being deleted (not for want of RBAC).

    The model goes with its namespace: nothing to create, nothing to retry.
    """
    return err.status == 404 or (err.status == 403 and "being terminated" in err.message)


def drifted(live: Mapping[str, Any] | None, desired: Mapping[str, Any]) -> bool:
    """Whether `desired` must be applied: the child is missing, was applied from another rendering
    (its hash annotation differs: fields were added or removed), or was edited by hand since."""
    if live is None:
        return True
    applied = live.get("metadata", {}).get("annotations", {}).get(APPLIED_HASH)
    return applied != desired["metadata"]["annotations"][APPLIED_HASH] or not contains(live, desired)


class ChildrenApplier:
    """Brings one model's children in line with its parsed spec, through the cache's copies."""

    def __init__(
        self,
        client: KubeClient,
        cache: ModelCache,
        settings: OperatorSettings,
        prerequisites: Prerequisites,
        admin_key: str = "",
    ) -> None:
        self.client = client
        self.prerequisites = prerequisites
        self.cache = cache
        self.settings = settings
        self.admin_key = admin_key  # the public key of the operator's adapter management requests

    async def apply(
        self, key: Key, obj: LMIModel, fit: FitReport | None = None, plan: ProfilePlan | None = None
    ) -> None:
        """Apply what `obj` renders to where it drifted and delete the children it no longer asks for.
        With a `fit` judgement (GPU models), the inspection Job is applied until the facts are known
        and the Deployments only once `fit` allows it (live ones are left as they are until then);
        with profiles, each profile's Deployment asks for the replicas `plan` gives it. A child the
        API server refuses (400/422: retrying cannot help) is named in the model's apply_error for
        status; other failures raise, for the work queue to retry."""
        st = self.cache.state(key)
        inspect = fit is not None and fit.keep_job
        deploy = fit is None or fit.deploy
        replicas = plan.replicas() if plan is not None else None
        rendered = render(
            obj, self.settings, self.admin_key, inspect=inspect, deploy=deploy, replicas=replicas
        )
        await self.cache.read_missing(
            key, [(d["apiVersion"], d["kind"], d["metadata"]["name"]) for d in rendered.objects]
        )
        # What may be pruned, as it is before the writes below replace the cache's copies.
        before = [child for child in st.children if child[0] in PRUNED_KINDS]
        stale = [
            d for d in rendered.objects if drifted(st.children.get((d["kind"], d["metadata"]["name"])), d)
        ]
        # Independent objects: apply them together (a pod waits for its ConfigMap by itself).
        results = await asyncio.gather(*(self.client.apply(d) for d in stale), return_exceptions=True)
        st.apply_error = None
        for desired, result in zip(stale, results, strict=True):
            if isinstance(result, ApiError) and result.status == 404 and desired["kind"] == LWS_KIND:
                # The LeaderWorkerSet CRD was removed: the status says so, and the model waits for it.
                self.prerequisites.not_served(LWS_API_VERSION, LWS_PLURAL)
                raise result
            if isinstance(result, ApiError) and namespace_going(result):
                return
            if isinstance(result, ApiError) and result.status in (400, 422):
                st.apply_error = f"the {desired['kind']} rendered from the spec was refused: {result.message}"
                continue
            if isinstance(result, BaseException):
                raise result
            metrics.API_WRITES.labels(desired["kind"]).inc()
            self.cache.written(key, result)
            if desired["kind"] in WORKLOAD_KINDS:
                st.applied_generations[result["metadata"]["name"]] = result["metadata"].get("generation")
        wanted = {(o["kind"], o["metadata"]["name"]) for o in rendered.objects}
        for kind, name in before:
            # A workload held back (deploy False) stays as it is.
            if (kind, name) not in wanted and (deploy or kind not in WORKLOAD_KINDS):
                await self._delete(PRUNED_KINDS[kind], kind, key[0], name)
                st.children.pop((kind, name), None)

    async def _delete(self, api_version: str, kind: str, namespace: str, name: str) -> None:
        try:
            # In the background, as kubectl does: a Job's pods go with it (the API's default orphans them).
            await self.client.request(
                "DELETE",
                object_path(api_version, kind, namespace, name),
                params={"propagationPolicy": "Background"},
            )
            metrics.API_WRITES.labels(kind).inc()
        except ApiError as err:
            if err.status != 404:
                raise
