"""Rendering: an LMIModel to the Kubernetes objects that serve it. Pure: same input, same output.

The objects are complete server-side-apply manifests: every field listed here is owned by the
operator's field manager, every field left out is left to others (replicas under an HPA).

A model without spec.profiles has one workload: the ConfigMap `<model>-lmi-config` and the
Deployment `<model>`. With profiles, each profile has its own, `<model>-<profile>-lmi-config` and
`<model>-<profile>`, rendered from the spec with the profile's settings (LMIModelSpec.for_profile)
and a pod label naming the profile; the one Service selects the pods of all of them."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from lmi_operator.api import API_VERSION, KIND, LMIModel, LMIModelSpec
from lmi_operator.properties import lmi_environment, lmi_options, serving_properties
from lmi_operator.render_adapters import UNROLLED_KEYS, adapter_env, adapter_volume, adapters_data, admin_port
from lmi_operator.render_cache import (
    CACHE_DIR,
    CACHE_VOLUME,
    cache_env,
    cache_volume,
    claim,
    claim_name,
    fetch_container,
)
from lmi_operator.render_inspect import render_inspect_job
from lmi_operator.render_lws import (
    LEADER_SELECTOR,
    LWS_API_VERSION,
    LWS_KIND,
    group_set_name,
    leader_worker_set,
)
from lmi_operator.settings import OperatorSettings
from lmi_runtime.options import HANDLER_FILE, MODEL_DIR, PORT, PROPERTIES_FILE

MODEL_LABEL = "serving.lmi.dev/model"
# On the pods of a profile's Deployment (spec.profiles): which profile they run.
PROFILE_LABEL = "serving.lmi.dev/profile"
CONFIG_HASH = "serving.lmi.dev/config-hash"
# On every child: a digest of the whole object as rendered. A spec change that only removes fields
# (an option, an env var, an HPA metric) changes it, so the child is applied and the removal lands.
APPLIED_HASH = "serving.lmi.dev/applied-hash"
MANAGED_BY = "lmi-operator"
# The label selector of everything the operator creates (its watches are filtered by it).
MANAGED_SELECTOR = f"app.kubernetes.io/managed-by={MANAGED_BY}"
RUNTIME_UID = 1000
# The probe period of the startup probe; its failureThreshold spends spec.startup.timeoutSeconds.
STARTUP_PERIOD = 10


@dataclass(frozen=True)
class Rendered:
    """The objects of one LMIModel, in apply order, and facts the status needs."""

    objects: tuple[dict[str, Any], ...]
    selector: dict[str, str]
    options: dict[str, str]

    def by_kind(self, kind: str) -> dict[str, Any] | None:
        """The first rendered object of `kind`, if any."""
        return next((o for o in self.objects if o["kind"] == kind), None)

    def config_hashes(self) -> dict[str, str]:
        """The config hash of each rendered workload's pod template, by name."""
        return {
            str(o["metadata"]["name"]): str(template_of(o)["metadata"]["annotations"][CONFIG_HASH])
            for o in self.objects
            if o["kind"] in WORKLOAD_KINDS
        }


# What runs a model's pods: a Deployment, or a LeaderWorkerSet for replicas of several nodes.
WORKLOAD_KINDS = ("Deployment", LWS_KIND)


def template_of(workload: Mapping[str, Any]) -> Mapping[str, Any]:
    """The pod template of a workload (a LeaderWorkerSet's: its leader's), as rendered or live."""
    spec = workload.get("spec", {})
    if workload.get("kind") == LWS_KIND:
        return dict(spec.get("leaderWorkerTemplate", {}).get("leaderTemplate", {}))
    return dict(spec.get("template", {}))


def labels_of(name: str) -> dict[str, str]:
    """The recommended app.kubernetes.io labels, plus the model label that selects the pods."""
    return {
        "app.kubernetes.io/name": "lmimodel",
        "app.kubernetes.io/instance": name,
        "app.kubernetes.io/component": "model-server",
        "app.kubernetes.io/managed-by": MANAGED_BY,
        MODEL_LABEL: name,
    }


