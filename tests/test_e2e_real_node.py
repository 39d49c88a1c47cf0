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
from pathlib import Path
from typing import Any

import httpx
import pytest

from lmi_operator.api import Scheduling
from lmi_operator.capacity import engine_of
from lmi_operator.fit_status import GpuType, Inspection, judge
from lmi_operator.settings import OperatorSettings
from lmi_operator.testing.cluster import REPO_ROOT, LocalCluster
from lmi_operator.testing.node import NODE_IP, NODE_NAME, RealNode, node_selector, tolerations
from lmi_operator.testing.operator import OperatorThread
from lmi_operator.testing.product_images import cpu_model
from lmi_operator.testing.s3_server import REGION, Credentials, S3Server, read_policy, s3_server
from lmi_operator.testing.tiny_model import build_adapter, build_model
from lmi_operator.testing.volumes import shared_claim
from lmi_runtime.model_facts import facts_of_directory
from tests.conftest import ADAPTER_PATH, MODEL_PATH, fresh_namespace
from tests.test_operator import apply, condition
from tests.test_operator import get as get_object
from tests.waiting import eventually

pytestmark = [pytest.mark.cluster, pytest.mark.vllm]

GREEDY = {"max_new_tokens": 8, "do_sample": False}
# Published models' config.json sizes (tests/test_capacity.py checks their parameter counts).
CAPACITY_EXAMPLES = json.loads(
    (Path(__file__).parent / "data" / "capacity" / "example-configs.json").read_text()
)
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
def operator(real_cluster: LocalCluster, model_image: str) -> Iterator[OperatorThread]:
    """The operator (in this process) with the CRD applied, its runtime image the one the node has."""
    real_cluster.kubectl("apply", "--server-side", "-f", str(REPO_ROOT / "crds"))
    real_cluster.kubectl("wait", "--for=condition=Established", "crd/lmimodels.serving.lmi.dev")
    # The inspection of GPU models runs on the real node, not on kwok's CPU node (which runs nothing).
    placement = Scheduling.model_validate({"nodeSelector": node_selector(), "tolerations": tolerations()})
    settings = OperatorSettings(
        leader_election=False,
        metrics_port=0,
        health_port=0,
        runtime_image=model_image,
        inspection_scheduling=placement,
    )
    running = OperatorThread(real_cluster.kubeconfig, settings).start()
    try:
        yield running
    finally:
        running.stop()


RESTRICTED = (
    "pod-security.kubernetes.io/enforce=restricted",
    "pod-security.kubernetes.io/enforce-version=latest",
)


@pytest.fixture
def namespace(real_cluster: LocalCluster) -> Iterator[str]:
    """A namespace that enforces Pod Security "restricted", for the operator's pods as for others."""
    with fresh_namespace(real_cluster, "e2e", *RESTRICTED) as name:
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
    pod = restricted_pod(
        "probe",
        model_image,
        ["python3", "-m", "http.server", "8080", "--directory", "/opt/models"],
        readinessProbe={"httpGet": {"path": "/", "port": 8080}, "periodSeconds": 1},
    )
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


# --- model cache and S3 sources ---------------------------------------------------------------------


class Bucket:
    """moto's S3 server on the node's address (pods reach it through the bridge), holding the tiny
    model, with a user who may read it and one who may not."""

    def __init__(self, server: S3Server) -> None:
        self.server = server
        self.reader = server.user("reader", read_policy("models"))
        self.nobody = server.user("nobody", None)
        self.log = Path()
        self.model_dir = Path()  # the tiny model in the bucket, as a folder here

    def object_reads(self) -> int:
        """GET requests for objects of the bucket the server has answered so far (its access log)."""
        return sum(1 for line in self.log.read_text().splitlines() if '"GET /models/tiny/' in line)

    def secret(self, name: str, creds: Credentials) -> dict[str, Any]:
        """A Secret holding `creds` under the keys spec.model.s3.credentialsSecretRef reads."""
        return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name}, "stringData": creds.env()}

    def source(self, secret: str) -> dict[str, Any]:
        """spec.model.s3 for this server."""
        return {
            "credentialsSecretRef": {"name": secret},
            "endpointUrl": self.server.endpoint,
            "region": REGION,
        }


