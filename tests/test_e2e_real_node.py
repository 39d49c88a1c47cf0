"""The whole product on a real node: LMIModels made by the operator start, from the runtime's CPU
image, under a real kubelet and containerd, pass the kubelet's real probes and serve; the faults a
real kubelet reports reach the model's status with a message a person can act on.

One cluster for the module (kwok GPU nodes plus the real `cpu-node`), one operator, and a test image
that is the runtime CPU image plus the tests' tiny Llama and a LoRA adapter at path model ids.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from lmi_operator.settings import OperatorSettings
from lmi_operator.testing.cluster import REPO_ROOT, LocalCluster
from lmi_operator.testing.node import NODE_NAME, RealNode, node_selector, tolerations
from lmi_operator.testing.operator import OperatorThread
from lmi_operator.testing.product_images import cpu_model
from tests.conftest import ADAPTER_PATH, MODEL_PATH, fresh_namespace
from tests.test_operator import apply, condition
from tests.test_operator import get as get_object
from tests.waiting import eventually

pytestmark = [pytest.mark.cluster, pytest.mark.vllm]

GREEDY = {"max_new_tokens": 8, "do_sample": False}
# A vLLM start in a container on two shared cores: import, load, warm-up.
READY_TIMEOUT = 420
# The inline handler answers this prompt itself and hands everything else to vLLM.
HANDLER_PROMPT = "__which handler__"
HANDLER_PY = """
from djl_python import Output


async def handle(inputs):
    if inputs.is_empty():
        return None
    if inputs.get_as_json().get("inputs") == "__which handler__":
        return Output().add_as_json({"generated_text": "HANDLER"})
    return None
"""


@pytest.fixture(scope="module")
def operator(real_cluster: LocalCluster) -> Iterator[OperatorThread]:
    """The operator (in this process) with the CRD applied."""
    real_cluster.kubectl("apply", "--server-side", "-f", str(REPO_ROOT / "crds"))
    real_cluster.kubectl("wait", "--for=condition=Established", "crd/lmimodels.serving.lmi.dev")
    settings = OperatorSettings(leader_election=False, metrics_port=0, health_port=0)
    running = OperatorThread(real_cluster.kubeconfig, settings).start()
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def namespace(real_cluster: LocalCluster) -> Iterator[str]:
    """A namespace that enforces Pod Security "restricted", for the operator's pods as for others."""
    restricted = (
        "pod-security.kubernetes.io/enforce=restricted",
        "pod-security.kubernetes.io/enforce-version=latest",
    )
    with fresh_namespace(real_cluster, "e2e", *restricted) as name:
        yield name


def get(cluster: LocalCluster, namespace: str, kind: str, name: str) -> dict[str, Any]:
    return get_object(cluster, namespace, kind, name) or {}


def pods(cluster: LocalCluster, namespace: str, name: str) -> list[dict[str, Any]]:
    selector = f"app.kubernetes.io/instance={name}"
    out = cluster.kubectl("get", "pods", "-n", namespace, "-l", selector, "-o", "json")
    items: list[dict[str, Any]] = json.loads(out.stdout)["items"]
    return items


def wait_ready(cluster: LocalCluster, namespace: str, name: str) -> dict[str, Any]:
    """Wait for Ready=True and observedGeneration current; show status, pods and logs if not."""

    def ready() -> dict[str, Any] | None:
        obj = get(cluster, namespace, "lmimodel", name)
        current = obj.get("status", {}).get("observedGeneration") == obj["metadata"]["generation"]
        return obj if current and condition(obj, "Ready").get("status") == "True" else None

    with explained(cluster, namespace, name):
        return eventually(ready, timeout=READY_TIMEOUT, interval=2, what=f"{name} Ready")


def diagnose(cluster: LocalCluster, namespace: str, name: str) -> str:
    """The model's status, its pods' states and the model server's log tail (for failures)."""
    status = cluster.kubectl("get", "lmimodel", name, "-n", namespace, "-o", "json", check=False).stdout
    lines = [f"model: {status[-3000:]}"]
    for pod in pods(cluster, namespace, name):
        pod_name = pod["metadata"]["name"]
        lines.append(f"pod {pod_name}: {json.dumps(pod.get('status', {}))[-3000:]}")
        log = cluster.kubectl("logs", "-n", namespace, pod_name, "--tail=40", check=False)
        lines.append(f"log of {pod_name}:\n{log.stdout}{log.stderr}")
    return "\n".join(lines)


@contextlib.contextmanager
def explained(cluster: LocalCluster, namespace: str, name: str) -> Iterator[None]:
    """A failure inside the block also shows the model's status, pods and server log."""
    try:
        yield
    except AssertionError as err:
        raise AssertionError(f"{err}\n{diagnose(cluster, namespace, name)}") from None


