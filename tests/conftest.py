"""Session fixtures: one real local control plane (etcd, apiserver, controllers, scheduler, kwok);
module fixtures: a control plane with the real node, for the modules that run real pods."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from lmi_operator.settings import OperatorSettings
from lmi_operator.testing.cluster import REPO_ROOT, LocalCluster, tools_bin_dir
from lmi_operator.testing.node import RealNode
from lmi_operator.testing.nodes import DEFAULT_NODES, h100_node
from lmi_operator.testing.operator import OperatorThread
from lmi_operator.testing.product_images import build_model_image
from lmi_operator.testing.tiny_model import build_adapter, build_model

# The default nodes plus a pool of H100 nodes, so that the models the whole session leaves running
# (every example, each test's) never starve a later test of GPUs. Still 8 GPUs at most per node.
TEST_POOL = tuple(h100_node(f"gpu-pool-{i}") for i in range(12))
TEST_NODES = (*DEFAULT_NODES, *TEST_POOL)
# Where the real node's test image holds the tests' tiny Llama and its LoRA adapter.
MODEL_PATH = "/opt/models/tiny"
ADAPTER_PATH = "/opt/models/adapters/a1"


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """The local control plane, started once per test session and stopped at its end."""
    local = LocalCluster(tmp_path_factory.mktemp("cluster"), tools_bin_dir(), nodes=TEST_NODES)
    local.start()
    try:
        yield local
    finally:
        local.stop()


@contextlib.contextmanager
def progress_shown(config: pytest.Config) -> Iterator[None]:
    """Let a long set-up step's progress lines (an image import, a node start) through pytest's
    output capture, so a first run on a fresh machine says what it is doing."""
    capture = config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        yield


@contextlib.contextmanager
def fresh_namespace(cluster: LocalCluster, prefix: str = "t", *labels: str) -> Iterator[str]:
    """A new namespace (with `labels`, as key=value), deleted afterwards (without waiting)."""
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    cluster.kubectl("create", "namespace", name)
    if labels:
        cluster.kubectl("label", "namespace", name, *labels)
    try:
        yield name
    finally:
        cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture
def namespace(cluster: LocalCluster) -> Iterator[str]:
    """A fresh namespace for one test."""
    with fresh_namespace(cluster) as name:
        yield name


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The checkout's root folder."""
    return REPO_ROOT


@pytest.fixture(scope="session")
def lmi_crd(cluster: LocalCluster) -> str:
    """The LMIModel CRD from crds/, applied and Established; returns its name."""
    cluster.kubectl("apply", "--server-side", "-f", str(REPO_ROOT / "crds"))
    cluster.kubectl("wait", "--for=condition=Established", "crd/lmimodels.serving.lmi.dev", "--timeout=60s")
    return "lmimodels.serving.lmi.dev"


@pytest.fixture(scope="session")
def operator(cluster: LocalCluster, lmi_crd: str) -> Iterator[OperatorThread]:
    """The operator, in this process (so tests can count its API requests), for the whole session."""
    settings = OperatorSettings(leader_election=False, metrics_port=0, health_port=0)
    running = OperatorThread(cluster.kubeconfig, settings).start()
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def real_cluster(
    tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config
) -> Iterator[LocalCluster]:
    """A control plane with kwok's fake GPU nodes and the real node."""
    local = LocalCluster(tmp_path_factory.mktemp("real-node"), tools_bin_dir(), real_node=True)
    with progress_shown(pytestconfig):
        print("\n[e2e] starting a local cluster with the real node", flush=True)
        local.start()
    try:
        yield local
    finally:
        local.stop()


@pytest.fixture(scope="module")
def node(real_cluster: LocalCluster) -> RealNode:
    """The cluster's real node."""
    assert real_cluster.real_node is not None
    return real_cluster.real_node


@pytest.fixture(scope="module")
def model_image(node: RealNode, tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config) -> str:
    """The runtime CPU image plus the tiny model and adapter, imported into the node."""
    context = tmp_path_factory.mktemp("model-image")
    build_model(context / "tiny")
    build_adapter(context / "tiny", context / "adapters" / "a1", seed=1)
    models = {"tiny": MODEL_PATH, "adapters": "/opt/models/adapters"}
    with progress_shown(pytestconfig):
        return node.import_image(build_model_image(context, models, "lmi/e2e:test"))