def selector_of(name: str) -> dict[str, str]:
    """The pod selector of a model's Deployment, Service and PDB (never changes for a name)."""
    return {MODEL_LABEL: name, "app.kubernetes.io/managed-by": MANAGED_BY}


def config_map_name(name: str) -> str:
    """The name of the ConfigMap holding a workload's serving.properties."""
    return f"{name}-lmi-config"


def workload_name(model: str, profile: str | None) -> str:
    """The name of a model's Deployment: the model's, or `<model>-<profile>` for a profile's."""
    return model if profile is None else f"{model}-{profile}"


def owned_metadata(obj: LMIModel, name: str) -> dict[str, Any]:
    """Metadata of a child named `name`: the model's labels and namespace, the model as its owner."""
    meta: dict[str, Any] = {
        "name": name,
        "namespace": obj.metadata.namespace,
        "labels": labels_of(str(obj.metadata.name)),
    }
    if obj.metadata.uid:
        # Without a uid (rendering a file, no cluster) there is no owner to point at yet.
        meta["ownerReferences"] = [
            {
                "apiVersion": API_VERSION,
                "kind": KIND,
                "name": obj.metadata.name,
                "uid": obj.metadata.uid,
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
    return meta


def _quantity(value: int | str) -> str:
    return str(value)


def _config_map(obj: LMIModel, admin_key: str, workload: str) -> dict[str, Any]:
    data = {PROPERTIES_FILE: serving_properties(obj.spec), **adapters_data(obj.spec, admin_key)}
    if obj.spec.handler is not None and obj.spec.handler.model_py is not None:
        data[HANDLER_FILE] = obj.spec.handler.model_py
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": owned_metadata(obj, config_map_name(workload)),
        "data": data,
    }


def _env(spec: LMIModelSpec) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [{"name": k, "value": v} for k, v in lmi_environment(spec).items()]
    env += cache_env(spec)
    env += adapter_env(spec)
    if ref := spec.model.hf_token_secret_ref:
        # By reference only: the token never appears in a ConfigMap, annotation or status.
        env.append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}})
    for var in spec.env:
        env.append(var.model_dump(by_alias=True, exclude_none=True))
    return env