@pytest.fixture(scope="module")
def bucket(node: RealNode, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bucket]:
    root = tmp_path_factory.mktemp("s3")
    build_model(root / "tiny")
    with s3_server(host=NODE_IP, log=root / "moto.log") as server:
        server.upload("models", "tiny", root / "tiny")
        found = Bucket(server)
        found.log = root / "moto.log"
        found.model_dir = root / "tiny"
        yield found


def bind_shared_claim(cluster: LocalCluster, namespace: str, folder: Path) -> str:
    """A ReadWriteMany claim in `namespace` bound to a hostPath volume at `folder` on the node."""
    for doc in shared_claim(namespace, "models", folder, "e2e-host"):
        cluster.kubectl("apply", "-f", "-", input=json.dumps(doc))
    return "models"


def fetch_log(cluster: LocalCluster, namespace: str, pod: dict[str, Any]) -> str:
    """What the pod's init container `fetch` wrote."""
    return cluster.kubectl("logs", "-n", namespace, pod["metadata"]["name"], "-c", "fetch").stdout


def test_an_s3_model_is_fetched_once_into_a_shared_claim_and_the_second_replica_downloads_nothing(
    real_cluster: LocalCluster,
    operator: OperatorThread,
    model_image: str,
    namespace: str,
    bucket: Bucket,
    tmp_path: Path,
) -> None:
    apply(real_cluster, namespace, bucket.secret("s3-reader", bucket.reader))
    claim = bind_shared_claim(real_cluster, namespace, tmp_path / "models")
    doc = cpu_model("from-s3", model_image, "s3://models/tiny")
    doc["spec"]["model"]["s3"] = bucket.source("s3-reader")
    doc["spec"]["cache"] = {"persistentVolumeClaim": {"claimName": claim}}
    before = bucket.object_reads()
    apply(real_cluster, namespace, doc)
    obj = wait_ready(real_cluster, namespace, "from-s3")
    (first,) = pods(real_cluster, namespace, "from-s3")
    assert "fetched option.model_id=s3://models/tiny" in fetch_log(real_cluster, namespace, first)
    fetched = bucket.object_reads() - before
    assert fetched >= 3, "config, tokenizer and weights were read from S3"
    # The files and vLLM's keyed compile-cache folder are on the claim, where the next replica looks.
    assert (tmp_path / "models" / "s3" / "models" / "tiny" / ".lmi-complete").is_file()
    (key_file,) = (tmp_path / "models" / "vllm").glob("*/key.json")
    assert json.loads(key_file.read_text())["model"] == "s3://models/tiny"
    # Every phase of the start, with how long it took: the pod's and the runtime's own.
    startup = obj["status"]["startup"]
    assert startup["phase"] == "Ready", startup
    (replica,) = startup["replicas"]
    assert set(replica["seconds"]) == {"Pending", "Downloading", "Starting", "LoadingWeights", "Compiling"}, (
        replica
    )
    with serving(real_cluster, namespace, "svc/from-s3") as client:
        assert generate(client, "the model")

    real_cluster.kubectl(
        "patch", "lmimodel", "from-s3", "-n", namespace, "--type=merge", "-p", '{"spec":{"replicas":2}}'
    )
    with explained(real_cluster, namespace, "from-s3"):
        eventually(
            lambda: (
                get(real_cluster, namespace, "lmimodel", "from-s3").get("status", {}).get("readyReplicas")
                == 2
            ),
            timeout=READY_TIMEOUT,
            interval=3,
            what="two ready replicas",
        )
    (second,) = [
        p
        for p in pods(real_cluster, namespace, "from-s3")
        if p["metadata"]["name"] != first["metadata"]["name"]
    ]
    assert "cache hit: option.model_id=s3://models/tiny" in fetch_log(real_cluster, namespace, second)
    assert bucket.object_reads() - before == fetched, "the second replica read nothing from S3"
    assert len(list((tmp_path / "models" / "vllm").glob("*/key.json"))) == 1, "one compile-cache key"
    real_cluster.kubectl("delete", "lmimodel", "from-s3", "-n", namespace, "--wait=false")


