"""The Helm chart with the real helm binary and the real control plane: lint, template, schema, the
generated files, install/upgrade/uninstall into a restricted namespace, and the chart's RBAC proved
both ways: the operator, running with the chart ServiceAccount's token, reconciles models to Ready
without one denied request; `kubectl auth can-i` shows what it must not do."""

from __future__ import annotations

import json
import logging
import subprocess
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from lmi_operator import chartdocs
from lmi_operator.children import namespace_going
from lmi_operator.kube import ApiError
from lmi_operator.reconciler import Reconciler
from lmi_operator.settings import OperatorSettings
from lmi_operator.testing.cluster import REPO_ROOT, LocalCluster, tools_bin_dir
from lmi_operator.testing.operator import OperatorThread
from tests.waiting import eventually

CHART = chartdocs.CHART
CI_VALUES = sorted((CHART / "ci").glob("*.yaml"))


@pytest.fixture(scope="module")
def helm() -> Path:
    path = tools_bin_dir() / "helm"
    assert path.exists(), f"{path} missing: run `make tools`"
    return path


def run_helm(helm: Path, *args: str, kubeconfig: Path | None = None, check: bool = True) -> str:
    cmd = [str(helm), *args] + (["--kubeconfig", str(kubeconfig)] if kubeconfig else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"helm {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )
    return proc.stdout if proc.returncode == 0 else proc.stderr


def template(helm: Path, *args: str) -> list[dict[str, Any]]:
    out = run_helm(helm, "template", "rel", str(CHART), "--namespace", "ops", *args)
    return [d for d in yaml.safe_load_all(out) if d]


def by_kind(objs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] == kind]


def env_of(deployment: dict[str, Any]) -> dict[str, str]:
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e.get("value", "<from-field>") for e in container["env"]}


# -- without a cluster ----------------------------------------------------------------------------


@pytest.mark.parametrize("values", [None, *CI_VALUES], ids=lambda v: v.name if v else "defaults")
def test_helm_lint_strict(helm: Path, values: Path | None) -> None:
    out = run_helm(helm, "lint", "--strict", str(CHART), *(["-f", str(values)] if values else []))
    assert "1 chart(s) linted, 0 chart(s) failed" in out


@pytest.mark.parametrize("values", CI_VALUES, ids=lambda v: v.name)
def test_template_with_each_ci_values_file(helm: Path, values: Path) -> None:
    objs = template(helm, "-f", str(values))
    given = yaml.safe_load(values.read_text()) or {}
    (deployment,) = by_kind(objs, "Deployment")
    env = env_of(deployment)
    # Every LMI_OPERATOR_* variable the chart sets is a setting the operator accepts.
    settings = OperatorSettings.from_env({k: v for k, v in env.items() if k.startswith("LMI_OPERATOR_")})
    # The chart sets every setting the operator has (a new one fails here until the chart has it).
    assert {k.removeprefix("LMI_OPERATOR_").lower() for k in env if k.startswith("LMI_OPERATOR_")} == set(
        OperatorSettings.model_fields
    )
    assert settings.namespaces == tuple(given.get("watchNamespaces", ()))
    # spec.cache's default reaches the operator as the same object (camelCase keys, as in a spec).
    default_cache = given.get("operator", {}).get("defaultCache")
    assert (
        settings.default_cache.model_dump(by_alias=True, exclude_none=True)
        if settings.default_cache
        else None
    ) == (default_cache or None)
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["seccompProfile"]
    # Service variables would add LMI_OPERATOR_METRICS_* settings the operator refuses to start with.
    assert pod["enableServiceLinks"] is False
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert container["resources"]["requests"] and container["resources"]["limits"]
    for obj in objs:  # nothing anywhere may read Secrets, nor use wildcards
        for rule in obj.get("rules", []):
            assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"], rule
            assert "secrets" not in rule["resources"], rule
    leader = settings.leader_election
    assert leader == (given.get("replicaCount", 1) > 1), env
    assert deployment["spec"]["strategy"]["type"] == ("RollingUpdate" if leader else "Recreate")
    roles = {(r["metadata"]["namespace"], r["metadata"]["name"]) for r in by_kind(objs, "Role")}
    if values.name == "namespaced-values.yaml":
        assert {ns for ns, _ in roles} == {"team-a", "team-b"}
        (cluster_role,) = by_kind(objs, "ClusterRole")
        assert {(tuple(r["resources"]), tuple(r["verbs"])) for r in cluster_role["rules"]} == {
            (("pods",), ("list",)),
            (("nodes",), ("list",)),
        }
        assert env["PYTHONUNBUFFERED"] == "1" and settings.gpu_resource_name == "amd.com/gpu"
    if values.name == "ha-values.yaml":
        assert roles == {("ops", "rel-lmi-operator-leader-election")}
        (role,) = by_kind(objs, "Role")
        assert role["rules"][1]["resourceNames"] == ["lmi-leader"] and settings.lease_name == "lmi-leader"
        assert len(by_kind(objs, "ServiceMonitor")) == 1
        assert container["image"] == "ghcr.io/lmi-operator/lmi-operator:0.1.0-rc1"
    if values.name == "no-rbac-values.yaml":
        assert [o["kind"] for o in objs] == ["Deployment"]
        assert pod["serviceAccountName"] == "platform-operator"
    if values.name == "default-values.yaml":
        assert sorted(o["kind"] for o in objs) == [
            "ClusterRole",
            "ClusterRoleBinding",
            "Deployment",
            "Service",
            "ServiceAccount",
        ]
        assert container["image"] == "ghcr.io/lmi-operator/lmi-operator:0.1.0"


