"""Models larger than one node (spec.resources.nodes) on the local control plane's kwok GPU nodes, with
the real LeaderWorkerSet controller (`LocalCluster(lws=True)`) and the real lmi-operator: first the
ground itself (a plain group of a leader and a worker, recreated when one of its pods goes), then
LMIModels whose replicas are such groups; and, on the session's cluster, which has no
LeaderWorkerSet, the missing prerequisite reported, then served without restarting the operator."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from lmi_operator.render import MODEL_LABEL
from lmi_operator.settings import OperatorSettings
from lmi_operator.testing.cluster import LocalCluster, tools_bin_dir
from lmi_operator.testing.lws import lws_version
from lmi_operator.testing.nodes import GPU_TAINT_KEY
from lmi_operator.testing.operator import OperatorThread
from tests.conftest import REPO_ROOT, fresh_namespace
from tests.test_operator import apply, condition, get, model_doc, wait_reason
from tests.test_reliability_security import RESTRICTED
from tests.waiting import eventually

pytestmark = pytest.mark.cluster

NAME = "multi"
LEADER, WORKER = f"{NAME}-0", f"{NAME}-0-1"
H100_NODES = {"gpu-h100-0", "gpu-h100-1"}
RACK = "topology.kubernetes.io/rack"


@pytest.fixture(scope="module")
def lws_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """A control plane of its own (the default nodes) with the LWS manager and its CRDs."""
    local = LocalCluster(tmp_path_factory.mktemp("lws"), tools_bin_dir(), lws=True)
    local.start()
    try:
        yield local
    finally:
        local.stop()


def gpu_pod_template(role: str) -> dict[str, Any]:
    """A pod asking for a whole H100 node's 8 GPUs, tolerating the GPU nodes' taint."""
    return {
        "metadata": {"labels": {"role": role}},
        "spec": {
            "tolerations": [{"key": GPU_TAINT_KEY, "operator": "Exists", "effect": "NoSchedule"}],
            "containers": [
                {
                    "name": "vllm",
                    "image": "registry.invalid/vllm:test",
                    "resources": {"limits": {"nvidia.com/gpu": "8"}},
                }
            ],
        },
    }


def leader_worker_set() -> dict[str, Any]:
    """One group of two pods; the restart policy is left to the API's default."""
    return {
        "apiVersion": "leaderworkerset.x-k8s.io/v1",
        "kind": "LeaderWorkerSet",
        "metadata": {"name": NAME, "namespace": "default"},
        "spec": {
            "replicas": 1,
            "leaderWorkerTemplate": {
                "size": 2,
                "leaderTemplate": gpu_pod_template("leader"),
                "workerTemplate": gpu_pod_template("worker"),
            },
        },
    }


def get_default(cluster: LocalCluster, kind: str, name: str) -> dict[str, Any]:
    obj: dict[str, Any] = json.loads(cluster.kubectl("get", kind, name, "-n", "default", "-o", "json").stdout)
    return obj


def group_pods(cluster: LocalCluster) -> dict[str, dict[str, Any]]:
    """The plain group's pods by name."""
    out = cluster.kubectl(
        "get", "pods", "-n", "default", "-l", f"leaderworkerset.sigs.k8s.io/name={NAME}", "-o", "json"
    )
    return {p["metadata"]["name"]: p for p in json.loads(out.stdout)["items"]}


def ready_pods(cluster: LocalCluster) -> dict[str, dict[str, Any]] | None:
    """The group's pods by name once both are Ready (and none is being deleted), else None."""
    pods = group_pods(cluster)
    if set(pods) != {LEADER, WORKER}:
        return None
    for pod in pods.values():
        conditions = pod["status"].get("conditions", [])
        if pod["metadata"].get("deletionTimestamp") or not any(
            c["type"] == "Ready" and c["status"] == "True" for c in conditions
        ):
            return None
    return pods


