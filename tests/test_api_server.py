"""The LMIModel CRD on the real API server: the examples are accepted (with the defaults pydantic
assumes), bad specs are rejected naming the field, and kubectl explain / get / scale work."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from lmi_operator import api, crd
from lmi_operator.testing.cluster import LocalCluster
from lmi_operator.testing.operator import OperatorThread
from tests.test_api_models import EXAMPLES, INVALID, REPO, Invalid, example_docs, example_models
from tests.waiting import eventually

pytestmark = pytest.mark.cluster

CRD_NAME = f"{api.PLURAL}.{api.GROUP}"
# "<path>: <type>: <message>" as kubectl prints each field error of an Invalid answer.
FIELD_ERROR = re.compile(r"(?:is invalid: |\* |\[)([A-Za-z0-9_.\[\]-]+): (.*)")


@pytest.fixture(scope="module")
def lmi_namespace(cluster: LocalCluster) -> Iterator[str]:
    """The LMIModel CRD installed from crds/ (Established) and a namespace for this module."""
    cluster.kubectl("apply", "--server-side", "-f", str(REPO / "crds" / crd.FILENAME))
    cluster.kubectl("wait", "--for=condition=Established", f"crd/{CRD_NAME}", "--timeout=60s")
    name = f"api-{uuid.uuid4().hex[:8]}"
    cluster.kubectl("create", "namespace", name)
    try:
        yield name
    finally:
        cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


def field_errors(text: str) -> list[tuple[str, str]]:
    """(path, message) of each field error in kubectl's output."""
    return [(m.group(1), m.group(2)) for m in FIELD_ERROR.finditer(text)]


def rejected_at(text: str, path: str, gist: str) -> bool:
    """Whether the API server's answer has an error at `path` (or an item of it) saying `gist`."""
    for where, message in field_errors(text):
        if (where == path or where.startswith(f"{path}[")) and gist in message:
            return True
    # Unknown fields fail decoding, before validation, in another format.
    return f'unknown field "{path}"' in text and gist in text


def get_json(cluster: LocalCluster, namespace: str, *args: str) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(cluster.kubectl("get", "-n", namespace, *args, "-o", "json").stdout)
    return out


