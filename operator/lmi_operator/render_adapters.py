"""Rendering spec.lora.adapters so that changing them never changes the pod template.

The declared set is a key of the model's ConfigMap, mounted as a directory (not a subPath), so the
kubelet refreshes the file in running pods and a starting replica reads the current set; the config
hash on the pod template leaves that key out. The runtime's management port (LMI_ADMIN_PORT, not in
the Service) accepts requests signed by the operator's key, whose public half is another key of the
same ConfigMap in the same folder (lmi_runtime.admin_auth)."""

from __future__ import annotations

import json
from typing import Any

from lmi_operator.api import LMIModelSpec
from lmi_runtime.options import (
    ADAPTER_ROUTES_ENV,
    ADAPTERS_FILE_ENV,
    ADMIN_KEYS_ENV,
    ADMIN_PORT,
    ADMIN_PORT_ENV,
)

ADAPTERS_KEY = "adapters.json"
ADAPTERS_VOLUME = "adapters"
ADMIN_KEY_KEY = "admin.pub"
ADAPTERS_MOUNT = "/opt/ml/declared-adapters"
# ConfigMap keys that reach running pods without a rollout (left out of the config hash).
UNROLLED_KEYS = frozenset({ADAPTERS_KEY, ADMIN_KEY_KEY})


def lora_on(spec: LMIModelSpec) -> bool:
    """Whether the model serves LoRA adapters."""
    return spec.lora is not None and spec.lora.enabled


def declared(spec: LMIModelSpec) -> dict[str, str]:
    """spec.lora.adapters as {name: source}."""
    return {a.name: a.source for a in spec.lora.adapters} if spec.lora is not None and lora_on(spec) else {}


def adapters_data(spec: LMIModelSpec, admin_key: str) -> dict[str, str]:
    """The ConfigMap keys with the declared set and the operator's public key (none without LoRA)."""
    if not lora_on(spec):
        return {}
    return {ADAPTERS_KEY: json.dumps(declared(spec), sort_keys=True), ADMIN_KEY_KEY: admin_key + "\n"}


def adapter_env(spec: LMIModelSpec) -> list[dict[str, Any]]:
    """The management port, and the files of the declared set and of the keys it accepts."""
    if not lora_on(spec):
        return []
    env: list[dict[str, Any]] = [
        {"name": ADAPTERS_FILE_ENV, "value": f"{ADAPTERS_MOUNT}/{ADAPTERS_KEY}"},
        {"name": ADMIN_PORT_ENV, "value": str(ADMIN_PORT)},
        {"name": ADMIN_KEYS_ENV, "value": f"{ADAPTERS_MOUNT}/{ADMIN_KEY_KEY}"},
    ]
    if spec.lora is not None and spec.lora.adapter_routes:
        env.append({"name": ADAPTER_ROUTES_ENV, "value": "true"})
    return env


def adapter_volume(spec: LMIModelSpec, config_map: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The declared set's volume and mount (none without LoRA)."""
    if not lora_on(spec):
        return [], []
    items = [{"key": key, "path": key} for key in sorted(UNROLLED_KEYS)]
    volume = {"name": ADAPTERS_VOLUME, "configMap": {"name": config_map, "items": items}}
    return [volume], [{"name": ADAPTERS_VOLUME, "mountPath": ADAPTERS_MOUNT, "readOnly": True}]


def admin_port(spec: LMIModelSpec) -> list[dict[str, Any]]:
    """The management port among the container's ports (none without LoRA)."""
    return [{"name": "admin", "containerPort": ADMIN_PORT, "protocol": "TCP"}] if lora_on(spec) else []
