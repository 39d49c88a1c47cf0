"""The whole product in the cluster: the chart's README quick start, run on the local cluster's real
node, installs the operator image (two replicas, leader election) with the chart's RBAC in a
namespace that enforces Pod Security "restricted", and the model it makes serves. Then the day-2
path: the leader's pod deleted, a verb taken from the ClusterRole, `helm upgrade`, `helm uninstall`
and a re-install that adopts the running model.

Every request of the operator's ServiceAccount is in the API server's audit log (the real-node
cluster audits ServiceAccounts): a denied one fails the test, naming its verb and resource.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from lmi_operator.testing.cluster import REPO_ROOT, LocalCluster
from lmi_operator.testing.node import RealNode, node_selector, tolerations
from lmi_operator.testing.product_images import build_operator_image, cpu_model
from tests.conftest import MODEL_PATH, progress_shown
from tests.test_e2e_real_node import READY_TIMEOUT, explained, generate, pods, serving, wait_ready
from tests.test_operator import get
from tests.waiting import eventually

pytestmark = [pytest.mark.cluster, pytest.mark.vllm]

CHART_README = REPO_ROOT / "charts" / "lmi-operator" / "README.md"
RELEASE, NAMESPACE = "lmi-operator", "lmi-system"
# The chart's names for this release (fullname = release name when it contains the chart's name).
LEASE = SERVICE_ACCOUNT = CLUSTER_ROLE_SUFFIX = "lmi-operator"
CLUSTER_ROLE = f"{NAMESPACE}-{CLUSTER_ROLE_SUFFIX}"
METRICS_SERVICE = "lmi-operator-metrics"
OPERATOR_USER = f"system:serviceaccount:{NAMESPACE}:{SERVICE_ACCOUNT}"
MODEL = "tiny"
# The README's model, which needs a GPU; the real node runs MODEL in its place.
README_MODEL = "phi-2"


@dataclass
class Release:
    """The installed chart: the cluster, its helm, the values file the test adds."""

    cluster: LocalCluster
    values: Path
    runtime_image: str
    # Where in the audit log the checks start: past the denials a test provoked on purpose.
    audit_offset: int = 0

    def denials(self) -> list[str]:
        """The operator's requests refused since `audit_offset`."""
        return rbac_denials(self.cluster.audit_log, self.audit_offset)

    def helm(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run the pinned helm against the cluster."""
        argv = [str(self.cluster.bin_dir / "helm"), "--kubeconfig", str(self.cluster.kubeconfig), *args]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
        if check and proc.returncode != 0:
            raise AssertionError(
                f"{shlex.join(args)} failed:\n{proc.stdout}{proc.stderr}\n{diagnose_operator(self.cluster)}"
            )
        return proc


def quick_start() -> list[str]:
    """The command lines of the chart README's quick start."""
    text = CHART_README.read_text()
    block = text.split("<!-- quick-start:start -->")[1].split("<!-- quick-start:end -->")[0]
    return [line for line in block.splitlines() if line and not line.startswith("```")]


def run_line(release: Release, line: str, model_file: Path) -> None:
    """Run one quick-start line: helm gets the local values file, phi-2 becomes the CPU model."""
    words = shlex.split(line.replace(f"examples/{README_MODEL}.yaml", str(model_file)))
    words = [w.replace(f"lmimodel/{README_MODEL}", f"lmimodel/{MODEL}") for w in words]
    if words[0] == "helm":
        release.helm(*words[1:], "--values", str(release.values))
    elif words[:2] == ["kubectl", "wait"]:
        with explained(release.cluster, NAMESPACE, MODEL):
            wait_ready(release.cluster, NAMESPACE, MODEL)
        release.cluster.kubectl(*words[1:], timeout=60)
    else:
        assert words[0] == "kubectl", line
        release.cluster.kubectl(*words[1:])


def local_values(operator_image: str, runtime_image: str) -> dict[str, Any]:
    """What the real node needs on top of the README's install: the locally built images (never
    pulled: there is no registry) and the node's selector and toleration."""
    repository, tag = operator_image.rsplit(":", 1)
    return {
        "image": {"repository": repository, "tag": tag, "pullPolicy": "Never"},
        "operator": {"runtimeImage": runtime_image},
        "nodeSelector": node_selector(),
        "tolerations": tolerations(),
    }


# RBAC's refusal names the verb it checked, which may differ from the request's: a server-side apply
# (PATCH) of an object that does not exist yet needs `create`.
FORBIDDEN = re.compile(r'cannot (\S+) resource "([^"]+)" in API group "([^"]*)"')


def rbac_denials(audit_log: Path, offset: int = 0, user: str = OPERATOR_USER) -> list[str]:
    """Requests of `user` the API server refused for want of permission, as 'verb group/resource in
    namespace' (the verb and resource RBAC checked), from byte `offset` of the log on."""
    with audit_log.open("rb") as log:
        log.seek(offset)
        lines = log.read().decode().splitlines()
    denied = []
    for line in lines:
        event = json.loads(line)
        status = event.get("responseStatus", {})
        if event["user"]["username"] != user or status.get("code") != 403:
            continue
        ref = event.get("objectRef", {})
        where = f"in {ref['namespace']}" if ref.get("namespace") else "cluster-wide"
        if checked := FORBIDDEN.search(status.get("message", "")):
            verb, resource, group = checked.groups()
        else:
            verb, group = event["verb"], ref.get("apiGroup", "")
            resource = "/".join(filter(None, (ref.get("resource"), ref.get("subresource"))))
        denied.append(f"{verb} {group or 'core'}/{resource} {where}")
    return sorted(set(denied))


def operator_pods(cluster: LocalCluster) -> list[dict[str, Any]]:
    out = cluster.kubectl(
        "get", "pods", "-n", NAMESPACE, "-l", "app.kubernetes.io/name=lmi-operator", "-o", "json"
    )
    items: list[dict[str, Any]] = json.loads(out.stdout)["items"]
    return items


def diagnose_operator(cluster: LocalCluster) -> str:
    """The operator pods' states and log tails (for failures)."""
    lines = []
    for pod in operator_pods(cluster):
        name = pod["metadata"]["name"]
        log = cluster.kubectl("logs", "-n", NAMESPACE, name, "--tail=30", check=False)
        lines += [
            f"pod {name}: {json.dumps(pod.get('status', {}))[-2000:]}",
            f"log:\n{log.stdout}{log.stderr}",
        ]
    return "\n".join(lines)


def ready(pod: dict[str, Any]) -> bool:
    conditions = pod.get("status", {}).get("conditions", [])
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def leader(cluster: LocalCluster) -> str:
    lease = get(cluster, NAMESPACE, "lease", LEASE) or {}
    holder: str = lease.get("spec", {}).get("holderIdentity", "")
    return holder


def parse_time(stamp: str) -> datetime:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00"))


def metrics(cluster: LocalCluster) -> str:
    """One scrape of the operator through the chart's metrics Service (its cluster IP, routed by the
    node's kube-proxy: the load balancing picks a replica)."""
    service = get(cluster, NAMESPACE, "service", METRICS_SERVICE) or {}
    ip, port = service["spec"]["clusterIP"], service["spec"]["ports"][0]["port"]
    response = httpx.get(f"http://{ip}:{port}/metrics", timeout=10)
    response.raise_for_status()
    return response.text


def reconciles(text: str) -> float:
    """The leader's count of successful reconcile steps in a scrape (0 on a standby)."""
    counts = re.findall(r'^lmi_operator_reconciles_total\{[^}]*result="ok"[^}]*\} (\S+)$', text, re.M)
    return sum(float(c) for c in counts)


def model_pod(cluster: LocalCluster) -> dict[str, Any]:
    (pod,) = [p for p in pods(cluster, NAMESPACE, MODEL) if not p["metadata"].get("deletionTimestamp")]
    return pod


@pytest.fixture(scope="module")
def release(
    real_cluster: LocalCluster,
    node: RealNode,
    model_image: str,
    tmp_path_factory: pytest.TempPathFactory,
    pytestconfig: pytest.Config,
) -> Iterator[Release]:
    """The README's quick start, run: namespace, helm install (two replicas), the model Ready."""
    folder = tmp_path_factory.mktemp("helm")
    with progress_shown(pytestconfig):
        print("\n[helm] building and importing the operator image", flush=True)
        operator_image = node.import_image(build_operator_image())
    values = folder / "values.yaml"
    values.write_text(yaml.safe_dump(local_values(operator_image, model_image)))
    model_file = folder / "model.json"
    # Recreate: the node's two cores hold one model server, not the old and the new side by side.
    model = cpu_model(MODEL, None, MODEL_PATH, rollout={"strategy": "Recreate"})
    model_file.write_text(json.dumps(model))
    installed = Release(real_cluster, values, model_image)
    for line in quick_start():
        run_line(installed, line, model_file)
    yield installed
    installed.helm("uninstall", RELEASE, "--namespace", NAMESPACE, check=False)


def test_quick_start_runs_the_operator_image_with_a_leader(release: Release) -> None:
    cluster = release.cluster
    running = operator_pods(cluster)
    assert len(running) == 2 and all(ready(p) for p in running), json.dumps([p["status"] for p in running])
    names = {p["metadata"]["name"] for p in running}
    holder = eventually(lambda: leader(cluster) if leader(cluster) in names else None, what="a Lease holder")
    lead = next(p for p in running if p["metadata"]["name"] == holder)
    started = parse_time(lead["status"]["containerStatuses"][0]["state"]["running"]["startedAt"])
    lease = get(cluster, NAMESPACE, "lease", LEASE) or {}
    acquired = parse_time(lease["spec"]["acquireTime"])
    status = cluster.kubectl("exec", "-n", NAMESPACE, holder, "--", "cat", "/proc/1/status").stdout
    rss = next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:"))
    created = parse_time(lead["metadata"]["creationTimestamp"])
    to_lease, from_created = (acquired - started).total_seconds(), (acquired - created).total_seconds()
    print(
        f"\n[helm] operator pod {holder}: container start to Lease {to_lease:.1f}s (pod created to Lease "
        f"{from_created:.1f}s), RSS {int(rss) / 1024:.0f} MiB"
    )


def test_namespace_enforces_restricted_for_operator_and_model(release: Release) -> None:
    cluster = release.cluster
    labels = json.loads(cluster.kubectl("get", "namespace", NAMESPACE, "-o", "json").stdout)["metadata"][
        "labels"
    ]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
    # Enforced, not only labelled: a privileged pod is refused there.
    refused = cluster.kubectl(
        "run", "privileged", "-n", NAMESPACE, "--image=x", "--privileged", "--dry-run=server", check=False
    )
    assert refused.returncode != 0 and 'violates PodSecurity "restricted' in refused.stderr, refused.stderr
    # ... and both the operator's and the model's pods were admitted and run.
    assert all(ready(p) for p in operator_pods(cluster))
    assert ready(model_pod(cluster))


def test_model_serves_and_the_operator_stayed_within_its_rbac(release: Release) -> None:
    cluster = release.cluster
    with serving(cluster, NAMESPACE, f"svc/{MODEL}") as client:
        assert generate(client, "Hello")
    assert model_pod(cluster)["spec"]["containers"][0]["image"] == release.runtime_image
    denied = release.denials()
    assert not denied, f"the chart's RBAC refused the operator: {denied}"
    # The log does hold the operator's requests: the check above read something.
    assert OPERATOR_USER in cluster.audit_log.read_text()


def test_metrics_answer_through_the_charts_service(release: Release) -> None:
    scrapes = [metrics(release.cluster) for _ in range(12)]
    assert all("lmi_operator_reconciles_total" in s for s in scrapes)
    assert max(reconciles(s) for s in scrapes) > 0, "no scrape reached the leader with its reconciles"


def test_deleting_the_leader_hands_over_and_reconciling_goes_on(release: Release) -> None:
    cluster = release.cluster
    before = leader(cluster)
    deleted = time.monotonic()
    cluster.kubectl("delete", "pod", "-n", NAMESPACE, before, "--wait=false")

    def new_leader() -> str | None:
        holder = leader(cluster)
        running = {p["metadata"]["name"] for p in operator_pods(cluster)}
        return holder if holder not in ("", before) and holder in running else None

    after = eventually(new_leader, timeout=90, what="another replica holds the Lease")
    print(f"\n[helm] leadership moved from {before} to {after} in {time.monotonic() - deleted:.1f}s")
    # The new leader repairs what drifts: the model's Service, deleted, comes back.
    uid = (get(cluster, NAMESPACE, "service", MODEL) or {})["metadata"]["uid"]
    cluster.kubectl("delete", "service", "-n", NAMESPACE, MODEL)
    eventually(
        lambda: (
            (get(cluster, NAMESPACE, "service", MODEL) or {}).get("metadata", {}).get("uid")
            not in (None, uid)
        ),
        timeout=60,
        what="the new leader re-creating the model's Service",
    )
    # The replacement pod starts and stands by.
    eventually(
        lambda: len(operator_pods(cluster)) == 2 and all(ready(p) for p in operator_pods(cluster)),
        timeout=120,
    )
    assert not release.denials()


def test_a_verb_taken_from_the_cluster_role_is_named(release: Release) -> None:
    cluster = release.cluster
    role = json.loads(cluster.kubectl("get", "clusterrole", CLUSTER_ROLE, "-o", "json").stdout)
    original = json.dumps(role["rules"])
    for rule in role["rules"]:
        if "services" in rule["resources"]:
            rule["verbs"] = [v for v in rule["verbs"] if v != "create"]
    patch = json.dumps([{"op": "replace", "path": "/rules", "value": role["rules"]}])
    cluster.kubectl("patch", "clusterrole", CLUSTER_ROLE, "--type=json", "-p", patch)
    try:
        cluster.kubectl("delete", "service", "-n", NAMESPACE, MODEL)
        eventually(
            lambda: "create core/services in lmi-system" in release.denials(),
            timeout=60,
            what="the denied create of the model's Service in the audit log",
        )
    finally:
        restore = json.dumps([{"op": "replace", "path": "/rules", "value": json.loads(original)}])
        cluster.kubectl("patch", "clusterrole", CLUSTER_ROLE, "--type=json", "-p", restore)
    # Once allowed again, the operator's retries bring the Service back.
    eventually(lambda: get(cluster, NAMESPACE, "service", MODEL), timeout=120, what="the Service re-created")
    release.audit_offset = cluster.audit_log.stat().st_size


def test_helm_upgrade_to_a_new_runtime_image_rolls_the_model(release: Release) -> None:
    cluster = release.cluster
    node = cluster.real_node
    assert node is not None
    old_pod = model_pod(cluster)["metadata"]["uid"]
    # The same image under a second tag: a new runtime image as far as the Deployment can tell.
    retagged = release.runtime_image.rsplit(":", 1)[0] + ":upgraded"
    node.ctr("images", "tag", "--force", release.runtime_image, retagged)
    release.helm(
        "upgrade", RELEASE, "charts/lmi-operator", "--namespace", NAMESPACE, "--reuse-values",
        "--set", f"operator.runtimeImage={retagged}", "--wait",
    )  # fmt: skip

    def upgraded() -> bool:
        running = [p for p in pods(cluster, NAMESPACE, MODEL) if not p["metadata"].get("deletionTimestamp")]
        images = [p["spec"]["containers"][0]["image"] for p in running]
        return images == [retagged] and running[0]["metadata"]["uid"] != old_pod and ready(running[0])

    with explained(cluster, NAMESPACE, MODEL):
        eventually(
            upgraded, timeout=READY_TIMEOUT, interval=2, what="the model's pod replaced by an upgraded one"
        )
        wait_ready(cluster, NAMESPACE, MODEL)
    with serving(cluster, NAMESPACE, f"svc/{MODEL}") as client:
        assert generate(client, "Hello")
    # Rolled once: the first ReplicaSet and the upgraded one.
    selector = f"app.kubernetes.io/instance={MODEL}"
    sets = json.loads(cluster.kubectl("get", "rs", "-n", NAMESPACE, "-l", selector, "-o", "json").stdout)
    assert len(sets["items"]) == 2, [
        s["spec"]["template"]["spec"]["containers"][0]["image"] for s in sets["items"]
    ]
    release.runtime_image = retagged


def test_uninstall_keeps_the_model_and_a_reinstall_adopts_it(release: Release) -> None:
    cluster = release.cluster
    pod = model_pod(cluster)
    deployment = get(cluster, NAMESPACE, "deployment", MODEL) or {}
    release.helm("uninstall", RELEASE, "--namespace", NAMESPACE, "--wait")
    eventually(lambda: not operator_pods(cluster), timeout=90, what="the operator's pods gone")
    # Helm deletes the RBAC at once and the pods within their grace period: the leader's last Lease
    # writes, refused then, are not the chart's RBAC falling short.
    release.audit_offset = cluster.audit_log.stat().st_size
    assert get(cluster, NAMESPACE, "crd", "lmimodels.serving.lmi.dev"), "helm uninstall removed the CRD"
    assert get(cluster, NAMESPACE, "lmimodel", MODEL), "helm uninstall removed the LMIModel"
    assert model_pod(cluster)["metadata"]["uid"] == pod["metadata"]["uid"]

    release.helm(
        "install", RELEASE, "charts/lmi-operator", "--namespace", NAMESPACE, "--values", str(release.values),
        "--set", "replicaCount=2", "--set", f"operator.runtimeImage={release.runtime_image}", "--wait",
    )  # fmt: skip
    eventually(lambda: leader(cluster) in {p["metadata"]["name"] for p in operator_pods(cluster)}, timeout=90)
    # The new leader has read the model (its status is re-written as current) and changed nothing.
    eventually(lambda: max(reconciles(metrics(cluster)) for _ in range(6)) > 0, timeout=60, what="reconciles")
    wait_ready(cluster, NAMESPACE, MODEL)
    after = model_pod(cluster)
    assert after["metadata"]["uid"] == pod["metadata"]["uid"]
    assert (
        after["status"]["containerStatuses"][0]["restartCount"]
        == pod["status"]["containerStatuses"][0]["restartCount"]
    )
    now = get(cluster, NAMESPACE, "deployment", MODEL) or {}
    assert now["metadata"]["generation"] == deployment["metadata"]["generation"]
    assert not release.denials()