def test_crd_is_accepted_with_its_cel_rules(cluster: LocalCluster, lmi_namespace: str) -> None:
    got = json.loads(cluster.kubectl("get", "crd", CRD_NAME, "-o", "json").stdout)
    conditions = {c["type"]: c for c in got["status"]["conditions"]}
    assert conditions["Established"]["status"] == "True"
    assert conditions["NamesAccepted"]["status"] == "True"
    assert "NonStructuralSchema" not in conditions
    served = got["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    assert served == crd.openapi_schema()


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_is_accepted_and_defaulted_as_pydantic_does(
    cluster: LocalCluster, lmi_namespace: str, path: Path
) -> None:
    cluster.kubectl("apply", "-n", lmi_namespace, "-f", str(path))
    for doc in example_models(path):
        stored = get_json(cluster, lmi_namespace, "lmimodel", doc["metadata"]["name"])
        # The API server's defaults and pydantic's agree: same spec either way.
        assert api.parse_lmimodel(stored).spec == api.parse_lmimodel(doc).spec
        assert stored["spec"]["engine"]["mode"] in ("async", "rollingBatch")
        assert stored["spec"]["startup"]["timeoutSeconds"] >= 3600


@pytest.mark.parametrize("case", INVALID, ids=lambda c: c.name)
def test_invalid_spec_is_rejected_naming_the_field(
    cluster: LocalCluster, lmi_namespace: str, case: Invalid
) -> None:
    proc = cluster.kubectl(
        "create",
        "--dry-run=server",
        "-n",
        lmi_namespace,
        "-f",
        "-",
        input=json.dumps(case.obj()),
        check=False,
    )
    assert proc.returncode != 0, f"accepted: {proc.stdout}"
    assert rejected_at(proc.stderr, case.path, case.gist), proc.stderr


def test_an_update_that_breaks_a_rule_is_rejected(cluster: LocalCluster, lmi_namespace: str) -> None:
    doc = example_models(REPO / "examples" / "falcon-11b.yaml")[0]
    cluster.kubectl("apply", "-n", lmi_namespace, "-f", "-", input=json.dumps(doc))
    proc = cluster.kubectl(
        "patch", "lmi", "falcon-11b", "-n", lmi_namespace, "--type=merge",
        "-p", json.dumps({"spec": {"resources": {"gpus": 4}}}), check=False,
    )  # fmt: skip
    assert proc.returncode != 0
    assert rejected_at(proc.stderr, "spec.engine.tensorParallelDegree", "must equal resources.gpus"), (
        proc.stderr
    )


def test_explain_shows_the_descriptions(cluster: LocalCluster, lmi_namespace: str) -> None:
    out = cluster.kubectl("explain", "lmimodel.spec.engine").stdout
    engine = api.LMIModelSpec.model_fields["engine"].description or ""
    assert engine.split(",")[0] in out
    for field in ("tensorParallelDegree", "maxRollingBatchSize", "quantize", "options", "mode"):
        assert field in out
    assert "GPUs one model copy is split across" in out
    out = cluster.kubectl("explain", "lmi.spec.lora.maxCpuLoras").stdout
    assert "Adapters cached in CPU memory" in out


def test_get_shows_the_columns_and_scale_drives_replicas(
    cluster: LocalCluster, lmi_namespace: str, operator: OperatorThread
) -> None:
    doc = next(d for d in example_docs(REPO / "examples" / "runtime-fp8.yaml") if d["kind"] == api.KIND)
    doc["metadata"]["name"] = "columns"
    cluster.kubectl("apply", "-n", lmi_namespace, "-f", "-", input=json.dumps(doc))
    # The columns show what the operator writes into status.
    cluster.kubectl("wait", "-n", lmi_namespace, "--for=condition=Ready", "lmi/columns", "--timeout=60s")

    header, row = cluster.kubectl("get", "lmi", "columns", "-n", lmi_namespace).stdout.splitlines()
    # ADAPTERS is empty for a model without LoRA (tests/test_operator.py reads it for one with), and
    # PROFILE for one without spec.profiles (tests/test_profiles.py reads it for one with).
    assert header.split() == [
        "NAME",
        "MODEL",
        "TP",
        "QUANTIZE",
        "READY",
        "STATUS",
        "STARTUP",
        "ADAPTERS",
        "PROFILE",
        "AGE",
    ]
    assert row.split()[:7] == [
        "columns",
        "meta-llama/Llama-3.1-70B-Instruct",
        "4",
        "fp8",
        "1/1",
        "Available",
        "Ready",
    ]
    wide_header = cluster.kubectl("get", "lmi", "-n", lmi_namespace, "-o", "wide").stdout.splitlines()[0]
    assert "GPUS" in wide_header.split() and "ENDPOINT" in wide_header.split()
    assert "columns" in cluster.kubectl("get", "ai", "-n", lmi_namespace, "-o", "name").stdout

    cluster.kubectl("scale", "lmi", "columns", "-n", lmi_namespace, "--replicas=2")
    assert get_json(cluster, lmi_namespace, "lmi", "columns")["spec"]["replicas"] == 2
    scale_path = f"/apis/{api.GROUP}/{api.VERSION}/namespaces/{lmi_namespace}/lmimodels/columns/scale"

    def scaled() -> dict[str, Any] | None:
        scale: dict[str, Any] = json.loads(cluster.kubectl("get", "--raw", scale_path).stdout)
        return scale if scale["status"].get("replicas") == 2 else None

    scale = eventually(scaled, what="the scale subresource to report 2 replicas")
    assert scale["spec"]["replicas"] == 2
    assert (
        scale["status"]["selector"]
        == "app.kubernetes.io/managed-by=lmi-operator,serving.lmi.dev/model=columns"
    )


def test_status_is_not_writable_through_the_main_resource(cluster: LocalCluster, lmi_namespace: str) -> None:
    doc = yaml.safe_load((REPO / "examples" / "phi-2.yaml").read_text())
    doc["status"] = {"ready": "9/9"}
    cluster.kubectl("apply", "-n", lmi_namespace, "-f", "-", input=json.dumps(doc))
    assert get_json(cluster, lmi_namespace, "lmi", "phi-2").get("status", {}).get("ready") != "9/9"