@pytest.mark.parametrize(
    ("case", "says"),
    [
        ("missing", "option.model_id=s3://models/absent: no objects under this prefix"),
        (
            "denied",
            "option.model_id=s3://models/tiny: AccessDenied: these credentials may not list or read it",
        ),
    ],
)
def test_an_s3_source_that_cannot_be_fetched_is_reported_as_download_failed(
    real_cluster: LocalCluster,
    operator: OperatorThread,
    model_image: str,
    namespace: str,
    bucket: Bucket,
    case: str,
    says: str,
) -> None:
    creds = bucket.reader if case == "missing" else bucket.nobody
    apply(real_cluster, namespace, bucket.secret("s3-creds", creds))
    doc = cpu_model(case, model_image, "s3://models/absent" if case == "missing" else "s3://models/tiny")
    doc["spec"]["model"]["s3"] = bucket.source("s3-creds")
    apply(real_cluster, namespace, doc)

    def reported() -> dict[str, Any] | None:
        ready = condition(get(real_cluster, namespace, "lmimodel", case), "Ready")
        return ready if ready.get("reason") == "DownloadFailed" else None

    with explained(real_cluster, namespace, case):
        ready = eventually(reported, timeout=180, interval=2, what="reason DownloadFailed")
    assert f"lmi-runtime: error: download failed: {says}" in ready["message"], ready
    obj = get(real_cluster, namespace, "lmimodel", case)
    assert obj["status"]["startup"]["phase"] in ("Pending", "Downloading"), obj["status"]


# --- the memory fit, from an inspection on the real node -------------------------------------------


def gpu_model(name: str, image: str, source: str, bucket: Bucket, max_model_len: int) -> dict[str, Any]:
    """A one-GPU model for kwok's GPU nodes whose source is in the bucket: only its inspection runs."""
    spec = {
        "model": {"id": source, "s3": bucket.source("s3-reader")},
        "image": image,
        "engine": {"tensorParallelDegree": 1, "maxModelLen": max_model_len},
        "resources": {"gpus": 1},
    }
    return {
        "apiVersion": "serving.lmi.dev/v1alpha1",
        "kind": "LMIModel",
        "metadata": {"name": name},
        "spec": spec,
    }


def inspection_jobs(cluster: LocalCluster, namespace: str, name: str) -> list[str]:
    out = cluster.kubectl(
        "get", "jobs", "-n", namespace, "-l", f"app.kubernetes.io/instance={name}", "-o", "name"
    )
    return out.stdout.split()