@contextlib.contextmanager
def serving(cluster: LocalCluster, namespace: str, target: str) -> Iterator[httpx.Client]:
    """An HTTP client through `kubectl port-forward` to `target` (svc/NAME or pod/NAME)."""
    with (
        cluster.port_forward(namespace, target) as port,
        httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client,
    ):
        yield client


def generate(client: httpx.Client, prompt: str, **extra: Any) -> str:
    response = client.post("/invocations", json={"inputs": prompt, "parameters": GREEDY, **extra})
    assert response.status_code == 200, response.text
    text: str = response.json()["generated_text"]
    return text


def test_the_real_node_runs_pods_with_logs_exec_and_a_reachable_ip(
    real_cluster: LocalCluster, node: RealNode, model_image: str, namespace: str
) -> None:
    nodes = json.loads(real_cluster.kubectl("get", "node", NODE_NAME, "-o", "json").stdout)
    assert {t["key"] for t in nodes["spec"].get("taints", [])} == {"lmi.dev/real-node"}
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "probe"},
        "spec": {
            "nodeSelector": node_selector(),
            "tolerations": tolerations(),
            "securityContext": {
                "runAsNonRoot": True,
                "runAsUser": 1000,
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            "containers": [
                {
                    "name": "c",
                    "image": model_image,
                    "command": ["python3", "-m", "http.server", "8080", "--directory", "/opt/models"],
                    "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
                    "readinessProbe": {"httpGet": {"path": "/", "port": 8080}, "periodSeconds": 1},
                }
            ],
        },
    }
    apply(real_cluster, namespace, pod)
    real_cluster.kubectl("wait", "-n", namespace, "--for=condition=Ready", "pod/probe", "--timeout=120s")
    ip = get(real_cluster, namespace, "pod", "probe")["status"]["podIP"]
    assert ip.startswith("10.89.0.")
    assert "tiny" in httpx.get(f"http://{ip}:8080/", timeout=10).text
    whoami = real_cluster.kubectl("exec", "-n", namespace, "probe", "--", "id", "-u")
    assert whoami.stdout.strip() == "1000"
    logs = eventually(lambda: real_cluster.kubectl("logs", "-n", namespace, "probe").stdout, what="pod logs")
    assert "GET / HTTP" in logs
    with serving(real_cluster, namespace, "pod/probe") as client:
        assert client.get("/").status_code == 200


def test_a_cpu_model_serves_lmi_openai_lora_and_handlers_then_rolls_and_heals(
    real_cluster: LocalCluster, operator: OperatorThread, model_image: str, namespace: str
) -> None:
    doc = cpu_model(
        "tiny",
        model_image,
        MODEL_PATH,
        lora={"enabled": True, "maxLoraRank": 8, "adapters": [{"name": "a1", "source": ADAPTER_PATH}]},
        handler={"modelPy": HANDLER_PY},
    )
    apply(real_cluster, namespace, doc)
    wait_ready(real_cluster, namespace, "tiny")
    (pod,) = pods(real_cluster, namespace, "tiny")
    assert pod["spec"]["nodeName"] == NODE_NAME
    with serving(real_cluster, namespace, "svc/tiny") as client, explained(real_cluster, namespace, "tiny"):
        assert client.get("/ping").status_code == 200
        base = generate(client, "the model")
        assert base.strip(), base
        with client.stream(
            "POST", "/invocations", json={"inputs": "the model", "stream": True, "parameters": GREEDY}
        ) as response:
            assert response.headers["content-type"].startswith("application/jsonlines")
            lines = [json.loads(line) for line in response.iter_lines() if line]
        assert lines[-1].get("generated_text") == base and len(lines) == GREEDY["max_new_tokens"], lines
        # The documented served name: model.id, since servedModelName is unset.
        completion = client.post(
            "/v1/completions", json={"model": MODEL_PATH, "prompt": "the model", "max_tokens": 4}
        )
        assert completion.status_code == 200, completion.text
        assert completion.json()["model"] == MODEL_PATH
        adapted = generate(client, "the model", adapters="a1")
        assert adapted != base
        assert generate(client, HANDLER_PROMPT) == "HANDLER"

    # A spec change (the handler now comes from a ConfigMap) rolls the pod; the new one serves it.
    config_map = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "handler"},
        "data": {"model.py": HANDLER_PY.replace('"HANDLER"', '"FROM CONFIGMAP"')},
    }
    apply(real_cluster, namespace, config_map)
    doc["spec"]["handler"] = {"configMapRef": {"name": "handler", "key": "model.py"}}
    apply(real_cluster, namespace, doc)
    wait_ready(real_cluster, namespace, "tiny")
    (rolled,) = eventually(
        lambda: [
            p
            for p in pods(real_cluster, namespace, "tiny")
            if p["metadata"]["uid"] != pod["metadata"]["uid"] and not p["metadata"].get("deletionTimestamp")
        ],
        what="the rolled pod",
    )
    with serving(real_cluster, namespace, "svc/tiny") as client:
        assert generate(client, HANDLER_PROMPT) == "FROM CONFIGMAP"

    # A deleted pod is replaced, and the model is Ready again only once the new one serves.
    real_cluster.kubectl("delete", "pod", "-n", namespace, rolled["metadata"]["name"], "--wait=false")
    eventually(
        lambda: condition(get(real_cluster, namespace, "lmimodel", "tiny"), "Ready").get("status") == "False",
        timeout=60,
        what="Ready=False after the pod was deleted",
    )
    wait_ready(real_cluster, namespace, "tiny")
    with serving(real_cluster, namespace, "svc/tiny") as client:
        assert generate(client, "the model") == base


