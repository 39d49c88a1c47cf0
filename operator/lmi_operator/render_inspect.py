"""The inspection Job: one CPU-only pod that reads the model's config.json and safetensors headers
(`lmi-runtime inspect`, ranged reads: no weights) before any GPU pod is created (fit_status.py).

It runs the operator's runtime image with the model server's environment (the same model source,
revision, hub token and S3 credentials resolve the same way) and the serving.properties volume,
and writes its result to /dev/termination-log, which the kubelet copies into the pod's status. Its
pod does not carry the model label: the model's Service and Deployment never select it."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from lmi_operator.api import Scheduling
from lmi_runtime.options import MODEL_DIR, PROPERTIES_FILE

# The pods of a model's inspection carry this label, valued with the model's name.
INSPECTS_LABEL = "serving.lmi.dev/inspects"
INSPECT_CONTAINER = "inspect"
TERMINATION_LOG = "/dev/termination-log"
# A hung read (an S3 endpoint that never answers) ends the Job: the model is then deployed unjudged.
DEADLINE_SECONDS = 300


def inspect_job_name(model: str, template: Mapping[str, Any]) -> str:
    """`<model>-inspect-<digest of the pod template>`: a Job's template is immutable, so a template
    that changes (a new source, a fixed Secret reference in spec.env) is a new Job; the name stays
    within the 63 characters of the job-name label on its pod."""
    digest = hashlib.sha256(json.dumps(template, sort_keys=True).encode()).hexdigest()[:6]
    return f"{model[:45]}-inspect-{digest}"


def render_inspect_job(
    name: str, meta: dict[str, Any], pod_spec: dict[str, Any], image: str, scheduling: Scheduling | None
) -> dict[str, Any]:
    """The Job inspecting model `name`'s source, with metadata `meta` (the model's namespace and
    labels, owned by it; named here), built from the model server pod's spec (environment, security
    contexts, service account and the serving.properties volume), run in the operator's runtime
    `image` (which has `inspect` whatever spec.image a model runs) and placed by the operator's
    `scheduling` (not the model's: that one is for GPU nodes)."""
    server = pod_spec["containers"][0]
    meta["labels"]["app.kubernetes.io/component"] = "inspection"
    managed = {"app.kubernetes.io/managed-by": meta["labels"]["app.kubernetes.io/managed-by"]}
    config = next(v for v in pod_spec["volumes"] if v["name"] == "lmi-config")
    container = {
        "name": INSPECT_CONTAINER,
        "image": image,
        "args": ["inspect", "--model-dir", MODEL_DIR, "--message-file", TERMINATION_LOG],
        "env": server.get("env", []),
        "volumeMounts": [
            {"name": "model-dir", "mountPath": MODEL_DIR},
            {
                "name": "lmi-config",
                "mountPath": f"{MODEL_DIR}/{PROPERTIES_FILE}",
                "subPath": PROPERTIES_FILE,
                "readOnly": True,
            },
        ],
        "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "512Mi"}},
        "terminationMessagePolicy": "File",
        "securityContext": server.get("securityContext", {}),
    }
    pod: dict[str, Any] = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": pod_spec["automountServiceAccountToken"],
        "enableServiceLinks": False,
        "securityContext": pod_spec["securityContext"],
        "containers": [container],
        "volumes": [
            {"name": "model-dir", "emptyDir": {}},
            config,
        ],
    }
    if account := pod_spec.get("serviceAccountName"):
        # A cloud identity for S3 (IRSA, pod identity) is the model's, as the model server's is.
        pod["serviceAccountName"] = account
    if scheduling is not None:
        pod |= scheduling.model_dump(by_alias=True, exclude_none=True, exclude_defaults=True)
    template = {"metadata": {"labels": managed | {INSPECTS_LABEL: name}}, "spec": pod}
    meta["name"] = inspect_job_name(name, template)
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": meta,
        "spec": {
            "backoffLimit": 0,
            "activeDeadlineSeconds": DEADLINE_SECONDS,
            "template": template,
        },
    }