def test_gpu_models_are_inspected_first_and_one_that_fits_no_gpu_creates_no_pods(
    real_cluster: LocalCluster,
    operator: OperatorThread,
    model_image: str,
    namespace: str,
    bucket: Bucket,
    tmp_path: Path,
) -> None:
    # A 70B model's config.json alone (its shapes give the count); the tiny model with its weights.
    big = CAPACITY_EXAMPLES["meta-llama/Llama-3.1-70B-Instruct"]["config"]
    (tmp_path / "70b").mkdir()
    (tmp_path / "70b" / "config.json").write_text(json.dumps(big))
    bucket.server.upload("models", "llama-70b", tmp_path / "70b")
    apply(real_cluster, namespace, bucket.secret("s3-reader", bucket.reader))
    apply(real_cluster, namespace, gpu_model("small", model_image, "s3://models/tiny", bucket, 256))
    apply(real_cluster, namespace, gpu_model("big", model_image, "s3://models/llama-70b", bucket, 8192))

    def judged(name: str, status: str) -> dict[str, Any] | None:
        obj = get(real_cluster, namespace, "lmimodel", name)
        return obj if condition(obj, "FitsGPUMemory").get("status") == status else None

    with explained(real_cluster, namespace, "small"):
        small = eventually(lambda: judged("small", "True"), timeout=240, interval=2, what="small judged")
    # What the Job read from S3 (headers only) is what the runtime reads from the folder itself.
    facts = small["status"]["modelFacts"]
    assert facts == {"source": "s3://models/tiny", **facts_of_directory(bucket.model_dir).to_status()}
    assert facts["counted"] == "safetensors"
    assert condition(small, "FitsGPUMemory")["message"].startswith("fits NVIDIA-H100-80GB-HBM3: needs ")
    eventually(
        lambda: get(real_cluster, namespace, "deployment", "small") or None, timeout=30, what="Deployment"
    )
    # The facts are recorded: the Job and its pod go.
    eventually(lambda: not inspection_jobs(real_cluster, namespace, "small"), timeout=60, what="Job deleted")

    with explained(real_cluster, namespace, "big"):
        obj = eventually(lambda: judged("big", "False"), timeout=240, interval=2, what="big judged")
    # The operator's judgement of the facts the Job wrote, number for number.
    engine = engine_of(obj["status"]["engineOptions"], 1)
    h100 = GpuType("NVIDIA-H100-80GB-HBM3", 81559 * 2**20, 8)
    a10g = GpuType("NVIDIA-A10G", 23028 * 2**20, 4)
    expected = judge(Inspection(facts=obj["status"]["modelFacts"]), engine, [h100, a10g], "")
    ready = condition(obj, "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "InsufficientGPUMemory")
    assert ready["message"] == expected.condition["message"] == condition(obj, "FitsGPUMemory")["message"]
    assert ready["message"].startswith("needs 138.7 GiB per GPU (weights 131.4 + KV cache 2.5")
    assert "NVIDIA-H100-80GB-HBM3 has 71.7 GiB usable: tensorParallelDegree 2 would fit" in ready["message"]
    assert obj["status"]["modelFacts"]["counted"] == "config"
    assert get(real_cluster, namespace, "deployment", "big") == {}
    assert pods(real_cluster, namespace, "big") == [], "no model server pod for a model that fits nothing"

    # The same model with two GPU profiles, neither of which fits: each profile's numbers, no pod.
    doc = gpu_model("big-profiles", model_image, "s3://models/llama-70b", bucket, 8192)
    doc["spec"]["profiles"] = [
        {"name": "h100", "gpu": {"product": "NVIDIA-H100-80GB-HBM3"}},
        {"name": "a10g", "gpu": {"product": "NVIDIA-A10G"}, "engine": {"quantize": "fp8"}},
    ]
    apply(real_cluster, namespace, doc)
    with explained(real_cluster, namespace, "big-profiles"):
        obj = eventually(
            lambda: judged("big-profiles", "False"), timeout=240, interval=2, what="profiles judged"
        )
    h100_only = judge(Inspection(facts=obj["status"]["modelFacts"]), engine, [h100], "")
    fp8 = engine_of({**obj["status"]["engineOptions"], "quantize": "fp8"}, 1)
    a10g_fp8 = judge(Inspection(facts=obj["status"]["modelFacts"]), fp8, [a10g], "")
    ready = condition(obj, "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "InsufficientGPUMemory")
    assert ready["message"] == (
        f"no profile fits: profile h100: {h100_only.condition['message']}; "
        f"profile a10g: {a10g_fp8.condition['message']}"
    )
    assert [row["reason"] for row in obj["status"]["profiles"]] == ["InsufficientGPUMemory"] * 2
    assert "profile" not in obj["status"]
    for deployment in ("big-profiles", "big-profiles-h100", "big-profiles-a10g"):
        assert get(real_cluster, namespace, "deployment", deployment) == {}
    assert pods(real_cluster, namespace, "big-profiles") == [], "no pod for a model that fits no profile"


# --- LoRA adapters that converge without restarts ------------------------------------------------

# Run in a client pod of another namespace: what the model's ports answer a caller without the
# operator's key (status codes, one per line).
CALLER = """
import json, sys, urllib.error, urllib.request
def code(method, url, body=None):
    headers = {"Content-Type": "application/json"}
    request = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        return urllib.request.urlopen(request, timeout=20).status
    except urllib.error.HTTPError as error:
        return error.code
ip = sys.argv[1]
body = json.dumps({"adapters": {"x": "/etc"}}).encode()
print("admin-put", code("PUT", f"http://{ip}:8081/lmi/adapters", body))
print("admin-get", code("GET", f"http://{ip}:8081/lmi/adapters"))
print("lmi-post", code("POST", f"http://{ip}:8080/adapters?name=x&src=/etc"))
print("lmi-get", code("GET", f"http://{ip}:8080/adapters"))
"""


def restricted_pod(name: str, image: str, command: list[str], **container: Any) -> dict[str, Any]:
    """A pod on the real node that Pod Security "restricted" admits, running `command` in `image`."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
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
                    "image": image,
                    "command": command,
                    "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
                    **container,
                }
            ],
        },
    }


def caller_pod(image: str, ip: str) -> dict[str, Any]:
    """A pod that runs CALLER against `ip` once."""
    pod = restricted_pod("caller", image, ["python3", "-c", CALLER, ip])
    pod["spec"]["restartPolicy"] = "Never"
    return pod


def adapter_rows(cluster: LocalCluster, namespace: str, name: str) -> dict[str, dict[str, Any]]:
    """status.adapters by name."""
    rows = get(cluster, namespace, "lmimodel", name).get("status", {}).get("adapters", [])
    return {row["name"]: row for row in rows}


def wait_adapters_ready(cluster: LocalCluster, namespace: str, name: str) -> None:
    """`kubectl wait --for=condition=AdaptersReady`, as a user would."""
    with explained(cluster, namespace, name):
        waited = cluster.kubectl(
            "wait",
            "-n",
            namespace,
            f"lmimodel/{name}",
            "--for=condition=AdaptersReady",
            "--timeout=180s",
            check=False,
        )
        assert waited.returncode == 0, waited.stderr


def test_adapters_are_added_changed_and_removed_on_running_replicas_without_a_restart(
    real_cluster: LocalCluster,
    operator: OperatorThread,
    model_image: str,
    namespace: str,
    bucket: Bucket,
    tmp_path: Path,
) -> None:
    # An adapter in S3 for the image's tiny model (the same architecture as the bucket's copy).
    build_adapter(bucket.model_dir, tmp_path / "s1", seed=5)
    bucket.server.upload("models", "adapters/s1", tmp_path / "s1")
    apply(real_cluster, namespace, bucket.secret("s3-reader", bucket.reader))
    lora: dict[str, Any] = {
        "enabled": True,
        "maxLoraRank": 8,
        "adapters": [{"name": "a1", "source": ADAPTER_PATH}],
    }
    doc = cpu_model("adapted", model_image, MODEL_PATH, lora=lora)
    doc["spec"]["model"]["s3"] = bucket.source("s3-reader")
    apply(real_cluster, namespace, doc)
    wait_ready(real_cluster, namespace, "adapted")
    wait_adapters_ready(real_cluster, namespace, "adapted")
    (pod,) = pods(real_cluster, namespace, "adapted")
    generation = get(real_cluster, namespace, "deployment", "adapted")["metadata"]["generation"]
    assert adapter_rows(real_cluster, namespace, "adapted") == {
        "a1": {"name": "a1", "source": ADAPTER_PATH, "loaded": "1/1"}
    }

    def declare(*adapters: tuple[str, str]) -> None:
        lora["adapters"] = [{"name": n, "source": s} for n, s in adapters]
        apply(real_cluster, namespace, doc)

    def rows_become(expected: dict[str, tuple[str, str, str | None]]) -> dict[str, dict[str, Any]]:
        def seen() -> dict[str, dict[str, Any]] | None:
            rows = adapter_rows(real_cluster, namespace, "adapted")
            got = {n: (r["source"], r["loaded"], r.get("reason")) for n, r in rows.items()}
            return rows if got == expected else None

        with explained(real_cluster, namespace, "adapted"):
            return eventually(seen, timeout=180, interval=1, what=f"status.adapters {expected}")

    # Added: one from S3 (through spec.model.s3's credentials), one whose source does not exist.
    declare(("a1", ADAPTER_PATH), ("s1", "s3://models/adapters/s1"), ("bad", "/no/such/adapter"))
    rows = rows_become(
        {
            "a1": (ADAPTER_PATH, "1/1", None),
            "s1": ("s3://models/adapters/s1", "1/1", None),
            "bad": ("/no/such/adapter", "0/1", "SourceMissing"),
        }
    )
    assert rows["bad"]["message"].startswith(f"pod {pod['metadata']['name']}: "), rows["bad"]
    obj = get(real_cluster, namespace, "lmimodel", "adapted")
    adapters_ready = condition(obj, "AdaptersReady")
    assert (adapters_ready["status"], adapters_ready["reason"]) == ("False", "AdapterFailed"), adapters_ready
    assert "bad: SourceMissing" in adapters_ready["message"]
    assert condition(obj, "Ready")["status"] == "True", "a bad adapter does not take the model down"
    assert obj["status"]["adaptersLoaded"] == "2/3"
    with serving(real_cluster, namespace, "svc/adapted") as client:
        base = generate(client, "the model")
        from_a1 = generate(client, "the model", adapters="a1")
        from_s3 = generate(client, "the model", adapters="s1")
        assert len({base, from_a1, from_s3}) == 3

    # Changed: s1 now from a path on the model cache volume (a copy of a1); bad removed.
    copied = "/opt/ml/cache/adapters/copy-of-a1"
    real_cluster.kubectl(
        "exec",
        "-n",
        namespace,
        pod["metadata"]["name"],
        "-c",
        "model-server",
        "--",
        "sh",
        "-c",
        f"mkdir -p {copied} && cp -r {ADAPTER_PATH}/. {copied}/",
    )
    declare(("a1", ADAPTER_PATH), ("s1", copied))
    rows_become({"a1": (ADAPTER_PATH, "1/1", None), "s1": (copied, "1/1", None)})
    wait_adapters_ready(real_cluster, namespace, "adapted")
    with serving(real_cluster, namespace, "svc/adapted") as client:
        assert generate(client, "the model", adapters="s1") == from_a1

    # Removed: a1 is no longer served.
    declare(("s1", copied))
    rows_become({"s1": (copied, "1/1", None)})
    with serving(real_cluster, namespace, "svc/adapted") as client:
        gone = client.post(
            "/invocations", json={"inputs": "the model", "parameters": GREEDY, "adapters": "a1"}
        )
        assert gone.status_code == 424 and "a1 not found" in gone.json()["error"], gone.text
    assert get(real_cluster, namespace, "lmimodel", "adapted")["status"]["adaptersLoaded"] == "1/1"

    # Not one restart: the same pod, no container restarts, the Deployment's template untouched.
    (same,) = pods(real_cluster, namespace, "adapted")
    assert same["metadata"]["uid"] == pod["metadata"]["uid"]
    assert [c["restartCount"] for c in same["status"]["containerStatuses"]] == [0]
    assert get(real_cluster, namespace, "deployment", "adapted")["metadata"]["generation"] == generation

    # A caller in another namespace cannot change the adapters: the management port wants the
    # operator's signature, and LMI's routes are off.
    with fresh_namespace(real_cluster, "caller", *RESTRICTED) as other:
        apply(real_cluster, other, caller_pod(model_image, same["status"]["podIP"]))
        real_cluster.kubectl(
            "wait", "-n", other, "pod/caller", "--for=jsonpath={.status.phase}=Succeeded", "--timeout=120s"
        )
        said = real_cluster.kubectl("logs", "-n", other, "caller").stdout.split()
    assert dict(zip(said[::2], said[1::2], strict=True)) == {
        "admin-put": "401",
        "admin-get": "401",
        "lmi-post": "404",
        "lmi-get": "404",
    }
    assert set(adapter_rows(real_cluster, namespace, "adapted")) == {"s1"}

    # A replaced pod loads the declared set before it is ready (the copy on its emptyDir cache is
    # gone with the old pod, so s1 comes from S3 again).
    declare(("s1", "s3://models/adapters/s1"), ("a1", ADAPTER_PATH))
    wait_adapters_ready(real_cluster, namespace, "adapted")
    real_cluster.kubectl("delete", "pod", "-n", namespace, same["metadata"]["name"], "--wait=false")
    eventually(
        lambda: (
            condition(get(real_cluster, namespace, "lmimodel", "adapted"), "Ready").get("status") == "False"
        ),
        timeout=60,
        what="Ready=False after the pod was deleted",
    )
    wait_ready(real_cluster, namespace, "adapted")
    wait_adapters_ready(real_cluster, namespace, "adapted")
    (replaced,) = [
        p for p in pods(real_cluster, namespace, "adapted") if not p["metadata"].get("deletionTimestamp")
    ]
    assert replaced["metadata"]["uid"] != same["metadata"]["uid"]
    log = real_cluster.kubectl(
        "logs", "-n", namespace, replaced["metadata"]["name"], "-c", "model-server"
    ).stdout
    assert "registered adapter s1" in log and "registered adapter a1" in log
    with serving(real_cluster, namespace, "svc/adapted") as client:
        assert generate(client, "the model", adapters="s1") == from_s3
    real_cluster.kubectl("delete", "lmimodel", "adapted", "-n", namespace, "--wait=false")