def test_a_bad_engine_option_reaches_status_with_the_runtimes_error(
    real_cluster: LocalCluster, operator: OperatorThread, model_image: str, namespace: str
) -> None:
    doc = cpu_model("bad-option", model_image, MODEL_PATH)
    doc["spec"]["engine"]["options"] = {"enforce_eager": "true", "kv_cache_dtype": "not-a-dtype"}
    apply(real_cluster, namespace, doc)

    def crash_reported() -> dict[str, Any] | None:
        ready = condition(get(real_cluster, namespace, "lmimodel", "bad-option"), "Ready")
        return ready if ready.get("reason") == "CrashLoop" else None

    ready = eventually(crash_reported, timeout=300, interval=2, what="reason CrashLoop")
    assert "lmi-runtime: error:" in ready["message"] and "kv_cache_dtype" in ready["message"], ready


def test_a_memory_limit_below_what_vllm_needs_is_reported_as_oomkilled(
    real_cluster: LocalCluster, operator: OperatorThread, model_image: str, namespace: str
) -> None:
    doc = cpu_model("small-memory", model_image, MODEL_PATH)
    doc["spec"]["resources"]["memory"] = "300Mi"
    apply(real_cluster, namespace, doc)

    def oom_reported() -> dict[str, Any] | None:
        ready = condition(get(real_cluster, namespace, "lmimodel", "small-memory"), "Ready")
        return ready if ready.get("reason") == "OOMKilled" else None

    ready = eventually(oom_reported, timeout=300, interval=2, what="reason OOMKilled")
    assert "raise spec.resources.memory" in ready["message"], ready


def test_nothing_but_cpu_pods_lands_on_the_real_node(real_cluster: LocalCluster, node: RealNode) -> None:
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "untolerated"},
        "spec": {"nodeSelector": node_selector(), "containers": [{"name": "c", "image": "busybox"}]},
    }
    apply(real_cluster, "default", pod)
    scheduled = eventually(
        lambda: condition(get(real_cluster, "default", "pod", "untolerated"), "PodScheduled"),
        what="a scheduling verdict",
    )
    # The real node matches the selector, and only its taint keeps the pod off it.
    assert scheduled["status"] == "False" and "untolerated taint" in scheduled["message"], scheduled
    real_cluster.kubectl("delete", "pod", "untolerated", "--wait=false")


def test_a_missing_hf_token_secret_is_reported_from_the_kubelet_and_recovers(
    real_cluster: LocalCluster, operator: OperatorThread, model_image: str, namespace: str
) -> None:
    """The operator reads no Secret: MissingSecret comes from the pod the kubelet could not start."""
    doc = cpu_model("gated", model_image, MODEL_PATH)
    doc["spec"]["model"]["hfTokenSecretRef"] = {"name": "hf-token", "key": "token"}
    apply(real_cluster, namespace, doc)

    def reported(text: str) -> dict[str, Any] | None:
        ready = condition(get(real_cluster, namespace, "lmimodel", "gated"), "Ready")
        return ready if ready.get("reason") == "MissingSecret" and text in ready["message"] else None

    with explained(real_cluster, namespace, "gated"):
        ready = eventually(lambda: reported('secret "hf-token" not found'), timeout=120, what="MissingSecret")
        assert "spec.model.hfTokenSecretRef" in ready["message"], ready
        real_cluster.kubectl(
            "create", "secret", "generic", "hf-token", "-n", namespace, "--from-literal=tok=x"
        )
        eventually(lambda: reported("couldn't find key token"), timeout=120, what="the missing key named")
        real_cluster.kubectl(
            "patch",
            "secret",
            "hf-token",
            "-n",
            namespace,
            "--type=merge",
            "-p",
            '{"stringData":{"token":"x"}}',
        )
        eventually(
            lambda: (
                condition(get(real_cluster, namespace, "lmimodel", "gated"), "Ready").get("reason")
                not in ("MissingSecret", None)
            ),
            timeout=120,
            what="the model past MissingSecret once the key exists",
        )
    assert operator.reconciler is not None
    assert not [p for _, p in operator.reconciler.client.requests_by_path if "/secrets" in p]
    real_cluster.kubectl("delete", "lmimodel", "gated", "-n", namespace, "--wait=false")