def group_ready(cluster: LocalCluster) -> dict[str, Any] | None:
    """The LeaderWorkerSet's status once it reports its one group ready and Available."""
    status: dict[str, Any] = get_default(cluster, "leaderworkerset", NAME).get("status", {})
    conditions = {c["type"]: c["status"] for c in status.get("conditions", [])}
    if status.get("readyReplicas") == 1 and conditions.get("Available") == "True":
        return status
    return None


def test_leader_and_worker_on_distinct_h100_nodes_and_group_recreated(lws_cluster: LocalCluster) -> None:
    cluster = lws_cluster
    cluster.kubectl("apply", "-f", "-", input=json.dumps(leader_worker_set()))
    # Defaulted on create (the CRD's schema), not set here.
    assert get_default(cluster, "leaderworkerset", NAME)["spec"]["leaderWorkerTemplate"]["restartPolicy"] == (
        "RecreateGroupOnPodRestart"
    )

    pods = eventually(lambda: ready_pods(cluster), timeout=45, what="the leader and worker pods Ready")
    leader_sts = get_default(cluster, "statefulset", NAME)
    worker_sts = get_default(cluster, "statefulset", LEADER)
    assert leader_sts["metadata"]["ownerReferences"][0]["kind"] == "LeaderWorkerSet"
    assert worker_sts["metadata"]["ownerReferences"][0]["name"] == LEADER  # the worker set is the leader's
    # The headless Service the leader address resolves through.
    assert get_default(cluster, "service", NAME)["spec"]["clusterIP"] == "None"
    leader, worker = pods[LEADER], pods[WORKER]
    assert {leader["spec"]["nodeName"], worker["spec"]["nodeName"]} == H100_NODES
    # What the pod webhook adds, served for real: the group's labels and the LWS_* variables.
    assert leader["metadata"]["labels"]["leaderworkerset.sigs.k8s.io/group-index"] == "0"
    assert worker["metadata"]["labels"]["leaderworkerset.sigs.k8s.io/worker-index"] == "1"
    env = {e["name"]: e.get("value") for e in worker["spec"]["containers"][0]["env"]}
    assert env["LWS_LEADER_ADDRESS"] == f"{LEADER}.{NAME}.default"
    assert env["LWS_GROUP_SIZE"] == "2"
    eventually(lambda: group_ready(cluster), timeout=30, what="the LeaderWorkerSet's group ready")

    before = {name: pod["metadata"]["uid"] for name, pod in pods.items()}
    cluster.kubectl("delete", "pod", WORKER, "-n", "default", "--wait=false")

    def recreated() -> dict[str, dict[str, Any]] | None:
        now = ready_pods(cluster)
        if now is None or any(now[name]["metadata"]["uid"] == uid for name, uid in before.items()):
            return None
        return now

    # RecreateGroupOnPodRestart: losing the worker restarts the whole group, the leader included.
    pods = eventually(recreated, timeout=45, what="a new leader and worker, both Ready")
    assert {p["spec"]["nodeName"] for p in pods.values()} == H100_NODES
    eventually(lambda: group_ready(cluster), timeout=30, what="the recreated group ready")
    # The H100 nodes are the models' below.
    cluster.kubectl("delete", "leaderworkerset", NAME, "-n", "default", "--wait=true", "--timeout=60s")
    eventually(
        lambda: ready_pods(cluster) is None and not group_pods(cluster), timeout=60, what="the group gone"
    )


# -- LMIModels whose replicas span nodes ------------------------------------------------------------


@pytest.fixture(scope="module")
def lws_operator(lws_cluster: LocalCluster) -> Iterator[OperatorThread]:
    """The operator (in this process) on the LeaderWorkerSet cluster, with the LMIModel CRD."""
    lws_cluster.kubectl("apply", "--server-side", "-f", str(REPO_ROOT / "crds"))
    lws_cluster.kubectl("wait", "--for=condition=Established", "crd/lmimodels.serving.lmi.dev")
    settings = OperatorSettings(leader_election=False, metrics_port=0, health_port=0)
    running = OperatorThread(lws_cluster.kubeconfig, settings).start()
    try:
        yield running
    finally:
        running.stop()


