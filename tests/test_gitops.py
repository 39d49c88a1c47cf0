"""GitOps health of LMIModels, on objects captured live from real reconciles: the Argo CD health check
(deploy/argocd/lmimodel-health.lua) run by a real Lua runtime (lupa), and Flux's kstatus library
(sigs.k8s.io/cli-utils/pkg/kstatus) through tools/kstatus-check."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from lupa import LuaRuntime

from lmi_operator import chartdocs
from lmi_operator.settings import OperatorSettings
from lmi_operator.testing.cluster import REPO_ROOT, LocalCluster, tools_bin_dir
from lmi_operator.testing.operator import OperatorThread
from tests.waiting import eventually

pytestmark = pytest.mark.cluster

FAULT = "fault.lmi.test/{}:1"
# name -> (spec changes, Ready reason it must reach, Argo CD health, kstatus status)
CASES: dict[str, tuple[dict[str, Any], str, str, str]] = {
    "ready": ({}, "Available", "Healthy", "Current"),
    # Rolling out: the pod waits for a node of a pool that is not there yet (say, being provisioned).
    "rolling-out": (
        {"scheduling": {"nodeSelector": {"example.com/pool": "provisioning"}}},
        "RolloutInProgress",
        "Progressing",
        "InProgress",
    ),
    "no-gpus": (
        {"engine": {"tensorParallelDegree": 16}, "resources": {"gpus": 16}},
        "InsufficientGPU",
        "Degraded",
        "Failed",
    ),
    "crashloop": ({"image": FAULT.format("crashloop")}, "CrashLoop", "Degraded", "Failed"),
    "imagepull": ({"image": FAULT.format("imagepull")}, "ImagePullFailed", "Degraded", "Failed"),
    "oomkilled": ({"image": FAULT.format("oomkilled")}, "OOMKilled", "Degraded", "Failed"),
    "invalid": ({"engine": {"options": {"enforce_eagr": "true"}}}, "InvalidSpec", "Degraded", "Failed"),
    # The kubelet cannot start the pods without the Secret (kwok's fault stage says so as it does).
    "no-secret": (
        {
            "image": FAULT.format("nosecret"),
            "model": {"id": "meta-llama/Llama-3.1-8B-Instruct", "hfTokenSecretRef": {"name": "absent"}},
        },
        "MissingSecret",
        "Degraded",
        "Failed",
    ),
    "too-slow": (
        {"image": FAULT.format("slowstart"), "startup": {"timeoutSeconds": 60}},
        "StartupTimeout",
        "Degraded",
        "Failed",
    ),
}


def manifest(name: str, changes: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "model": {"id": "microsoft/phi-2"},
        "engine": {"maxModelLen": 2048},
        "resources": {"gpus": 1, "cpu": 4, "memory": "24Gi"},
    }
    for key, value in changes.items():
        spec[key] = {**spec.get(key, {}), **value} if isinstance(value, dict) else value
    return {
        "apiVersion": "serving.lmi.dev/v1alpha1",
        "kind": "LMIModel",
        "metadata": {"name": name},
        "spec": spec,
    }


def live(cluster: LocalCluster, ns: str, name: str) -> dict[str, Any]:
    obj: dict[str, Any] = json.loads(cluster.kubectl("get", "lmimodel", name, "-n", ns, "-o", "json").stdout)
    return obj


def ready_reason(obj: dict[str, Any]) -> str:
    conds = (obj.get("status") or {}).get("conditions", [])
    return next((c["reason"] for c in conds if c["type"] == "Ready"), "")


def in_state(cluster: LocalCluster, ns: str, name: str, reason: str) -> dict[str, Any] | None:
    obj = live(cluster, ns, name)
    return obj if ready_reason(obj) == reason else None


@pytest.fixture(scope="module")
def captured(cluster: LocalCluster, lmi_crd: str) -> Iterator[dict[str, dict[str, Any]]]:
    """Each case's LMIModel as `kubectl get -o json` returns it once the operator reported its state."""
    ns = f"gitops-{uuid.uuid4().hex[:6]}"
    cluster.kubectl("create", "namespace", ns)
    settings = OperatorSettings(namespaces=(ns,), leader_election=False, metrics_port=0, health_port=0)
    op = OperatorThread(cluster.kubeconfig, settings).start()
    try:
        docs = [manifest(name, changes) for name, (changes, *_) in CASES.items()]
        cluster.kubectl("apply", "-n", ns, "-f", "-", input=yaml.safe_dump_all(docs))
        objs: dict[str, dict[str, Any]] = {}
        for name, (_, reason, *_) in CASES.items():
            objs[name] = eventually(
                lambda name=name, reason=reason: in_state(cluster, ns, name, reason),
                timeout=150,
                interval=1,
                what=f"{name} Ready reason {reason}",
            )
        yield objs
    finally:
        op.stop()
        cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)