def _volumes(
    obj: LMIModel, settings: OperatorSettings, workload: str
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    spec = obj.spec
    cm = config_map_name(workload)
    shm: dict[str, Any] = {"medium": "Memory"}
    if spec.resources.shm_size is not None:
        shm["sizeLimit"] = _quantity(spec.resources.shm_size)
    volumes: list[dict[str, Any]] = [
        {"name": "model-dir", "emptyDir": {}},
        cache_volume(obj, settings),
        {"name": "dshm", "emptyDir": shm},
        {"name": "lmi-config", "configMap": {"name": cm}},
    ]
    adapter_volumes, adapter_mounts = adapter_volume(spec, cm)
    volumes += adapter_volumes
    mounts: list[dict[str, Any]] = [
        {"name": "model-dir", "mountPath": MODEL_DIR},
        {"name": CACHE_VOLUME, "mountPath": CACHE_DIR},
        {"name": "dshm", "mountPath": "/dev/shm"},
        {
            "name": "lmi-config",
            "mountPath": f"{MODEL_DIR}/{PROPERTIES_FILE}",
            "subPath": PROPERTIES_FILE,
            "readOnly": True,
        },
        *adapter_mounts,
    ]
    handler = spec.handler
    if handler is not None and handler.model_py is not None:
        mounts.append(
            {
                "name": "lmi-config",
                "mountPath": f"{MODEL_DIR}/{HANDLER_FILE}",
                "subPath": HANDLER_FILE,
                "readOnly": True,
            }
        )
    elif handler is not None and handler.config_map_ref is not None:
        ref = handler.config_map_ref
        volumes.append(
            {
                "name": "handler",
                "configMap": {"name": ref.name, "items": [{"key": ref.key, "path": HANDLER_FILE}]},
            }
        )
        mounts.append(
            {
                "name": "handler",
                "mountPath": f"{MODEL_DIR}/{HANDLER_FILE}",
                "subPath": HANDLER_FILE,
                "readOnly": True,
            }
        )
    return volumes, mounts


def _resources(spec: LMIModelSpec, gpu_resource: str) -> dict[str, Any]:
    requests: dict[str, str] = {}
    limits: dict[str, str] = {}
    if spec.resources.cpu is not None:
        requests["cpu"] = _quantity(spec.resources.cpu)
    if spec.resources.memory is not None:
        requests["memory"] = limits["memory"] = _quantity(spec.resources.memory)
    if spec.resources.gpus:
        requests[gpu_resource] = limits[gpu_resource] = str(spec.resources.gpus)
    out: dict[str, Any] = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


def _probes(spec: LMIModelSpec) -> dict[str, Any]:
    # With both TLS files among the options the runtime serves HTTPS only, /ping included while it
    # loads; the kubelet's HTTPS probes do not verify the certificate.
    tls = {"ssl_keyfile", "ssl_certfile"} <= set(spec.engine.options)
    scheme = {"scheme": "HTTPS"} if tls else {}

    def get(path: str) -> dict[str, Any]:
        return {"path": path, "port": "http", **scheme}

    return {
        # Weights may take an hour to download and load: the startup probe holds the others back
        # until then, instead of a liveness probe killing a slow but healthy load.
        "startupProbe": {
            "httpGet": get("/ping"),
            "periodSeconds": STARTUP_PERIOD,
            "failureThreshold": max(1, math.ceil(spec.startup.timeout_seconds / STARTUP_PERIOD)),
        },
        "readinessProbe": {"httpGet": get("/ping"), "periodSeconds": 10, "failureThreshold": 3},
        "livenessProbe": {"httpGet": get("/ping"), "periodSeconds": 20, "failureThreshold": 6},
    }


def _pod_spec(obj: LMIModel, settings: OperatorSettings, gpu_resource: str, workload: str) -> dict[str, Any]:
    spec = obj.spec
    volumes, mounts = _volumes(obj, settings, workload)
    container: dict[str, Any] = {
        "name": "model-server",
        "image": spec.image or settings.runtime_image,
        # The image's ENTRYPOINT is `lmi-runtime`; these args replace its CMD (tests/test_contract.py).
        "args": ["serve", "--model-dir", MODEL_DIR, "--port", str(PORT)],
        "ports": [{"name": "http", "containerPort": PORT, "protocol": "TCP"}, *admin_port(spec)],
        "env": _env(spec),
        "volumeMounts": mounts,
        # A crash's last log lines (the runtime's one-line error) become the termination message,
        # which the status shows.
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "runAsNonRoot": True,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }
    if resources := _resources(spec, gpu_resource):
        container["resources"] = resources
    container |= _probes(spec)
    pod: dict[str, Any] = {
        # The token is mounted only for a ServiceAccount the spec names (a cloud identity for S3).
        "automountServiceAccountToken": spec.service_account_name is not None,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": 60,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUNTIME_UID,
            "runAsGroup": RUNTIME_UID,
            "fsGroup": RUNTIME_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "initContainers": [fetch_container(container)],
        "containers": [container],
        "volumes": volumes,
    }
    if spec.service_account_name is not None:
        pod["serviceAccountName"] = spec.service_account_name
    tolerations: list[dict[str, Any]] = []
    if spec.resources.gpus:
        # GPU node pools carry a NoSchedule taint on the GPU resource's name.
        tolerations.append({"key": gpu_resource, "operator": "Exists", "effect": "NoSchedule"})
    if sched := spec.scheduling:
        if sched.node_selector:
            pod["nodeSelector"] = dict(sorted(sched.node_selector.items()))
        if sched.affinity:
            pod["affinity"] = sched.affinity
        if sched.priority_class_name:
            pod["priorityClassName"] = sched.priority_class_name
        tolerations += [t.model_dump(by_alias=True, exclude_none=True) for t in sched.tolerations]
    if tolerations:
        pod["tolerations"] = tolerations
    return pod


def _strategy(spec: LMIModelSpec) -> dict[str, Any]:
    rollout = spec.rollout
    if rollout.strategy == "Recreate":
        return {"type": "Recreate"}
    return {
        "type": "RollingUpdate",
        "rollingUpdate": {
            "maxSurge": rollout.effective_max_surge(),
            "maxUnavailable": rollout.effective_max_unavailable(),
        },
    }


def config_hash(objects: Mapping[str, Any]) -> str:
    """A short digest of what the pods are built from: a change rolls the Deployment out."""
    blob = json.dumps(objects, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _deployment(
    obj: LMIModel,
    settings: OperatorSettings,
    config: dict[str, Any],
    profile: str | None,
    replicas: int,
) -> dict[str, Any]:
    spec = obj.spec
    name = str(obj.metadata.name)
    workload = workload_name(name, profile)
    # A profile's pods carry its name, so that the Deployments' selectors never overlap.
    own = {PROFILE_LABEL: profile} if profile is not None else {}
    gpu_resource = gpu_resource_of(spec, settings)
    pod_spec = _pod_spec(obj, settings, gpu_resource, workload)
    # The declared adapters reach running pods without a restart (render_adapters).
    rolled = {k: v for k, v in config["data"].items() if k not in UNROLLED_KEYS}
    template_hash = config_hash({"config": rolled, "pod": pod_spec})
    dep_spec: dict[str, Any] = {
        "selector": {"matchLabels": selector_of(name) | own},
        "strategy": _strategy(spec),
        "revisionHistoryLimit": 3,
        # Past this, the Deployment reports ProgressDeadlineExceeded; loads get their full budget.
        "progressDeadlineSeconds": spec.startup.timeout_seconds + 600,
        "template": {
            "metadata": {"labels": labels_of(name) | own, "annotations": {CONFIG_HASH: template_hash}},
            "spec": pod_spec,
        },
    }
    if spec.resources.nodes > 1:
        strategy = dep_spec["strategy"]
        # A LeaderWorkerSet only rolls; Recreate is every group at once, none started before.
        rolling = strategy.get("rollingUpdate", {"maxSurge": 0, "maxUnavailable": "100%"})
        return leader_worker_set(
            owned_metadata(obj, group_set_name(name)),
            dep_spec["template"]["metadata"],
            pod_spec,
            replicas,
            spec.resources.nodes,
            rolling,
            spec.scheduling.exclusive_topology if spec.scheduling else None,
        )
    dep_spec = {"replicas": replicas} | dep_spec
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": owned_metadata(obj, workload),
        "spec": dep_spec,
    }


def serving_selector(obj: LMIModel) -> dict[str, str]:
    """The pods that serve HTTP: all the model's pods, or its groups' leaders (render_lws) when a
    replica spans nodes. The Service's selector, and the scale subresource's (per-pod metrics)."""
    leaders = LEADER_SELECTOR if obj.spec.resources.nodes > 1 else {}
    return selector_of(str(obj.metadata.name)) | leaders


def workload_kind(spec: LMIModelSpec) -> tuple[str, str]:
    """(apiVersion, kind) of what runs the model's pods."""
    return (LWS_API_VERSION, LWS_KIND) if spec.resources.nodes > 1 else ("apps/v1", "Deployment")


def _service(obj: LMIModel) -> dict[str, Any]:
    name = str(obj.metadata.name)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": owned_metadata(obj, name),
        "spec": {
            "type": "ClusterIP",
            "selector": serving_selector(obj),
            "ports": [{"name": "http", "port": PORT, "targetPort": "http", "protocol": "TCP"}],
        },
    }