@pytest.mark.parametrize(
    "bad",
    [
        "unknownValue=1",
        "replicaCount=-1",
        "image.pullPolicy=Sometimes",
        "operator.workers=0",
        "metrics.port=70000",
        "watchNamespaces[0]=Not_A_Namespace",
        "operator.unknown=x",
    ],
)
def test_schema_rejects_bad_values(helm: Path, bad: str) -> None:
    proc = subprocess.run(
        [str(helm), "template", "rel", str(CHART), "--set", bad], capture_output=True, text=True
    )
    assert proc.returncode != 0 and "schema" in proc.stderr.lower(), proc.stderr


def _value_paths(values: Any, prefix: str = "") -> Iterator[str]:
    for key, value in values.items():
        if isinstance(value, dict) and value:
            yield from _value_paths(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"


def test_schema_describes_every_value_and_forbids_others() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    described = {path for path, _, _ in chartdocs._leaves(schema, values)}
    free_form = {p for p, node, _ in chartdocs._leaves(schema, values) if node.get("type") == "object"}
    for path in _value_paths(values):
        assert path in described or any(path.startswith(f + ".") for f in free_form), path
    for path, node, _ in chartdocs._leaves(schema, values):
        assert node.get("description"), f"{path} has no description"

    def closed(node: dict[str, Any], where: str) -> None:
        if "properties" in node:
            assert node.get("additionalProperties") is False, f"{where} accepts unknown keys"
            for key, child in node["properties"].items():
                closed(child, f"{where}.{key}")

    closed(schema, "values")


def test_generated_files_are_current(helm: Path) -> None:
    stale = [
        str(path.relative_to(REPO_ROOT))
        for path, text in chartdocs.generate(helm).items()
        if not path.exists() or path.read_text() != text
    ]
    assert not stale, f"stale generated files (run `make chart`): {stale}"


def test_readme_table_lists_every_value() -> None:
    readme = (CHART / "README.md").read_text()
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    for path in _value_paths(values):
        head = path.split(".")
        assert any(f"| `{'.'.join(head[:n])}` |" in readme for n in range(len(head), 0, -1)), path


# -- on the cluster -------------------------------------------------------------------------------


@dataclass
class Release:
    name: str
    namespace: str
    watch: tuple[str, ...]
    model_ns: str

    @property
    def sa(self) -> str:
        return f"system:serviceaccount:{self.namespace}:{self.name}-lmi-operator"

    @property
    def lease(self) -> str:
        return f"{self.name}-lmi-operator"


def _restricted_namespace(cluster: LocalCluster, prefix: str) -> str:
    name = f"{prefix}-{uuid.uuid4().hex[:6]}"
    cluster.kubectl("create", "namespace", name)
    cluster.kubectl("label", "namespace", name, "pod-security.kubernetes.io/enforce=restricted")
    return name


@pytest.fixture(scope="module", params=["clusterwide", "namespaced"])
def release(
    request: pytest.FixtureRequest, cluster: LocalCluster, lmi_crd: str, helm: Path
) -> Iterator[Release]:
    """The chart installed (with leader election) into a restricted namespace; uninstalled after."""
    ns = _restricted_namespace(cluster, "lmi-sys")
    model_ns = f"lmi-models-{uuid.uuid4().hex[:6]}"
    cluster.kubectl("create", "namespace", model_ns)
    watch = (model_ns,) if request.param == "namespaced" else ()
    rel = Release(name=f"r{uuid.uuid4().hex[:5]}", namespace=ns, watch=watch, model_ns=model_ns)
    args = ["--set", "leaderElection.enabled=true", "--wait", "--timeout", "120s"]
    if watch:
        args += ["--set", f"watchNamespaces={{{model_ns}}}"]
    run_helm(helm, "install", rel.name, str(CHART), "-n", ns, *args, kubeconfig=cluster.kubeconfig)
    try:
        yield rel
    finally:
        run_helm(helm, "uninstall", rel.name, "-n", ns, "--wait", kubeconfig=cluster.kubeconfig, check=False)
        for name in (ns, model_ns):
            cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


def get_json(cluster: LocalCluster, *args: str) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(cluster.kubectl("get", *args, "-o", "json").stdout)
    return out


@pytest.mark.cluster
def test_operator_pod_is_admitted_as_restricted_and_ready(cluster: LocalCluster, release: Release) -> None:
    pods = get_json(cluster, "pods", "-n", release.namespace)["items"]
    assert len(pods) == 1
    (pod,) = pods
    assert pod["spec"]["nodeName"] == "cpu-0"
    ready = {c["type"]: c["status"] for c in pod["status"]["conditions"]}
    assert ready["Ready"] == "True"
    # The namespace enforces `restricted`: a pod that breaks it is refused there (the check is live).
    bad = cluster.kubectl(
        "run", "root", "-n", release.namespace, "--image=busybox", "--restart=Never", check=False
    )
    assert bad.returncode != 0 and "violates PodSecurity" in bad.stderr


def can_i(cluster: LocalCluster, release: Release, *args: str) -> bool:
    out = cluster.kubectl("auth", "can-i", *args, f"--as={release.sa}", check=False)
    return out.stdout.strip() == "yes"


@pytest.mark.cluster
def test_auth_can_i_allows_exactly_what_the_operator_does(cluster: LocalCluster, release: Release) -> None:
    m, ns = release.model_ns, release.namespace
    allowed = [
        ("list", "lmimodels.serving.lmi.dev", "-n", m),
        ("watch", "lmimodels.serving.lmi.dev", "-n", m),
        ("patch", "lmimodels.serving.lmi.dev", "--subresource=status", "-n", m),
        ("update", "lmimodels.serving.lmi.dev", "--subresource=finalizers", "-n", m),
        *[
            (v, r, "-n", m)
            for r in ("configmaps", "services", "deployments.apps")
            for v in ("create", "patch")
        ],
        # The ConfigMap and Deployment of a GPU profile taken out of spec.profiles.
        ("delete", "configmaps", "-n", m),
        ("delete", "deployments.apps", "-n", m),
        *[
            (v, r, "-n", m)
            for r in (
                "poddisruptionbudgets.policy",
                "horizontalpodautoscalers.autoscaling",
                "persistentvolumeclaims",
                # The inspection of a GPU model, deleted once its facts are recorded.
                "jobs.batch",
            )
            for v in ("create", "patch", "delete")
        ],
        ("watch", "pods", "-n", m),
        ("create", "events", "-n", m),
        ("patch", "events", "-n", m),
        ("list", "nodes"),
        ("list", "pods", "-A"),
        ("create", "leases.coordination.k8s.io", "-n", ns),
        ("update", f"leases.coordination.k8s.io/{release.lease}", "-n", ns),
    ]
    denied = [
        # MissingSecret comes from the pods' status (the kubelet reads the Secret), not from a read.
        ("get", "secrets", "-n", m),
        ("get", "secrets", "-A"),
        ("list", "secrets", "-A"),
        ("watch", "secrets", "-A"),
        ("list", "secrets", "-n", m),
        ("watch", "secrets", "-n", m),
        ("get", "secrets", "-n", "kube-system")
        if release.watch
        else ("list", "secrets", "-n", "kube-system"),
        ("create", "lmimodels.serving.lmi.dev", "-n", m),
        ("delete", "lmimodels.serving.lmi.dev", "-n", m),
        ("patch", "lmimodels.serving.lmi.dev", "-n", m),
        ("delete", "services", "-n", m),
        ("update", "deployments.apps", "-n", m),
        ("create", "pods", "-n", m),
        ("delete", "pods", "-n", m),
        ("create", "statefulsets.apps", "-n", m),
        ("create", "daemonsets.apps", "-n", m),
        ("create", "cronjobs.batch", "-n", m),
        ("create", "roles.rbac.authorization.k8s.io", "-n", m),
        ("create", "rolebindings.rbac.authorization.k8s.io", "-n", m),
        ("create", "clusterroles.rbac.authorization.k8s.io"),
        ("patch", "nodes"),
        ("watch", "nodes"),
        ("create", "customresourcedefinitions.apiextensions.k8s.io"),
        ("update", "leases.coordination.k8s.io/someone-else", "-n", ns),
        ("create", "leases.coordination.k8s.io", "-n", m),
        ("impersonate", "serviceaccounts"),
    ]
    if release.watch:  # namespaced: nothing in namespaces it does not watch, nothing cluster-wide
        denied += [
            ("list", "lmimodels.serving.lmi.dev", "-A"),
            ("list", "lmimodels.serving.lmi.dev", "-n", "default"),
            ("create", "deployments.apps", "-n", "default"),
            ("watch", "pods", "-A"),
        ]
    else:
        allowed += [("list", "lmimodels.serving.lmi.dev", "-A"), ("watch", "deployments.apps", "-A")]
    wrong = [("should be allowed", a) for a in allowed if not can_i(cluster, release, *a)]
    wrong += [("should be denied", d) for d in denied if can_i(cluster, release, *d)]
    assert not wrong, wrong


def sa_kubeconfig(cluster: LocalCluster, release: Release, path: Path) -> Path:
    """A kubeconfig with only a TokenRequest token of the chart's ServiceAccount."""
    admin = yaml.safe_load(cluster.kubeconfig.read_text())
    token = cluster.kubectl(
        "create", "token", release.sa.rsplit(":", 1)[1], "-n", release.namespace, "--duration=2h"
    ).stdout.strip()
    server = admin["clusters"][0]["cluster"]
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "c", "cluster": server}],
        "users": [{"name": "sa", "user": {"token": token}}],
        "contexts": [
            {"name": "c", "context": {"cluster": "c", "user": "sa", "namespace": release.namespace}}
        ],
        "current-context": "c",
    }
    path.write_text(yaml.safe_dump(config))
    assert "client-certificate" not in path.read_text()
    return path


