"""Rendering the model cache: its volume, the PersistentVolumeClaim the operator makes for a claim
template, the init container that downloads the sources into it once, and the environment that
points the runtime at it (and at S3). Pure, like `render`."""

from __future__ import annotations

from typing import Any

from lmi_operator.api import Cache, LMIModel, LMIModelSpec
from lmi_operator.settings import OperatorSettings
from lmi_runtime.options import CACHE_ENV, MODEL_DIR, STALL_ENV

CACHE_DIR = "/opt/ml/cache"
CACHE_VOLUME = "cache"
FETCH_CONTAINER = "fetch"
# Keys of the Secret named by spec.model.s3.credentialsSecretRef (the AWS SDK's variable names).
S3_SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
_OPTIONAL_S3_KEYS = ("AWS_SESSION_TOKEN",)


def cache_of(spec: LMIModelSpec, settings: OperatorSettings) -> Cache:
    """spec.cache, else the operator's default, else an emptyDir."""
    return spec.cache or settings.default_cache or Cache()


def claim_name(name: str) -> str:
    """The name of the PersistentVolumeClaim the operator makes for a model's claim template."""
    return f"{name}-cache"


def cache_volume(obj: LMIModel, settings: OperatorSettings) -> dict[str, Any]:
    """The pod volume the cache lives on."""
    cache = cache_of(obj.spec, settings)
    if cache.persistent_volume_claim is not None:
        return {
            "name": CACHE_VOLUME,
            "persistentVolumeClaim": {"claimName": cache.persistent_volume_claim.claim_name},
        }
    if cache.claim_template is not None:
        return {
            "name": CACHE_VOLUME,
            "persistentVolumeClaim": {"claimName": claim_name(str(obj.metadata.name))},
        }
    empty: dict[str, Any] = {}
    if cache.empty_dir is not None and cache.empty_dir.size_limit is not None:
        empty["sizeLimit"] = str(cache.empty_dir.size_limit)
    return {"name": CACHE_VOLUME, "emptyDir": empty}


def claim(obj: LMIModel, settings: OperatorSettings, meta: dict[str, Any]) -> dict[str, Any] | None:
    """The PersistentVolumeClaim of a claim template (None for the other kinds of cache)."""
    template = cache_of(obj.spec, settings).claim_template
    if template is None:
        return None
    spec: dict[str, Any] = {
        "accessModes": [template.access_mode],
        "resources": {"requests": {"storage": str(template.size)}},
    }
    if template.storage_class_name is not None:
        spec["storageClassName"] = template.storage_class_name
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": meta, "spec": spec}


def cache_env(spec: LMIModelSpec) -> list[dict[str, Any]]:
    """Where the runtime finds the cache (and the hub's, vLLM's and the home folder's caches in it),
    how long a download may stall, and how it reaches S3."""
    env: list[dict[str, Any]] = [
        {"name": CACHE_ENV, "value": CACHE_DIR},
        {"name": STALL_ENV, "value": str(spec.startup.download_stall_seconds)},
        {"name": "HF_HOME", "value": f"{CACHE_DIR}/hf"},
        # VLLM_CACHE_ROOT is set by the runtime: a sub-folder of <cache>/vllm keyed by its inputs.
        {"name": "XDG_CACHE_HOME", "value": CACHE_DIR},
        {"name": "HOME", "value": CACHE_DIR},
    ]
    s3 = spec.model.s3
    if s3 is None:
        return env
    if s3.credentials_secret_ref is not None:
        secret = s3.credentials_secret_ref.name
        for key in S3_SECRET_KEYS:
            ref: dict[str, Any] = {"name": secret, "key": key}
            if key in _OPTIONAL_S3_KEYS:
                ref["optional"] = True
            env.append({"name": key, "valueFrom": {"secretKeyRef": ref}})
    if s3.endpoint_url is not None:
        env.append({"name": "AWS_ENDPOINT_URL_S3", "value": s3.endpoint_url})
    if s3.region is not None:
        env += [
            {"name": "AWS_REGION", "value": s3.region},
            {"name": "AWS_DEFAULT_REGION", "value": s3.region},
        ]
    return env


def fetch_container(main: dict[str, Any]) -> dict[str, Any]:
    """The init container that downloads the model and adapters into the cache before the server
    starts: the runtime image's `lmi-runtime fetch`, with the server's environment and mounts but no
    GPU (it needs none, and it would hold the GPUs no longer than the server does anyway)."""
    container = {
        "name": FETCH_CONTAINER,
        "image": main["image"],
        "args": ["fetch", "--model-dir", MODEL_DIR],
        "env": main["env"],
        "volumeMounts": main["volumeMounts"],
        # The fetch's one-line error (or stall report) becomes the termination message the status shows.
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": main["securityContext"],
    }
    requests = {
        k: v for k, v in main.get("resources", {}).get("requests", {}).items() if k in ("cpu", "memory")
    }
    if requests:
        container["resources"] = {"requests": requests}
    return container