def _pdb(obj: LMIModel) -> dict[str, Any]:
    name = str(obj.metadata.name)
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": owned_metadata(obj, name),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector_of(name)}},
    }


def _hpa(obj: LMIModel) -> dict[str, Any]:
    name = str(obj.metadata.name)
    auto = obj.spec.autoscaling
    assert auto is not None
    metrics: list[dict[str, Any]] = []
    if auto.target_cpu_utilization_percentage is not None:
        metrics.append(
            {
                "type": "Resource",
                "resource": {
                    "name": "cpu",
                    "target": {
                        "type": "Utilization",
                        "averageUtilization": auto.target_cpu_utilization_percentage,
                    },
                },
            }
        )
    for m in auto.metrics:
        metrics.append(
            {
                "type": "Pods",
                "pods": {
                    "metric": {"name": m.name},
                    "target": {"type": "AverageValue", "averageValue": _quantity(m.target_average_value)},
                },
            }
        )
    spec: dict[str, Any] = {
        # The HPA scales the LMIModel through its scale subresource: spec.replicas stays the one
        # source of the replica count, and the operator never fights the HPA over the Deployment.
        "scaleTargetRef": {"apiVersion": API_VERSION, "kind": KIND, "name": name},
        "minReplicas": auto.min_replicas,
        "maxReplicas": auto.max_replicas,
        "behavior": {"scaleDown": {"stabilizationWindowSeconds": auto.scale_down_stabilization_seconds}},
    }
    if metrics:
        spec["metrics"] = metrics
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": owned_metadata(obj, name),
        "spec": spec,
    }


