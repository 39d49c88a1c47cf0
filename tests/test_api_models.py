"""The LMIModel API without a cluster: examples parse, bad specs fail with field-named messages, and the
generated CRD and docs are current. INVALID is shared with test_api_server, which sends the same specs
to the real API server."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from lmi_operator import api, apidocs, crd

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))


def example_docs(path: Path) -> list[dict[str, Any]]:
    """The YAML documents of an example file."""
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def example_models(path: Path) -> list[dict[str, Any]]:
    """The LMIModel documents of an example file."""
    return [doc for doc in example_docs(path) if doc["kind"] == api.KIND]


BASE: dict[str, Any] = {
    "apiVersion": api.API_VERSION,
    "kind": api.KIND,
    "metadata": {"name": "bad"},
    "spec": {"model": {"id": "Qwen/Qwen2.5-1.5B-Instruct"}},
}


def merged(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """`base` with `patch` merged in: mappings recursively, anything else replaced; None deletes."""
    out = copy.deepcopy(base)
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


@dataclass(frozen=True)
class Invalid:
    """A spec both the API server and parse_lmimodel reject, at `path`. `gist` is part of the API
    server's message; `py_gist` part of pydantic's where its wording differs (schema checks)."""

    name: str
    spec: dict[str, Any]
    path: str
    gist: str
    py_gist: str | None = None
    metadata: dict[str, Any] | None = None

    def obj(self) -> dict[str, Any]:
        """The whole object."""
        return merged(BASE, {"spec": self.spec, "metadata": self.metadata or {}})


ADAPTER = {"name": "sql", "source": "yard1/llama-2-7b-sql-lora-test"}
PRODUCT = "nvidia.com/gpu.product"
L4_PROFILE = {"name": "l4", "gpu": {"product": "NVIDIA-L4"}}
L40S_PROFILE = {"name": "l40s", "gpu": {"nodeSelector": {"pool": "l40s"}}}
INVALID: list[Invalid] = [
    Invalid(
        "quantize-unknown",
        {"engine": {"quantize": "int3"}},
        "spec.engine.quantize",
        'Unsupported value: "int3"',
        "Input should be 'fp8'",
    ),
    Invalid(
        "tp-times-pp-not-gpus",
        {"engine": {"tensorParallelDegree": 2}, "resources": {"gpus": 4}},
        "spec.engine.tensorParallelDegree",
        "engine.tensorParallelDegree x engine.pipelineParallelDegree must equal resources.gpus",
    ),
    Invalid(
        "tp-pp-product",
        {"engine": {"tensorParallelDegree": 2, "pipelineParallelDegree": 2}, "resources": {"gpus": 2}},
        "spec.engine.tensorParallelDegree",
        "x engine.pipelineParallelDegree must equal resources.gpus",
    ),
    Invalid(
        "tp-not-gpus-times-nodes",
        {"engine": {"tensorParallelDegree": 8}, "resources": {"gpus": 8, "nodes": 2}},
        "spec.engine.tensorParallelDegree",
        "engine.tensorParallelDegree x engine.pipelineParallelDegree must equal resources.gpus x "
        "resources.nodes",
    ),
    Invalid(
        "nodes-zero",
        {"resources": {"gpus": 8, "nodes": 0}},
        "spec.resources.nodes",
        "greater than or equal to 1",
    ),
    Invalid(
        "nodes-on-cpu",
        {"engine": {"tensorParallelDegree": 1}, "resources": {"gpus": 0, "nodes": 2}},
        "spec.resources.nodes",
        "resources.nodes above 1 needs resources.gpus of at least 1: a replica spans nodes for their GPUs",
    ),
    Invalid(
        "nodes-with-profiles",
        {
            "engine": {"tensorParallelDegree": 16},
            "resources": {"gpus": 8, "nodes": 2},
            "profiles": [L4_PROFILE],
        },
        "spec.profiles",
        "profiles need resources.nodes 1: a replica of several nodes has no GPU profiles",
    ),
    Invalid(
        "tp-word-other-than-max",
        {"engine": {"tensorParallelDegree": "auto"}},
        "spec.engine.tensorParallelDegree",
        "should match '^(max)$'",
        "Input should be 'max'",
    ),
    Invalid(
        "tp-zero",
        {"engine": {"tensorParallelDegree": 0}},
        "spec.engine.tensorParallelDegree",
        "greater than or equal to 1",
    ),
    Invalid(
        "tp-max-gpus-not-multiple-of-pp",
        {"engine": {"pipelineParallelDegree": 2}, "resources": {"gpus": 3}},
        "spec.engine.pipelineParallelDegree",
        "must be a multiple of engine.pipelineParallelDegree",
    ),
    Invalid(
        "cpu-with-tensor-parallel",
        {"engine": {"tensorParallelDegree": 2}, "resources": {"gpus": 0}},
        "spec.resources.gpus",
        "resources.gpus 0 (vLLM on CPU) allows only",
    ),
    Invalid(
        "cpu-with-runtime-fp8",
        {"engine": {"quantize": "fp8"}, "resources": {"gpus": 0}},
        "spec.engine.quantize",
        "need resources.gpus of at least 1",
    ),
    Invalid(
        "lora-tunable-without-enabled", {"lora": {"maxLoras": 2}}, "spec.lora", "need lora.enabled: true"
    ),
    Invalid(
        "lora-adapters-without-enabled",
        {"lora": {"adapters": [ADAPTER]}},
        "spec.lora",
        "need lora.enabled: true",
    ),
    Invalid(
        "max-cpu-loras-below-max-loras",
        {"lora": {"enabled": True, "maxLoras": 8, "maxCpuLoras": 4}},
        "spec.lora.maxCpuLoras",
        "must be at least lora.maxLoras",
    ),
    Invalid(
        "max-cpu-loras-below-default",
        {"lora": {"enabled": True, "maxCpuLoras": 2}},
        "spec.lora.maxCpuLoras",
        "must be at least lora.maxLoras (default 4)",
    ),
    Invalid(
        "adapter-names-repeat",
        {"lora": {"enabled": True, "adapters": [ADAPTER, {**ADAPTER, "source": "/a"}]}},
        "spec.lora.adapters",
        "Duplicate value",
        "names must be unique",
    ),
    Invalid(
        "adapter-source-not-a-source",
        {"lora": {"enabled": True, "adapters": [{**ADAPTER, "source": "sql"}]}},
        "spec.lora.adapters[0].source",
        "must be a Hugging Face hub id (org/name), an s3:// URL or",
    ),
    Invalid(
        "gpu-memory-zero",
        {"engine": {"gpuMemoryUtilization": 0}},
        "spec.engine.gpuMemoryUtilization",
        "greater than 0",
    ),
    Invalid(
        "gpu-memory-above-one",
        {"engine": {"gpuMemoryUtilization": 1.5}},
        "spec.engine.gpuMemoryUtilization",
        "less than or equal to 1",
    ),
    Invalid(
        "autoscaling-min-above-max",
        {"autoscaling": {"minReplicas": 5, "maxReplicas": 2, "targetCPUUtilizationPercentage": 80}},
        "spec.autoscaling.minReplicas",
        "must not exceed autoscaling.maxReplicas",
    ),
    Invalid(
        "autoscaling-without-target",
        {"autoscaling": {"maxReplicas": 3}},
        "spec.autoscaling",
        "needs targetCPUUtilizationPercentage or at least one autoscaling.metrics entry",
    ),
    Invalid(
        "model-id-bare-name",
        {"model": {"id": "llama"}},
        "spec.model.id",
        "model.id must be a Hugging Face hub id (org/name)",
    ),
    Invalid(
        "model-id-http-url",
        {"model": {"id": "https://huggingface.co/org/name"}},
        "spec.model.id",
        "an s3:// URL or an absolute path",
    ),
    Invalid(
        "model-id-missing",
        {"model": {"id": None, "revision": "main"}},
        "spec.model.id",
        "Required value",
        "Field required",
    ),
    Invalid(
        "options-lmi-name-of-first-class-field",
        {"engine": {"options": {"tensor_parallel_degree": "2"}}},
        "spec.engine.options",
        "engine.options.tensor_parallel_degree repeats a first-class field: use spec.engine.tensorParallel",
    ),
    Invalid(
        "options-vllm-name-of-first-class-field",
        {"engine": {"options": {"max_num_seqs": "64", "quantization": "fp8"}}},
        "spec.engine.options",
        "engine.options.quantization repeats a first-class field: use spec.engine.quantize",
    ),
    Invalid(
        "options-operator-port",
        {"engine": {"options": {"port": "9000"}}},
        "spec.engine.options",
        "engine.options.port is set by the operator",
    ),
    Invalid(
        "options-operator-model-id",
        {"engine": {"options": {"model_id": "org/other"}}},
        "spec.engine.options",
        "engine.options.model_id is set by the operator",
    ),
    Invalid(
        "options-with-prefix",
        {"engine": {"options": {"option.enforce_eager": "true"}}},
        "spec.engine.options",
        "without the 'option.' prefix",
    ),
    Invalid(
        "options-value-not-string",
        {"engine": {"options": {"enforce_eager": True}}},
        "spec.engine.options.enforce_eager",
        "must be of type string",
        "Input should be a valid string",
    ),
    Invalid(
        "options-too-many",
        {"engine": {"options": {f"key_{i}": "1" for i in range(65)}}},
        "spec.engine.options",
        "must have at most 64 items",
        "at most 64 items",
    ),
    Invalid(
        "prefill-below-batch-size",
        {"engine": {"maxRollingBatchSize": 64, "maxRollingBatchPrefillTokens": 32}},
        "spec.engine.maxRollingBatchPrefillTokens",
        "must be at least engine.maxRollingBatchSize",
    ),
    Invalid(
        "prefill-below-rolling-batch-default",
        {"engine": {"mode": "rollingBatch", "maxRollingBatchPrefillTokens": 128}},
        "spec.engine.maxRollingBatchPrefillTokens",
        "256 in rollingBatch mode",
    ),
    Invalid(
        "mode-unknown",
        {"engine": {"mode": "sync"}},
        "spec.engine.mode",
        'Unsupported value: "sync"',
        "Input should be 'async' or 'rollingBatch'",
    ),
    Invalid(
        "dtype-unknown",
        {"engine": {"dtype": "int8"}},
        "spec.engine.dtype",
        'Unsupported value: "int8"',
        "Input should be 'auto'",
    ),
    Invalid(
        "engine-unknown-field",
        {"engine": {"tensorParallelSize": 2}},
        "spec.engine.tensorParallelSize",
        "unknown field",
        "Extra inputs are not permitted",
    ),
    Invalid(
        "handler-both-sources",
        {"handler": {"modelPy": "x = 1", "configMapRef": {"name": "handler"}}},
        "spec.handler",
        "exactly one of handler.modelPy and handler.configMapRef",
    ),
    Invalid("handler-no-source", {"handler": {}}, "spec.handler", "exactly one of handler.modelPy"),
    Invalid(
        "env-option-variable",
        {"env": [{"name": "OPTION_TENSOR_PARALLEL_DEGREE", "value": "2"}]},
        "spec.env[0].name",
        "env OPTION_TENSOR_PARALLEL_DEGREE is LMI configuration",
    ),
    Invalid(
        "env-lmi-alias",
        {"env": [{"name": "HF_MODEL_ID", "value": "org/name"}]},
        "spec.env[0].name",
        "env HF_MODEL_ID is LMI configuration",
    ),
    Invalid(
        "env-adapters",
        {"env": [{"name": "LMI_ADAPTERS", "value": "{}"}]},
        "spec.env[0].name",
        "env LMI_ADAPTERS is LMI configuration: use spec.model, spec.engine, spec.lora",
    ),
    Invalid(
        "env-value-and-value-from",
        {"env": [{"name": "A", "value": "1", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}]},
        "spec.env[0]",
        "env[].value and env[].valueFrom are mutually exclusive",
    ),
    Invalid(
        "env-value-from-empty",
        {"env": [{"name": "A", "valueFrom": {}}]},
        "spec.env[0].valueFrom",
        "needs exactly one of secretKeyRef and configMapKeyRef",
    ),
    Invalid(
        "env-names-repeat",
        {"env": [{"name": "A", "value": "1"}, {"name": "A", "value": "2"}]},
        "spec.env",
        "Duplicate value",
        "names must be unique",
    ),
    Invalid(
        "rollout-surge-with-recreate",
        {"rollout": {"strategy": "Recreate", "maxSurge": 1}},
        "spec.rollout",
        "apply only to strategy RollingUpdate",
    ),
    Invalid(
        "rollout-nothing-can-move",
        {"rollout": {"maxSurge": "0%", "maxUnavailable": 0}},
        "spec.rollout.maxSurge",
        "may not both be 0",
    ),
    Invalid(
        "rollout-percent-above-100",
        {"rollout": {"maxSurge": "150%"}},
        "spec.rollout.maxSurge",
        "should match",
        "String should match pattern",
    ),
    Invalid(
        "toleration-exists-with-value",
        {
            "scheduling": {
                "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "value": "present"}]
            }
        },
        "spec.scheduling.tolerations[0].value",
        "must be empty when operator is Exists",
    ),
    Invalid(
        "gpus-negative", {"resources": {"gpus": -1}}, "spec.resources.gpus", "greater than or equal to 0"
    ),
    Invalid(
        "memory-not-a-quantity",
        {"resources": {"memory": "lots"}},
        "spec.resources.memory",
        "should match",
        "String should match pattern",
    ),
    Invalid(
        "gpu-resource-name-without-domain",
        {"resources": {"gpuResourceName": "gpu"}},
        "spec.resources.gpuResourceName",
        "should match",
        "String should match pattern",
    ),
    Invalid(
        "startup-timeout-too-short",
        {"startup": {"timeoutSeconds": 10}},
        "spec.startup.timeoutSeconds",
        "greater than or equal to 60",
    ),
    Invalid("replicas-negative", {"replicas": -1}, "spec.replicas", "greater than or equal to 0"),
    Invalid(
        "name-not-a-dns-label", {}, "metadata.name", "must be a DNS-1035 label", metadata={"name": "llama.3"}
    ),
    Invalid(
        "profiles-on-cpu",
        {"resources": {"gpus": 0}, "profiles": [L4_PROFILE]},
        "spec.profiles",
        "profiles need resources.gpus of at least 1: a model on CPU",
    ),
    Invalid(
        "profile-names-repeat",
        {"profiles": [L4_PROFILE, {**L4_PROFILE, "gpu": {"product": "NVIDIA-L40S"}}]},
        "spec.profiles",
        "Duplicate value",
        "profiles names must be unique",
    ),
    Invalid(
        "profiles-too-many",
        {"profiles": [{**L4_PROFILE, "name": f"p{i}"} for i in range(9)]},
        "spec.profiles",
        "must have at most 8 items",
        "at most 8 items",
    ),
    Invalid(
        "profile-name-uppercase",
        {"profiles": [{**L4_PROFILE, "name": "L4"}]},
        "spec.profiles[0].name",
        "should match",
        "String should match pattern",
    ),
    Invalid(
        "profile-name-too-long",
        {"profiles": [{**L4_PROFILE, "name": "a" * 21}]},
        "spec.profiles[0].name",
        "Too long",
        "at most 20 characters",
    ),
    Invalid(
        "profile-gpu-unselected",
        {"profiles": [{"name": "any", "gpu": {"nodeSelector": {}}}]},
        "spec.profiles[0].gpu",
        "profiles[].gpu needs product or nodeSelector",
    ),
    Invalid(
        "profile-gpu-product-twice",
        {
            "profiles": [
                {"name": "l4", "gpu": {"product": "NVIDIA-L4", "nodeSelector": {PRODUCT: "NVIDIA-L4"}}}
            ]
        },
        "spec.profiles[0].gpu.nodeSelector",
        f"may not set {PRODUCT}: profiles[].gpu.product sets it",
    ),
    Invalid(
        "profile-gpus-zero",
        {"profiles": [{**L4_PROFILE, "resources": {"gpus": 0}}]},
        "spec.profiles[0].resources.gpus",
        "greater than or equal to 1",
    ),
    Invalid(
        "profile-engine-pipeline-stages",
        {"profiles": [{**L4_PROFILE, "engine": {"pipelineParallelDegree": 2}}]},
        "spec.profiles[0].engine.pipelineParallelDegree",
        "unknown field",
        "Extra inputs are not permitted",
    ),
    Invalid(
        "profile-engine-quantize-unknown",
        {"profiles": [{**L4_PROFILE, "engine": {"quantize": "int3"}}]},
        "spec.profiles[0].engine.quantize",
        'Unsupported value: "int3"',
        "Input should be 'fp8'",
    ),
    Invalid(
        "profile-gpus-not-tp",
        {"engine": {"tensorParallelDegree": 1}, "profiles": [{**L4_PROFILE, "resources": {"gpus": 4}}]},
        "spec.profiles",
        "profiles[].engine.tensorParallelDegree x engine.pipelineParallelDegree must equal resources.gpus",
    ),
    Invalid(
        "profile-tp-not-gpus",
        {
            "resources": {"gpus": 2},
            "profiles": [L4_PROFILE, {**L40S_PROFILE, "engine": {"tensorParallelDegree": 4}}],
        },
        "spec.profiles",
        "profiles[].engine.tensorParallelDegree x engine.pipelineParallelDegree must equal",
    ),
    Invalid(
        "profile-gpus-not-multiple-of-pp",
        {
            "engine": {"pipelineParallelDegree": 2},
            "resources": {"gpus": 2},
            "profiles": [{**L4_PROFILE, "resources": {"gpus": 3}}],
        },
        "spec.profiles",
        "profiles[].resources.gpus must be a multiple of engine.pipelineParallelDegree when",
    ),
    Invalid(
        "profile-batch-above-prefill",
        {
            "engine": {"maxRollingBatchPrefillTokens": 64},
            "profiles": [{**L4_PROFILE, "engine": {"maxRollingBatchSize": 128}}],
        },
        "spec.profiles",
        "profiles[].engine.maxRollingBatchSize must not exceed engine.maxRollingBatchPrefillTokens",
    ),
]


def test_there_are_enough_examples_and_each_says_what_it_shows() -> None:
    assert len(EXAMPLES) >= 20
    for path in EXAMPLES:
        assert path.read_text().startswith("# "), f"{path.name} has no comment header"
        for doc in example_docs(path):
            assert "namespace" not in doc["metadata"], f"{path.name} sets a namespace"
        (model,) = example_models(path)
        assert model["metadata"]["name"] == path.stem


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_parses(path: Path) -> None:
    for doc in example_models(path):
        spec = api.parse_lmimodel(doc).spec
        assert spec.tensor_parallel_size() * spec.engine.pipeline_parallel_degree == spec.gpus_per_replica()
        assert spec.gpus_required() <= 8, "each pod must fit a node of 8 GPUs"


@pytest.mark.parametrize("case", INVALID, ids=lambda c: c.name)
def test_invalid_spec_is_rejected_naming_the_field(case: Invalid) -> None:
    with pytest.raises(api.InvalidLMIModel) as raised:
        api.parse_lmimodel(case.obj())
    problems = {p.path: p.message for p in raised.value.problems}
    assert case.path in problems, f"expected a problem at {case.path}, got {problems}"
    assert (case.py_gist or case.gist) in problems[case.path]
    assert f"{case.path}: " in str(raised.value)


def test_there_are_at_least_30_invalid_cases_and_8_cel_rules() -> None:
    assert len(INVALID) >= 30
    assert len({c.name for c in INVALID}) == len(INVALID)
    assert sum(1 for _, rule in api.iter_rules() if rule.cel) >= 8


def test_every_rule_message_names_a_field() -> None:
    for path, rule in api.iter_rules():
        first_word = rule.message.split()[0]
        assert "." in first_word or first_word in ("handler", "autoscaling", "env", "profiles"), (
            path,
            rule.message,
        )


def test_tensor_parallel_max_resolves_to_gpus_over_pipeline_stages() -> None:
    obj = merged(BASE, {"spec": {"engine": {"pipelineParallelDegree": 2}, "resources": {"gpus": 8}}})
    spec = api.parse_lmimodel(obj).spec
    assert spec.engine.tensor_parallel_degree == "max"
    assert spec.tensor_parallel_size() == 4
    assert spec.gpus_required() == 8


def test_defaults_are_lmi_and_kubernetes_defaults() -> None:
    spec = api.parse_lmimodel(BASE).spec
    assert spec.engine.mode == "async" and spec.engine.effective_max_rolling_batch_size() == 32
    assert spec.resources.gpu_resource_name is None and spec.resources.gpus == 1
    assert spec.startup.timeout_seconds == 3600
    assert spec.rollout.effective_max_surge() == 1 and spec.rollout.effective_max_unavailable() == 0
    assert spec.replicas == 1 and spec.lora is None


def test_python_names_and_wire_names_both_work() -> None:
    by_alias = api.ModelSource.model_validate({"id": "org/name", "trustRemoteCode": True})
    by_name = api.ModelSource(id="org/name", trust_remote_code=True)
    assert by_alias == by_name
    assert by_alias.model_dump(by_alias=True, exclude_defaults=True) == {
        "id": "org/name",
        "trustRemoteCode": True,
    }


def test_status_round_trips_as_the_api_server_returns_it() -> None:
    status = {
        "observedGeneration": 3,
        "conditions": [
            {
                "type": "Ready",
                "status": "False",
                "reason": "InsufficientGPUs",
                "message": "0/4 nodes ...",
                "lastTransitionTime": "2026-01-02T03:04:05Z",
                "observedGeneration": 3,
            },
        ],
        "replicas": 2,
        "readyReplicas": 1,
        "ready": "1/2",
        "selector": "app.kubernetes.io/instance=bad",
    }
    parsed = api.parse_lmimodel(merged(BASE, {"status": status})).status
    assert parsed is not None and parsed.conditions[0].reason == "InsufficientGPUs"
    assert parsed.model_dump(mode="json", by_alias=True, exclude_none=True, exclude_defaults=True) == status


def test_crd_in_the_repository_is_current() -> None:
    assert (REPO / "crds" / crd.FILENAME).read_text() == crd.render(), "run `make crds`"


def test_crd_output_is_deterministic(tmp_path: Path) -> None:
    (written,) = crd.write(tmp_path)
    assert written.read_bytes() == (REPO / "crds" / crd.FILENAME).read_bytes()
    assert crd.render() == crd.render()
    assert "&id0" not in crd.render(), "no YAML anchors"


def test_docs_are_current() -> None:
    assert (REPO / "docs" / "api.md").read_text() == apidocs.render(), "run `make docs`"


def _walk(node: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    found = [(path, node)]
    for name, sub in node.get("properties", {}).items():
        found += _walk(sub, f"{path}.{name}")
    if "items" in node:
        found += _walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        found += _walk(node["additionalProperties"], f"{path}.*")
    return found


def test_schema_is_structural_and_every_field_is_described() -> None:
    schema = crd.openapi_schema()
    for path, node in _walk(schema):
        typed = "type" in node or node.get("x-kubernetes-int-or-string")
        assert typed, f"{path} has no type"
        assert "$ref" not in node and "title" not in node and node.get("additionalProperties") is not False
        if path.startswith((".spec", ".status")) and not path.endswith(("[]", ".*")):
            assert node.get("description"), f"{path} has no description"
        if node.get("type") == "array":
            assert "maxItems" in node, f"{path}: CEL cost estimation needs maxItems"
        if node.get("type") == "object" and "additionalProperties" in node:
            assert "maxProperties" in node, f"{path}: CEL cost estimation needs maxProperties"


def test_only_intended_fields_are_free_form() -> None:
    free = {
        path for path, node in _walk(crd.openapi_schema()) if node.get("x-kubernetes-preserve-unknown-fields")
    }
    assert free == {".spec.engine.speculativeConfig", ".spec.scheduling.affinity"}


def test_crd_names_subresources_and_columns() -> None:
    spec = crd.build_crd()["spec"]
    assert spec["group"] == "serving.lmi.dev" and spec["names"]["shortNames"] == ["lmi"]
    (version,) = spec["versions"]
    assert version["name"] == "v1alpha1"
    assert version["subresources"]["scale"] == {
        "specReplicasPath": ".spec.replicas",
        "statusReplicasPath": ".status.replicas",
        "labelSelectorPath": ".status.selector",
    }
    names = [c["name"] for c in version["additionalPrinterColumns"]]
    assert names[:5] == ["Model", "TP", "Quantize", "Ready", "Status"] and names[-1] == "Age"


def test_unsupported_schema_constructs_fail_loudly() -> None:
    with pytest.raises(crd.SchemaError):
        crd._convert({"type": "string", "oneOf": []}, {}, "x")
    with pytest.raises(crd.SchemaError):
        crd._convert({"anyOf": [{"type": "string"}, {"type": "boolean"}]}, {}, "x")
