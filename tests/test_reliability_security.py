"""Pod security and secrets (issue 8, items 6 and 7): runtime pods and the operator pod are admitted
by namespaces that enforce the restricted Pod Security Standard; rendering never yields a privileged
or root container; the HF token reaches pods only through secretKeyRef and shows up nowhere else."""

from __future__ import annotations

import base64
import json
import logging
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmi_operator.api import parse_lmimodel
from lmi_operator.render import render
from lmi_operator.settings import OperatorSettings
from lmi_operator.testing.cluster import REPO_ROOT, LocalCluster
from lmi_operator.testing.operator import OperatorThread
from lmi_operator.testing.volumes import host_volume
from tests.kubeapi import Api
from tests.waiting import eventually

EXAMPLES = REPO_ROOT / "examples"
RESTRICTED = {
    "pod-security.kubernetes.io/enforce": "restricted",
    "pod-security.kubernetes.io/enforce-version": "latest",
}


@pytest.fixture
def restricted_ns(cluster: LocalCluster) -> Iterator[str]:
    """A fresh namespace that enforces the restricted Pod Security Standard."""
    name = f"r-{uuid.uuid4().hex[:8]}"
    labels = [f"{k}={v}" for k, v in RESTRICTED.items()]
    cluster.kubectl("create", "namespace", name)
    cluster.kubectl("label", "namespace", name, *labels)
    try:
        yield name
    finally:
        cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


def get_json(cluster: LocalCluster, *args: str) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(cluster.kubectl("get", *args, "-o", "json").stdout)
    return out


def ready_reason(obj: dict[str, Any], ctype: str = "Ready") -> str | None:
    status = obj.get("status") or {}
    if status.get("observedGeneration") != obj["metadata"]["generation"]:
        return None
    found = [c for c in status.get("conditions", []) if c["type"] == ctype]
    return found[0].get("reason") if found else None


def pod_of(template: dict[str, Any], name: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": template["metadata"].get("labels", {})},
        "spec": template["spec"],
    }


# -- 6. pod security --------------------------------------------------------------------------------


@pytest.mark.cluster
def test_restricted_namespaces_reject_a_privileged_pod(cluster: LocalCluster, restricted_ns: str) -> None:
    # The control: enforcement is on in this API server, so the admissions below mean something.
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "root"},
        "spec": {"containers": [{"name": "c", "image": "x", "securityContext": {"privileged": True}}]},
    }
    proc = cluster.kubectl(
        "create", "-n", restricted_ns, "--dry-run=server", "-f", "-", input=json.dumps(pod), check=False
    )
    assert proc.returncode != 0 and "violates PodSecurity" in proc.stderr, proc.stderr


def expected_reason(model: dict[str, Any]) -> str:
    """Available; for a model whose replicas span nodes, the missing LeaderWorkerSet API, which this
    cluster does not serve (tests/test_multi_node.py runs those examples where it does)."""
    return "MissingPrerequisite" if model["spec"]["resources"].get("nodes", 1) > 1 else "Available"


