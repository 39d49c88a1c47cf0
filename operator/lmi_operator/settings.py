"""Operator settings: typed, from LMI_OPERATOR_* environment variables (the Helm chart sets them)."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Mapping
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from lmi_operator.api import Cache, Scheduling

ENV_PREFIX = "LMI_OPERATOR_"


class OperatorSettings(BaseModel):
    """How this operator instance runs. Every field maps to LMI_OPERATOR_<FIELD_IN_UPPER_CASE>."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    namespaces: tuple[str, ...] = Field(
        default=(), description="Namespaces to watch (comma-separated); empty watches all namespaces."
    )
    runtime_image: str = Field(
        default="ghcr.io/lmi-operator/lmi-runtime:0.1.0",
        description="Image of the runtime pods, unless an LMIModel sets spec.image.",
    )
    gpu_resource_name: str = Field(
        default="nvidia.com/gpu",
        description="Extended resource of GPUs, unless spec.resources.gpuResourceName.",
    )
    workers: int = Field(default=16, ge=1, le=256, description="Concurrent reconciles.")
    leader_election: bool = Field(default=True, description="Hold a Lease so that one replica acts.")
    lease_namespace: str = Field(default="", description="Namespace of the Lease (default: the pod's).")
    lease_name: str = Field(default="lmi-operator", description="Name of the Lease.")
    lease_duration_seconds: int = Field(
        default=15, ge=5, description="How long a dead leader blocks handover."
    )
    identity: str = Field(default_factory=socket.gethostname, description="This replica's name in the Lease.")
    metrics_port: int = Field(default=8081, ge=0, le=65535, description="Prometheus /metrics port (0: off).")
    health_port: int = Field(default=8080, ge=0, le=65535, description="Liveness /healthz port (0: off).")
    log_format: Literal["json", "plain", "full"] = Field(
        default="json", description="Log lines as JSON objects (structured) or as text."
    )
    default_cache: Cache | None = Field(
        default=None,
        description="spec.cache of models that set none, as JSON (e.g. "
        '{"claimTemplate": {"size": "200Gi", "accessMode": "ReadWriteMany"}}); unset: emptyDir.',
    )
    inspection_scheduling: Scheduling | None = Field(
        default=None,
        description="Where the CPU-only inspection pods of GPU models run, as JSON spec.scheduling "
        '(e.g. {"nodeSelector": {"pool": "cpu"}, "tolerations": [...]}); unset: any untainted node.',
    )
    stall_seconds: float = Field(
        default=300.0, gt=0, description="Liveness fails when the watch loop saw nothing for this long."
    )

    @field_validator("namespaces", mode="before")
    @classmethod
    def _split(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(n.strip() for n in value.split(",") if n.strip())
        return value

    @field_validator("default_cache", "inspection_scheduling", mode="before")
    @classmethod
    def _json(cls, value: object) -> object:
        if isinstance(value, str):
            return json.loads(value) if value.strip() else None
        return value

    @field_validator("default_cache")
    @classmethod
    def _shared(cls, value: Cache | None) -> Cache | None:
        template = value.claim_template if value else None
        if template is not None and template.access_mode != "ReadWriteMany":
            raise ValueError(
                "claimTemplate.accessMode must be ReadWriteMany in the default: it serves models of any "
                "replica count (a model that wants ReadWriteOnce sets spec.cache itself)"
            )
        return value

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> OperatorSettings:
        """Read the settings from LMI_OPERATOR_* variables; unknown ones are an error naming them."""
        env = os.environ if environ is None else environ
        values = {k[len(ENV_PREFIX) :].lower(): v for k, v in env.items() if k.startswith(ENV_PREFIX)}
        unknown = sorted(set(values) - set(cls.model_fields))
        if unknown:
            allowed = ", ".join(ENV_PREFIX + f.upper() for f in cls.model_fields)
            raise ValueError(f"unknown setting {ENV_PREFIX}{unknown[0].upper()}; allowed: {allowed}")
        try:
            return cls.model_validate(values)
        except ValidationError as err:
            first = err.errors()[0]
            name = ENV_PREFIX + str(first["loc"][0]).upper()
            inner = ".".join(str(part) for part in first["loc"][1:])
            where = f"{inner}: " if inner else ""
            raise ValueError(f"{name}={values.get(str(first['loc'][0]))!r}: {where}{first['msg']}") from None