def big_model(name: str, replicas: int = 1) -> dict[str, Any]:
    """A 16-GPU model: a group of two pods of 8 GPUs, tensor parallel across both."""
    return model_doc(
        name, replicas=replicas, engine={"tensorParallelDegree": 16}, resources={"gpus": 8, "nodes": 2}
    )


def model_pods(cluster: LocalCluster, namespace: str, name: str) -> list[dict[str, Any]]:
    out = cluster.kubectl("get", "pods", "-n", namespace, "-l", f"{MODEL_LABEL}={name}", "-o", "json").stdout
    return [p for p in json.loads(out)["items"] if not p["metadata"].get("deletionTimestamp")]


def ready_condition(cluster: LocalCluster, namespace: str, name: str) -> dict[str, Any]:
    return condition(get(cluster, namespace, "lmimodel", name), "Ready")


def endpoint_pods(cluster: LocalCluster, namespace: str, service: str) -> set[str]:
    """The pods behind a Service, as its EndpointSlices list them."""
    out = cluster.kubectl(
        "get", "endpointslices", "-n", namespace, "-l", f"kubernetes.io/service-name={service}", "-o", "json"
    ).stdout
    return {
        e["targetRef"]["name"]
        for s in json.loads(out)["items"]
        for e in s.get("endpoints") or []
        if e.get("conditions", {}).get("ready")
    }