class RecordingOperator(OperatorThread):
    """An OperatorThread that records every request its client got 401/403 for, except the 403s
    for writes into a namespace being deleted (an earlier test's, seen by a cluster-wide operator)."""

    def __init__(self, kubeconfig: Path, settings: OperatorSettings) -> None:
        super().__init__(kubeconfig, settings)
        self.denied: list[tuple[str, str, int, str]] = []

    def _started(self, reconciler: Reconciler) -> None:
        super()._started(reconciler)
        client = reconciler.client
        original = client.request
        denied = self.denied

        async def request(method: str, path: str, **kwargs: Any) -> dict[str, Any]:
            try:
                return await original(method, path, **kwargs)
            except ApiError as err:
                if err.status in (401, 403) and not namespace_going(err):
                    denied.append((method, path, err.status, err.message[:120]))
                raise

        client.request = request  # type: ignore[method-assign]


class ForbiddenLog(logging.Handler):
    """kopf logs every denied list/watch request ("APIForbiddenError") at ERROR and retries."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if "Forbidden" in text or "Unauthorized" in text or " 403" in text:
            self.records.append(text)


def model_status(cluster: LocalCluster, ns: str, name: str) -> dict[str, Any]:
    status: dict[str, Any] = get_json(cluster, "lmimodel", name, "-n", ns).get("status") or {}
    return status


def reason_of(cluster: LocalCluster, ns: str, name: str, ctype: str = "Degraded") -> str:
    conds = model_status(cluster, ns, name).get("conditions", [])
    return next((c["reason"] for c in conds if c["type"] == ctype), "")


@pytest.mark.cluster
def test_operator_with_the_chart_serviceaccount_reconciles_examples(
    cluster: LocalCluster, release: Release, tmp_path: Path
) -> None:
    m = release.model_ns
    others = [t for t in threading.enumerate() if t.name == "lmi-operator" and t.is_alive()]
    settings = OperatorSettings(
        namespaces=release.watch,
        leader_election=True,
        lease_namespace=release.namespace,
        lease_name=release.lease,
        identity=f"test-{uuid.uuid4().hex[:6]}",
        metrics_port=0,
        health_port=0,
    )
    forbidden = ForbiddenLog()
    logging.getLogger("kopf").addHandler(forbidden)
    op = RecordingOperator(sa_kubeconfig(cluster, release, tmp_path / "sa.kubeconfig"), settings).start()
    try:
        cluster.kubectl("apply", "-n", m, "-f", str(REPO_ROOT / "examples" / "phi-2.yaml"))
        cluster.kubectl("apply", "-n", m, "-f", str(REPO_ROOT / "examples" / "autoscaling.yaml"))
        big = {
            "apiVersion": "serving.lmi.dev/v1alpha1",
            "kind": "LMIModel",
            "metadata": {"name": "too-big"},
            "spec": {
                "model": {"id": "meta-llama/Llama-3.1-405B-Instruct"},
                "engine": {"tensorParallelDegree": 16},
                "resources": {"gpus": 16},
            },
        }
        cluster.kubectl("apply", "-n", m, "-f", "-", input=json.dumps(big))
        for name in ("phi-2", "autoscaling"):
            cluster.kubectl("wait", "-n", m, "--for=condition=Ready", f"lmimodel/{name}", "--timeout=90s")
        eventually(lambda: reason_of(cluster, m, "too-big") == "InsufficientGPU", 60, what="InsufficientGPU")
        msg = next(
            c["message"] for c in model_status(cluster, m, "too-big")["conditions"] if c["type"] == "Ready"
        )
        assert "free on one node" in msg, msg  # nodes and pods were listed cluster-wide
        assert get_json(cluster, "hpa", "autoscaling", "-n", m)["spec"]["maxReplicas"] == 8
        # Dropping autoscaling deletes the HPA (the delete verb).
        cluster.kubectl(
            "patch",
            "lmimodel",
            "autoscaling",
            "-n",
            m,
            "--type=json",
            "-p",
            '[{"op": "remove", "path": "/spec/autoscaling"}]',
        )
        eventually(
            lambda: cluster.kubectl("get", "hpa", "autoscaling", "-n", m, check=False).returncode != 0,
            60,
            what="HPA deleted",
        )
        assert op.reconciler is not None
        calls = op.reconciler.client.requests_by_path
        lease = get_json(cluster, "lease", release.lease, "-n", release.namespace)
        assert lease["spec"]["holderIdentity"] == settings.identity
        # Reads it makes on every reconcile of these models, whoever else writes.
        assert calls["GET", "/api/v1/nodes"] > 0 and calls["GET", "/api/v1/pods"] > 0
        assert not [p for _, p in calls if "/secrets" in p], "the operator read a Secret"
        st = op.reconciler.cache.models[(m, "phi-2")]
        assert st.pods, "the operator's pod watch saw no pod"
        assert op.writes_in(m) > 0
        if not others:  # the only operator: every write below was this one's, with the SA's token
            writes = {(meth, p.rsplit("/", 2)[-2]) for (meth, p), _ in calls.items() if meth != "GET"}
            for kind in ("configmaps", "services", "deployments", "horizontalpodautoscalers"):
                assert ("PATCH", kind) in writes, (kind, writes)
            assert ("PATCH", "phi-2") in writes or any(p.endswith("/phi-2/status") for _, p in calls)
            assert ("DELETE", "horizontalpodautoscalers") in writes, writes
            assert any(meth == "POST" and p.endswith("/events") for meth, p in calls), calls
        assert not op.denied, f"requests denied to the chart's ServiceAccount: {op.denied}"
        assert not forbidden.records, f"kopf list/watch denied: {forbidden.records[:3]}"
    finally:
        op.stop()
        logging.getLogger("kopf").removeHandler(forbidden)
    assert op.error is None, op.error


@pytest.mark.cluster
def test_upgrade_then_uninstall_keeps_the_crd(cluster: LocalCluster, release: Release, helm: Path) -> None:
    kc = cluster.kubeconfig
    run_helm(
        helm,
        "upgrade",
        release.name,
        str(CHART),
        "-n",
        release.namespace,
        "--reuse-values",
        "--set",
        "operator.workers=3",
        "--wait",
        "--timeout",
        "120s",
        kubeconfig=kc,
    )
    dep = get_json(cluster, "deployment", f"{release.name}-lmi-operator", "-n", release.namespace)
    assert env_of(dep)["LMI_OPERATOR_WORKERS"] == "3"
    history = json.loads(
        run_helm(helm, "history", release.name, "-n", release.namespace, "-o", "json", kubeconfig=kc)
    )
    assert [h["revision"] for h in history] == [1, 2] and history[-1]["status"] == "deployed"
    cluster.kubectl(
        "wait",
        "-n",
        release.namespace,
        "--for=condition=Available",
        f"deployment/{release.name}-lmi-operator",
        "--timeout=60s",
    )
    cluster.kubectl("apply", "-n", release.model_ns, "-f", str(REPO_ROOT / "examples" / "gemma-2b.yaml"))
    run_helm(helm, "uninstall", release.name, "-n", release.namespace, "--wait", kubeconfig=kc)
    cluster_role = f"{release.namespace}-{release.name}-lmi-operator"
    assert cluster.kubectl("get", "clusterrole", cluster_role, check=False).returncode != 0
    assert cluster.kubectl(
        "get", "sa", f"{release.name}-lmi-operator", "-n", release.namespace, check=False
    ).returncode
    # Helm never deletes what crds/ installed: the CRD and the models stay.
    cluster.kubectl("get", "crd", "lmimodels.serving.lmi.dev")
    cluster.kubectl("get", "lmimodel", "gemma-2b", "-n", release.model_ns)


@pytest.mark.cluster
def test_deploy_manifests_apply_with_kubectl(cluster: LocalCluster, lmi_crd: str) -> None:
    """deploy/ with `kubectl apply -k`: the operator Deployment becomes Available in lmi-system
    (restricted). Cleaned up without touching the CRD, which other tests use."""
    built = [
        d for d in yaml.safe_load_all(cluster.kubectl("kustomize", str(REPO_ROOT / "deploy")).stdout) if d
    ]
    plain = [d for d in yaml.safe_load_all(chartdocs.DEPLOY_MANIFEST.read_text()) if d]
    assert sorted(o["kind"] + "/" + o["metadata"]["name"] for o in built) == sorted(
        o["kind"] + "/" + o["metadata"]["name"] for o in plain
    )
    try:
        cluster.kubectl("apply", "--server-side", "-k", str(REPO_ROOT / "deploy"))
        ns = get_json(cluster, "namespace", "lmi-system")
        assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
        cluster.kubectl(
            "wait",
            "-n",
            "lmi-system",
            "--for=condition=Available",
            "deployment/lmi-operator",
            "--timeout=90s",
        )
    finally:
        cluster.kubectl("delete", "namespace", "lmi-system", "--wait=false", check=False)
        for kind in ("clusterrolebinding", "clusterrole"):
            cluster.kubectl("delete", kind, "lmi-system-lmi-operator", check=False)