def desired_replicas(spec: LMIModelSpec) -> int:
    """spec.replicas, kept within the autoscaling bounds when an HPA scales the model."""
    if spec.autoscaling is None:
        return spec.replicas
    return min(max(spec.replicas, spec.autoscaling.min_replicas), spec.autoscaling.max_replicas)


def gpu_resource_of(spec: LMIModelSpec, settings: OperatorSettings) -> str:
    """The extended resource GPUs are requested on: the spec's, else the operator's setting."""
    return spec.resources.gpu_resource_name or settings.gpu_resource_name


def profile_replicas(spec: LMIModelSpec) -> dict[str, int]:
    """Replicas by profile where nothing is known of the cluster: every one on the first profile."""
    return {p.name: desired_replicas(spec) if i == 0 else 0 for i, p in enumerate(spec.profiles)}


def render(
    obj: LMIModel,
    settings: OperatorSettings,
    admin_key: str = "",
    *,
    inspect: bool = False,
    deploy: bool = True,
    replicas: Mapping[str, int] | None = None,
) -> Rendered:
    """Every object an LMIModel needs, in the order they are applied (config before pods).
    `admin_key` is the operator's public key for the adapter management port (render_adapters).
    `inspect` adds the inspection Job (render_inspect); without `deploy` the Deployments are held
    back (the model is inspected, or fits no GPU: fit_status). `replicas` are those of each profile
    (profile_plan; default: profile_replicas)."""
    name = str(obj.metadata.name)
    workloads: list[tuple[str | None, LMIModel, int]]
    if obj.spec.profiles:
        counts = profile_replicas(obj.spec) if replicas is None else replicas
        workloads = [
            (p.name, obj.model_copy(update={"spec": obj.spec.for_profile(p)}), counts.get(p.name, 0))
            for p in obj.spec.profiles
        ]
    else:
        workloads = [(None, obj, desired_replicas(obj.spec))]
    configs, deployments = [], []
    for profile, part, count in workloads:
        configs.append(_config_map(part, admin_key, workload_name(name, profile)))
        deployments.append(_deployment(part, settings, configs[-1], profile, count))
    objects = [*configs, *(deployments if deploy else []), _service(obj)]
    if inspect:
        # The first workload's pod: every profile reads the same model with the same environment.
        pod = template_of(deployments[0])["spec"]
        meta = owned_metadata(obj, "")
        objects.append(
            render_inspect_job(name, meta, pod, settings.runtime_image, settings.inspection_scheduling)
        )
    if cache_claim := claim(obj, settings, owned_metadata(obj, claim_name(name))):
        # Before the Deployment would be better, but pods wait for their claim by themselves.
        objects.append(cache_claim)
    min_replicas = obj.spec.autoscaling.min_replicas if obj.spec.autoscaling else obj.spec.replicas
    if min_replicas > 1:
        objects.append(_pdb(obj))
    if obj.spec.autoscaling is not None:
        objects.append(_hpa(obj))
    for child in objects:
        annotations = child["metadata"].setdefault("annotations", {})
        annotations[APPLIED_HASH] = config_hash(child)
    return Rendered(objects=tuple(objects), selector=selector_of(name), options=lmi_options(obj.spec))


def selector_string(selector: Mapping[str, str]) -> str:
    """A label selector as the scale subresource wants it (key=value,...)."""
    return ",".join(f"{k}={v}" for k, v in sorted(selector.items()))