def _to_lua(lua: Any, value: Any) -> Any:
    if isinstance(value, dict):
        return lua.table_from({k: _to_lua(lua, v) for k, v in value.items()})
    if isinstance(value, list):
        return lua.table_from([_to_lua(lua, v) for v in value])
    return value


def argocd_health(obj: dict[str, Any]) -> dict[str, str]:
    """Run the health check the way Argo CD does: the resource as global `obj`, `hs` returned."""
    lua = LuaRuntime(unpack_returned_tuples=True)
    lua.globals().obj = _to_lua(lua, obj)
    hs = lua.execute(chartdocs.ARGOCD_HEALTH.read_text())
    return {"status": str(hs["status"]), "message": str(hs["message"])}


def kstatus(obj: dict[str, Any]) -> dict[str, str]:
    checker = tools_bin_dir() / "kstatus-check"
    assert checker.exists(), f"{checker} missing: run `bash tools/build-tools.sh kstatus`"
    out = subprocess.run([str(checker)], input=json.dumps(obj), capture_output=True, text=True, check=True)
    result: dict[str, str] = json.loads(out.stdout)
    return result


@pytest.mark.parametrize("name", list(CASES))
def test_argocd_health_of_live_objects(captured: dict[str, dict[str, Any]], name: str) -> None:
    obj = captured[name]
    _, reason, argo, _ = CASES[name]
    health = argocd_health(obj)
    assert health["status"] == argo, (health, obj["status"])
    problem = next(c for c in obj["status"]["conditions"] if c["type"] == "Degraded")
    if problem["status"] == "True":
        assert problem["reason"] in health["message"], health
    if argo != "Healthy":
        assert reason in health["message"], health


@pytest.mark.parametrize("name", list(CASES))
def test_kstatus_of_live_objects(captured: dict[str, dict[str, Any]], name: str) -> None:
    obj = captured[name]
    result = kstatus(obj)
    assert result["status"] == CASES[name][3], (result, obj["status"])


def test_a_generation_not_yet_observed_is_progressing(captured: dict[str, dict[str, Any]]) -> None:
    newer = copy.deepcopy(captured["ready"])
    newer["metadata"]["generation"] += 1
    assert argocd_health(newer)["status"] == "Progressing"
    assert kstatus(newer)["status"] == "InProgress"
    fresh = copy.deepcopy(captured["ready"])
    del fresh["status"]
    assert argocd_health(fresh) == {
        "status": "Progressing",
        "message": "Waiting for the operator to report status",
    }


def test_kstatus_on_a_list(cluster: LocalCluster, captured: dict[str, dict[str, Any]]) -> None:
    items = [captured["ready"], captured["crashloop"]]
    checker = tools_bin_dir() / "kstatus-check"
    out = subprocess.run(
        [str(checker)],
        input=json.dumps({"apiVersion": "v1", "kind": "List", "items": items}),
        capture_output=True,
        text=True,
        check=True,
    )
    assert [r["status"] for r in json.loads(out.stdout)] == ["Current", "Failed"]


def _yaml_blocks(text: str) -> list[Any]:
    return [
        doc for block in re.findall(r"```yaml\n(.*?)```", text, re.S) for doc in yaml.safe_load_all(block)
    ]


def test_docs_show_argocd_flux_and_ignore_differences() -> None:
    text = (REPO_ROOT / "docs" / "gitops.md").read_text()
    docs = [d for d in _yaml_blocks(text) if isinstance(d, dict)]
    kinds = {d.get("kind") for d in docs}
    assert {"Application", "Kustomization", "ConfigMap"} <= kinds, kinds
    (cm,) = [d for d in docs if d.get("kind") == "ConfigMap"]
    assert cm["data"] == yaml.safe_load(chartdocs.ARGOCD_CM.read_text())["data"]
    (app,) = [d for d in docs if d.get("kind") == "Application"]
    ignored = app["spec"]["ignoreDifferences"]
    assert any(i["kind"] == "LMIModel" and "/spec/replicas" in i["jsonPointers"] for i in ignored), ignored
    flux = [d for d in docs if d.get("kind") == "Kustomization" and "healthChecks" in d.get("spec", {})]
    assert flux and any(h["kind"] == "LMIModel" for h in flux[0]["spec"]["healthChecks"])


def test_argocd_configmap_is_generated_from_the_lua_file(tmp_path: Path) -> None:
    cm = yaml.safe_load(chartdocs.ARGOCD_CM.read_text())
    assert cm["data"]["resource.customizations.health.serving.lmi.dev_LMIModel"] == (
        chartdocs.ARGOCD_HEALTH.read_text()
    )