@contextlib.contextmanager
def running_group(cluster: LocalCluster, name: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """A fresh namespace with a 16-GPU model Ready in it (and its status), deleted afterwards
    with its groups' pods, which frees the H100 nodes for the next test."""
    with fresh_namespace(cluster, "mn") as namespace:
        apply(cluster, namespace, big_model(name))
        yield namespace, wait_reason(cluster, namespace, name, "Available", timeout=90)
        cluster.kubectl("delete", "lmimodel", name, "-n", namespace, "--wait=true", "--timeout=60s")
        eventually(lambda: not model_pods(cluster, namespace, name), timeout=60, what="the pods gone")


def test_a_16_gpu_model_runs_as_a_group_on_two_nodes_behind_its_leader_recreated_when_a_worker_goes(
    lws_cluster: LocalCluster, lws_operator: OperatorThread
) -> None:
    cluster = lws_cluster
    with running_group(cluster, "big") as (namespace, obj):
        assert (obj["status"]["replicas"], obj["status"]["readyReplicas"], obj["status"]["ready"]) == (
            1,
            1,
            "1/1",
        )
        lws = get(cluster, namespace, "leaderworkerset", "big-group")
        assert lws is not None and lws["spec"]["leaderWorkerTemplate"]["size"] == 2
        assert get(cluster, namespace, "deployment", "big") is None
        pods = {p["metadata"]["name"]: p for p in model_pods(cluster, namespace, "big")}
        assert set(pods) == {"big-group-0", "big-group-0-1"}
        # Each pod takes a whole H100 node: the group spans both.
        assert {p["spec"]["nodeName"] for p in pods.values()} == H100_NODES
        # The leader address LeaderWorkerSet gives the worker resolves through its headless Service,
        # not the model's (which keeps its name and its ClusterIP).
        worker_env = {
            e["name"]: e.get("value") for e in pods["big-group-0-1"]["spec"]["containers"][0]["env"]
        }
        assert worker_env["LWS_LEADER_ADDRESS"] == f"big-group-0.big-group.{namespace}"
        assert get(cluster, namespace, "service", "big-group")["spec"]["clusterIP"] == "None"  # type: ignore[index]
        assert get(cluster, namespace, "service", "big")["spec"]["clusterIP"] != "None"  # type: ignore[index]
        # The model's Service sends requests to the leader only.
        eventually(
            lambda: endpoint_pods(cluster, namespace, "big") == {"big-group-0"},
            timeout=30,
            what="the model's endpoints: the leader alone",
        )
        assert "leaderworkerset.sigs.k8s.io/worker-index=0" in obj["status"]["selector"].split(",")

        # A worker lost: the replica is not ready until LeaderWorkerSet has recreated the whole group.
        before = {p["metadata"]["uid"] for p in pods.values()}
        transition = ready_condition(cluster, namespace, "big")["lastTransitionTime"]
        time.sleep(1.1)  # transitions are stamped to the second
        cluster.kubectl("delete", "pod", "big-group-0-1", "-n", namespace, "--wait=false")

        def recovered() -> dict[str, Any] | None:
            ready = ready_condition(cluster, namespace, "big")
            now = model_pods(cluster, namespace, "big")
            fresh = len(now) == 2 and not {p["metadata"]["uid"] for p in now} & before
            # Ready again, with a transition stamped after the loss: it was False in between.
            back = ready.get("status") == "True" and ready.get("lastTransitionTime") != transition
            return ready if fresh and back else None

        eventually(
            recovered, timeout=90, interval=0.5, what="the group recreated and the replica Ready again"
        )
        reasons = [
            e["reason"]
            for e in json.loads(
                cluster.kubectl(
                    "get",
                    "events",
                    "-n",
                    namespace,
                    "--field-selector",
                    "involvedObject.name=big",
                    "-o",
                    "json",
                ).stdout
            )["items"]
        ]
        assert "Available" in reasons and any(r != "Available" for r in reasons), reasons


def test_scaling_to_a_second_group_without_free_nodes_reports_how_many_nodes_have_the_gpus(
    lws_cluster: LocalCluster, lws_operator: OperatorThread
) -> None:
    cluster = lws_cluster
    with running_group(cluster, "scaled") as (namespace, _):
        # The two H100 nodes hold one group; the A10G node has 4 GPUs, not 8.
        cluster.kubectl("scale", "lmimodel", "scaled", "-n", namespace, "--replicas=2")
        obj = wait_reason(cluster, namespace, "scaled", "InsufficientGPU", timeout=60)
        message = condition(obj, "Ready")["message"]
        assert message.startswith(
            "a replica is 2 pods with 8 nvidia.com/gpu each, on 2 distinct nodes; 0 of the 2 nodes needed "
            "have 8 free (gpu-a10g-0=4, gpu-h100-0=0, gpu-h100-1=0)"
        ), message
        assert "scheduler: 0/" in message
        assert (obj["status"]["readyReplicas"], obj["status"]["ready"]) == (1, "1/2")
        cluster.kubectl("scale", "lmimodel", "scaled", "-n", namespace, "--replicas=1")
        wait_reason(cluster, namespace, "scaled", "Available", timeout=60)


# -- the session's cluster: no LeaderWorkerSet --------------------------------------------------------


def test_without_leaderworkerset_the_model_names_the_prerequisite_and_runs_once_it_is_installed(
    cluster: LocalCluster, operator: OperatorThread, namespace: str
) -> None:
    """Nothing is applied while the API is missing; once its CRD is installed the operator applies the
    LeaderWorkerSet and watches it, without a restart (there is no controller here to run it); once
    it is removed, the model names the prerequisite again."""
    apply(cluster, namespace, big_model("waits"))
    obj = wait_reason(cluster, namespace, "waits", "MissingPrerequisite", timeout=60)
    assert condition(obj, "Ready")["message"] == (
        "spec.resources.nodes 2 runs each replica as a LeaderWorkerSet group of 2 pods, and this cluster "
        "does not serve leaderworkersets.leaderworkerset.x-k8s.io/v1: install LeaderWorkerSet (v0.8.0 or "
        "later, docs/multi-node.md); the model is applied once it is served"
    )
    assert (condition(obj, "Stalled")["status"], condition(obj, "Degraded")["reason"]) == (
        "True",
        "MissingPrerequisite",
    )
    assert get(cluster, namespace, "configmap", "waits-lmi-config") is None, "nothing applied"
    crds = tools_bin_dir().parent / f"lws-{lws_version()}" / "crds"
    cluster.kubectl("apply", "--server-side", "-f", str(crds))
    try:
        lws = eventually(
            lambda: get(cluster, namespace, "leaderworkerset", "waits-group"),
            timeout=60,
            what="the LeaderWorkerSet applied once the API is served",
        )
        assert lws["spec"]["replicas"] == 1
        wait_reason(cluster, namespace, "waits", "RolloutInProgress", timeout=30)
        # Watched: deleted by hand, it is applied again at once.
        cluster.kubectl("delete", "leaderworkerset", "waits-group", "-n", namespace, "--wait=true")
        again = eventually(
            lambda: get(cluster, namespace, "leaderworkerset", "waits-group"),
            timeout=30,
            what="the LeaderWorkerSet applied again after its deletion",
        )
        assert again["metadata"]["uid"] != lws["metadata"]["uid"]
        # Uninstalled again (its LeaderWorkerSets go with the CRD): the model names the prerequisite.
        cluster.kubectl("delete", "-f", str(crds), "--wait=true")
        wait_reason(cluster, namespace, "waits", "MissingPrerequisite", timeout=60)
    finally:
        cluster.kubectl("delete", "-f", str(crds), "--wait=true", "--ignore-not-found", check=False)
        cluster.kubectl("delete", "lmimodel", "waits", "-n", namespace, "--wait=true", check=False)


def test_the_multi_node_examples_run_in_a_restricted_namespace_each_group_in_one_rack(
    lws_cluster: LocalCluster, lws_operator: OperatorThread
) -> None:
    """The examples whose replicas span nodes (tests/test_reliability_security.py runs the others),
    under the restricted Pod Security Standard; their exclusiveTopology is a rack, so the H100 nodes
    get one and LeaderWorkerSet places each group in it."""
    cluster = lws_cluster
    cluster.kubectl("label", "node", *sorted(H100_NODES), f"{RACK}=rack-a", "--overwrite")
    models = [
        doc
        for path in sorted((REPO_ROOT / "examples").glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
        if doc and doc["kind"] == "LMIModel" and doc["spec"]["resources"].get("nodes", 1) > 1
    ]
    assert models, "no example spans nodes"
    labels = [f"{k}={v}" for k, v in RESTRICTED.items()]
    with fresh_namespace(cluster, "mn", *labels) as namespace:
        for doc in models:
            name = doc["metadata"]["name"]
            assert doc["spec"]["scheduling"]["exclusiveTopology"] == RACK
            apply(cluster, namespace, doc)
            wait_reason(cluster, namespace, name, "Available", timeout=90)
            pods = model_pods(cluster, namespace, name)
            assert {p["spec"]["nodeName"] for p in pods} == H100_NODES
            by_worker = {p["metadata"]["labels"]["leaderworkerset.sigs.k8s.io/worker-index"]: p for p in pods}
            # What LeaderWorkerSet adds for exclusive placement: the leader's group alone in its
            # rack (its webhook's pod affinity and anti-affinity), the worker in the leader's rack.
            affinity = by_worker["0"]["spec"]["affinity"]
            for kind in ("podAffinity", "podAntiAffinity"):
                (term,) = affinity[kind]["requiredDuringSchedulingIgnoredDuringExecution"]
                assert term["topologyKey"] == RACK
            assert by_worker["1"]["spec"]["nodeSelector"][RACK] == "rack-a"
            cluster.kubectl("delete", "lmimodel", name, "-n", namespace, "--wait=true", "--timeout=60s")
            eventually(lambda n=name: not model_pods(cluster, namespace, n), timeout=60, what="the pods gone")
        events = cluster.kubectl("get", "events", "-n", namespace, "-o", "json").stdout
        assert "violates PodSecurity" not in events