@pytest.mark.cluster
def test_every_example_runs_in_a_restricted_namespace(
    cluster: LocalCluster, operator: OperatorThread, restricted_ns: str
) -> None:
    names: list[str] = []
    # The examples' cache claims (one the operator makes, one the example brings) bind to these, as a
    # cluster's provisioner would give them volumes; the PV controller binds them for real.
    for index in range(2):
        volume = host_volume(f"{restricted_ns}-cache-{index}", Path(f"/tmp/{restricted_ns}-cache-{index}"))
        cluster.kubectl("apply", "-f", "-", input=json.dumps(volume))
    for path in sorted(EXAMPLES.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc:
                continue
            if doc["kind"] == "LMIModel":
                names.append(doc["metadata"]["name"])
            cluster.kubectl("apply", "-n", restricted_ns, "-f", "-", input=json.dumps(doc))

    def all_available() -> list[str] | None:
        items = get_json(cluster, "lmimodels", "-n", restricted_ns)["items"]
        pending = [m["metadata"]["name"] for m in items if ready_reason(m) != expected_reason(m)]
        return None if pending or len(items) < len(names) else names

    try:
        eventually(all_available, timeout=120, interval=1, what="every example Available")
    except AssertionError:
        items = get_json(cluster, "lmimodels", "-n", restricted_ns)["items"]
        states = {m["metadata"]["name"]: ready_reason(m) for m in items}
        raise AssertionError(f"not all examples Available in a restricted namespace: {states}") from None
    events = cluster.kubectl("get", "events", "-n", restricted_ns, "-o", "json").stdout
    assert "violates PodSecurity" not in events
    pods = get_json(cluster, "pods", "-n", restricted_ns)["items"]
    assert len(pods) >= len(names)


@pytest.mark.cluster
def test_the_operator_pod_is_admitted_by_a_restricted_namespace(
    cluster: LocalCluster, restricted_ns: str
) -> None:
    helm = cluster.bin_dir / "helm"
    assert helm.exists(), f"{helm} is missing; run `make tools`"
    rendered = subprocess.run(
        [str(helm), "template", "lmi", str(REPO_ROOT / "charts" / "lmi-operator"), "-n", restricted_ns],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    deployment = next(
        d for d in yaml.safe_load_all(rendered) if d and d["kind"] == "Deployment"
    )  # the operator's own
    pod = pod_of(deployment["spec"]["template"], "operator-admission-check")
    pod["spec"]["serviceAccountName"] = "default"  # the chart's account is not created here
    proc = cluster.kubectl(
        "create", "-n", restricted_ns, "--dry-run=server", "-f", "-", input=json.dumps(pod), check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert "Warning" not in proc.stderr, proc.stderr


# Random valid specs: the fields that shape the pod, including what a user may inject (env, tolerations,
# affinity, node selectors, images, handlers) and GPU counts that keep the spec valid.
NAME = st.from_regex(r"[a-z]([a-z0-9-]{0,20}[a-z0-9])?", fullmatch=True)
TEXT = st.text(max_size=30)
ENV_NAME = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,15}", fullmatch=True).filter(
    lambda n: not n.startswith(("OPTION_", "HF_", "SERVING_", "TENSOR_PARALLEL"))
)


@st.composite
def valid_specs(draw: st.DrawFn) -> dict[str, Any]:
    gpus = draw(st.sampled_from([0, 1, 2, 4, 8]))
    spec: dict[str, Any] = {
        "model": {
            "id": draw(
                st.sampled_from(["Qwen/Qwen2.5-0.5B-Instruct", "/opt/ml/model", "s3://bucket/models/x"])
            )
        },
        "engine": {"tensorParallelDegree": draw(st.sampled_from([gpus or 1, "max"]))},
        "resources": {"gpus": gpus},
        "replicas": draw(st.integers(min_value=0, max_value=1000)),
    }
    if draw(st.booleans()):
        spec["model"]["hfTokenSecretRef"] = {"name": draw(NAME), "key": draw(st.just("token") | NAME)}
    if draw(st.booleans()):
        spec["image"] = draw(st.sampled_from(["ghcr.io/x/y:1", "root/evil:latest", "busybox"]))
    env = draw(st.lists(ENV_NAME, max_size=5, unique=True))
    spec["env"] = [{"name": n, "value": draw(TEXT)} for n in env]
    if draw(st.booleans()):
        spec["scheduling"] = {
            "nodeSelector": draw(st.dictionaries(NAME, NAME, max_size=3)),
            "tolerations": [{"key": draw(NAME), "operator": "Exists"}],
            "affinity": {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": []}},
        }
    if draw(st.booleans()):
        spec["handler"] = {"modelPy": draw(st.text(min_size=1, max_size=30))}
    if draw(st.booleans()):
        lo = draw(st.integers(min_value=1, max_value=10))
        spec["autoscaling"] = {
            "minReplicas": lo,
            "maxReplicas": lo + draw(st.integers(0, 10)),
            "targetCPUUtilizationPercentage": 80,
        }
    if draw(st.booleans()):
        spec["resources"] |= {"cpu": draw(st.sampled_from(["500m", 4])), "memory": "8Gi", "shmSize": "1Gi"}
    return {
        "apiVersion": "serving.lmi.dev/v1alpha1",
        "kind": "LMIModel",
        "metadata": {"name": draw(NAME), "namespace": "ns", "uid": str(uuid.uuid4()), "generation": 1},
        "spec": spec,
    }


def restricted_violations(pod_spec: dict[str, Any]) -> list[str]:
    """The checks of the restricted Pod Security Standard (and no root), on one pod spec."""
    bad: list[str] = []
    psc = pod_spec.get("securityContext", {})
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if pod_spec.get(key):
            bad.append(key)
    if any("hostPath" in v for v in pod_spec.get("volumes", [])):
        bad.append("hostPath volume")
    if psc.get("runAsUser") == 0:
        bad.append("pod runAsUser 0")
    for c in pod_spec.get("containers", []) + pod_spec.get("initContainers", []):
        sc = c.get("securityContext", {})
        if sc.get("privileged"):
            bad.append(f"{c['name']}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            bad.append(f"{c['name']}: allowPrivilegeEscalation not false")
        if "ALL" not in sc.get("capabilities", {}).get("drop", []):
            bad.append(f"{c['name']}: capabilities not dropped")
        if set(sc.get("capabilities", {}).get("add", [])) - {"NET_BIND_SERVICE"}:
            bad.append(f"{c['name']}: capabilities added")
        if not (sc.get("runAsNonRoot") or psc.get("runAsNonRoot")):
            bad.append(f"{c['name']}: runAsNonRoot not set")
        if sc.get("runAsUser", psc.get("runAsUser")) in (0, None):
            bad.append(f"{c['name']}: may run as root")
        seccomp = sc.get("seccompProfile", psc.get("seccompProfile", {})).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            bad.append(f"{c['name']}: seccomp {seccomp}")
        if any(p.get("hostPort") for p in c.get("ports", [])):
            bad.append(f"{c['name']}: hostPort")
        for var in c.get("env", []):
            if var["name"] == "HF_TOKEN" and "value" in var:
                bad.append("HF_TOKEN as a literal value")
    return bad


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(doc=valid_specs())
def test_rendering_never_yields_a_privileged_or_root_container(doc: dict[str, Any]) -> None:
    rendered = render(parse_lmimodel(doc), OperatorSettings())
    deployment = rendered.by_kind("Deployment")
    assert deployment is not None
    pod_spec = deployment["spec"]["template"]["spec"]
    assert restricted_violations(pod_spec) == []
    assert pod_spec["automountServiceAccountToken"] is False
    ref = doc["spec"]["model"].get("hfTokenSecretRef")
    env = {v["name"]: v for v in pod_spec["containers"][0]["env"]}
    if ref:
        assert env["HF_TOKEN"] == {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": ref}}


@pytest.mark.cluster
def test_random_rendered_pods_are_admitted_by_a_restricted_namespace(
    cluster: LocalCluster, restricted_ns: str
) -> None:
    # The API server's own Pod Security admission judges 25 random renders (server-side dry run).
    api = Api(cluster.kubeconfig)
    admitted = 0

    @settings(max_examples=25, deadline=None, database=None)
    @given(doc=valid_specs())
    def check(doc: dict[str, Any]) -> None:
        nonlocal admitted
        doc["metadata"]["namespace"] = restricted_ns
        deployment = render(parse_lmimodel(doc), OperatorSettings()).by_kind("Deployment")
        assert deployment is not None
        pod = pod_of(deployment["spec"]["template"], f"check-{uuid.uuid4().hex[:8]}")
        code, body = api.request("POST", f"/api/v1/namespaces/{restricted_ns}/pods?dryRun=All", pod)
        assert code == 201, body
        admitted += 1

    check()
    assert admitted >= 20


# -- 7. secrets ---------------------------------------------------------------------------------------


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture
def operator_log() -> Iterator[_Capture]:
    """Every log line of the in-process operator (and kopf) at DEBUG, while the test runs."""
    capture = _Capture()
    loggers = [logging.getLogger(n) for n in ("lmi_operator", "kopf", "kopf.objects", "aiohttp")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.DEBUG)
        lg.addHandler(capture)
    try:
        yield capture
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.removeHandler(capture)
            lg.setLevel(level)


@pytest.mark.cluster
def test_the_hf_token_appears_only_in_its_secret(
    cluster: LocalCluster, operator: OperatorThread, restricted_ns: str, operator_log: _Capture
) -> None:
    token = f"hf_{uuid.uuid4().hex}"
    encoded = base64.b64encode(token.encode()).decode()
    cluster.kubectl(
        "create", "secret", "generic", "hf-token", "-n", restricted_ns, f"--from-literal=token={token}"
    )
    doc = {
        "apiVersion": "serving.lmi.dev/v1alpha1",
        "kind": "LMIModel",
        "metadata": {"name": "gated"},
        "spec": {
            "model": {"id": "meta-llama/Llama-3.1-8B-Instruct", "hfTokenSecretRef": {"name": "hf-token"}},
            "engine": {"tensorParallelDegree": 1},
            "resources": {"gpus": 1},
            "replicas": 2,
        },
    }
    cluster.kubectl("apply", "-n", restricted_ns, "-f", "-", input=json.dumps(doc))
    eventually(
        lambda: ready_reason(get_json(cluster, "lmimodel", "gated", "-n", restricted_ns)) == "Available",
        timeout=60,
    )
    # A spec change and a rollout: more events, more status writes, more log lines to search.
    cluster.kubectl(
        "patch", "lmimodel", "gated", "-n", restricted_ns, "--type=merge", "-p", '{"spec":{"replicas":1}}'
    )
    eventually(
        lambda: (
            (m := get_json(cluster, "lmimodel", "gated", "-n", restricted_ns))
            and ready_reason(m) == "Available"
            and m["status"].get("readyReplicas") == 1
        ),
        timeout=60,
    )
    time.sleep(1)
    kinds = "lmimodels,configmaps,deployments,replicasets,pods,services,events,poddisruptionbudgets"
    everything = cluster.kubectl(
        "get", kinds, "-n", restricted_ns, "-o", "json", "--show-managed-fields"
    ).stdout
    assert json.loads(everything)["items"], "nothing to search"
    for needle in (token, encoded):
        assert needle not in everything, "the token leaked into an object other than its Secret"
        assert not any(needle in line for line in operator_log.lines), "the token is in the operator log"
    assert operator_log.lines, "no operator log captured"
    deployment = get_json(cluster, "deployment", "gated", "-n", restricted_ns)
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    token_vars = [v for v in container["env"] if v["name"] == "HF_TOKEN"]
    assert token_vars == [
        {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf-token", "key": "token"}}}
    ]
    for pod in get_json(cluster, "pods", "-n", restricted_ns)["items"]:
        for c in pod["spec"]["containers"]:
            assert all("value" not in v for v in c.get("env", []) if v["name"] == "HF_TOKEN")


@pytest.mark.cluster
def test_a_missing_secret_is_reported_from_the_pod_without_reading_secrets(
    cluster: LocalCluster, operator: OperatorThread, namespace: str, operator_log: _Capture
) -> None:
    doc = {
        "apiVersion": "serving.lmi.dev/v1alpha1",
        "kind": "LMIModel",
        "metadata": {"name": "nosecret"},
        "spec": {
            # kwok's fault stage reports what a kubelet reports when the Secret is missing.
            "image": "fault.lmi.test/nosecret:1",
            "model": {"id": "x/y", "hfTokenSecretRef": {"name": "absent", "key": "token"}},
            "engine": {"tensorParallelDegree": 1},
            "resources": {"gpus": 1},
        },
    }
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(doc))
    eventually(
        lambda: (
            ready_reason(get_json(cluster, "lmimodel", "nosecret", "-n", namespace), "Degraded")
            == "MissingSecret"
        ),
        timeout=60,
    )
    time.sleep(2)
    before = operator.writes_in(namespace)
    time.sleep(10)
    # Reported once; nothing written while nothing changes.
    assert operator.writes_in(namespace) == before
    calls = operator.reconciler.client.requests_by_path if operator.reconciler else {}
    assert not [path for _, path in calls if "/secrets" in path], "the operator read a Secret"
    failures = [line for line in operator_log.lines if "nosecret" in line and "failed" in line]
    assert not failures, failures
    obj = get_json(cluster, "lmimodel", "nosecret", "-n", namespace)
    degraded = next(c for c in obj["status"]["conditions"] if c["type"] == "Degraded")
    assert degraded["status"] == "True" and 'secret "absent" not found' in degraded["message"]
    assert "spec.model.hfTokenSecretRef" in degraded["message"]
