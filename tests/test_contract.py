"""The operator and the runtime agree, for every example and every runtime image.

The command line: the image's ENTRYPOINT and CMD composed with the rendered container's command and
args exactly as Kubernetes does (command replaces ENTRYPOINT and drops CMD; args replace CMD) must
be `lmi-runtime serve` with the port the container exposes and the folder the ConfigMap is mounted in.

The configuration: the rendered ConfigMap's files, written where the pod mounts them, and the
container's literal environment, read by the runtime's own code (`lmi-runtime args`), must resolve
to the model the LMIModel specifies: model, documented served name, parallelism, batch, LoRA ...
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from lmi_operator.api import KIND, LMIModel, parse_lmimodel
from lmi_operator.render import WORKLOAD_KINDS, Rendered, render, template_of
from lmi_operator.render_adapters import ADAPTERS_MOUNT
from lmi_operator.settings import OperatorSettings
from lmi_runtime import model_store, multi_node
from lmi_runtime import options as lmi
from lmi_runtime.adapter_sources import declared_adapters
from lmi_runtime.adapters import check_declared, preload_dirs
from lmi_runtime.cli import argument_parser
from lmi_runtime.engine_args import ResolvedConfig, VllmSchema, load_schema, resolve
from lmi_runtime.handler import load_handler
from lmi_runtime.properties import load_settings
from tests.dockerfiles import REPO_ROOT, RUNTIME_DOCKERFILES, exec_form, instructions

SETTINGS = OperatorSettings()


def _models() -> list[LMIModel]:
    found = []
    for path in sorted((REPO_ROOT / "examples").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if isinstance(doc, dict) and doc.get("kind") == KIND:
                doc["metadata"].setdefault("namespace", "default")
                found.append(parse_lmimodel(doc))
    return found


MODELS = _models()


def _name(obj: LMIModel) -> str:
    return str(obj.metadata.name)


def pod_of(rendered: Rendered, role: str = "leader") -> dict[str, Any]:
    """The pod spec of the (first) rendered workload: the Deployment's, or the LeaderWorkerSet's leader
    or worker template (`role`) when a replica spans nodes."""
    workload = next(o for o in rendered.objects if o["kind"] in WORKLOAD_KINDS)
    if role == "worker":
        return dict(workload["spec"]["leaderWorkerTemplate"]["workerTemplate"]["spec"])
    return dict(template_of(workload)["spec"])


def container_of(rendered: Rendered, role: str = "leader") -> dict[str, Any]:
    """The model-server container of the rendered workload's pod (`role`: pod_of)."""
    (container,) = pod_of(rendered, role)["containers"]
    return dict(container)


def kubernetes_argv(entrypoint: list[str], cmd: list[str], container: dict[str, Any]) -> list[str]:
    """What the container runs: command replaces ENTRYPOINT (and CMD is dropped), args replace CMD."""
    command: list[str] | None = container.get("command")
    args: list[str] | None = container.get("args")
    if command is not None:
        return [*command, *(args or [])]
    return [*entrypoint, *(cmd if args is None else args)]


def parse_runtime_argv(argv: list[str], capsys: pytest.CaptureFixture[str]) -> Any:
    """`lmi-runtime`'s own parse of argv, or a test failure quoting its usage error."""
    assert argv[:1] == ["lmi-runtime"], f"the container runs {argv}, not lmi-runtime"
    try:
        return argument_parser().parse_args(argv[1:])
    except SystemExit:
        pytest.fail(f"lmi-runtime rejects {argv}: {capsys.readouterr().err.strip()}")


def config_mounts(rendered: Rendered) -> dict[PurePosixPath, str]:
    """Each file of the rendered ConfigMap, by the path the pod mounts it at."""
    config_map = rendered.by_kind("ConfigMap")
    assert config_map is not None
    volumes = {
        v["name"]: v["configMap"]
        for v in pod_of(rendered)["volumes"]
        if v.get("configMap", {}).get("name") == config_map["metadata"]["name"]
    }
    files: dict[PurePosixPath, str] = {}
    for m in container_of(rendered)["volumeMounts"]:
        if m["name"] not in volumes:
            continue
        if "subPath" in m:
            files[PurePosixPath(m["mountPath"])] = config_map["data"][m["subPath"]]
        else:  # a folder of the listed keys, which the kubelet keeps current
            for item in volumes[m["name"]]["items"]:
                files[PurePosixPath(m["mountPath"]) / item["path"]] = config_map["data"][item["key"]]
    assert set(files.values()) == set(config_map["data"].values()), "a ConfigMap file is not mounted"
    return files


@pytest.mark.parametrize("dockerfile", RUNTIME_DOCKERFILES, ids=lambda path: path.name)
@pytest.mark.parametrize("obj", MODELS, ids=_name)
def test_the_pod_runs_lmi_runtime_fetch_then_serve_on_its_port_and_model_dir(
    dockerfile: Path, obj: LMIModel, capsys: pytest.CaptureFixture[str]
) -> None:
    rendered = render(obj, SETTINGS)
    (init,) = pod_of(rendered)["initContainers"]
    container = container_of(rendered)
    entrypoint, cmd = exec_form(dockerfile, "ENTRYPOINT"), exec_form(dockerfile, "CMD")
    parsed = parse_runtime_argv(kubernetes_argv(entrypoint, cmd, container), capsys)
    assert parsed.command == "serve"
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports.pop("http") == parsed.port
    # With LoRA, the management port: where the runtime is told to listen (LMI_ADMIN_PORT).
    env = {var["name"]: var.get("value") for var in container["env"]}
    assert ports == ({"admin": int(env[lmi.ADMIN_PORT_ENV])} if lmi.ADMIN_PORT_ENV in env else {})
    mounted = config_mounts(rendered)
    assert PurePosixPath(parsed.model_dir) / lmi.PROPERTIES_FILE in mounted
    assert {path.parent for path in mounted} <= {
        PurePosixPath(parsed.model_dir),
        PurePosixPath(ADAPTERS_MOUNT),
    }
    # The files the runtime is pointed at are the ones mounted.
    for variable in (lmi.ADAPTERS_FILE_ENV, lmi.ADMIN_KEYS_ENV):
        assert (variable in env) == (obj.spec.lora is not None and obj.spec.lora.enabled)
        assert variable not in env or PurePosixPath(env[variable]) in mounted
    # The init container reads the same settings from the same folders: what it fetches into the
    # cache is where the server looks.
    fetch = parse_runtime_argv(kubernetes_argv(entrypoint, cmd, init), capsys)
    assert (fetch.command, fetch.model_dir) == ("fetch", parsed.model_dir)
    assert init["image"] == container["image"]
    assert init["env"] == container["env"] and init["volumeMounts"] == container["volumeMounts"]
    cache_mount(rendered)


def cache_mount(rendered: Rendered) -> str:
    """Where the model server mounts the cache volume, checked to be where LMI_CACHE_DIR points."""
    container = container_of(rendered)
    (mount,) = [m["mountPath"] for m in container["volumeMounts"] if m["name"] == "cache"]
    env = {var["name"]: var.get("value") for var in container["env"]}
    assert env[lmi.CACHE_ENV] == mount
    return str(mount)


@pytest.mark.parametrize("dockerfile", RUNTIME_DOCKERFILES, ids=lambda path: path.name)
def test_the_image_alone_serves_like_an_lmi_container(
    dockerfile: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    parsed = parse_runtime_argv(
        kubernetes_argv(exec_form(dockerfile, "ENTRYPOINT"), exec_form(dockerfile, "CMD"), {}), capsys
    )
    assert (parsed.command, str(parsed.model_dir), parsed.port) == ("serve", lmi.MODEL_DIR, lmi.PORT)
    assert instructions(dockerfile, "EXPOSE") == [str(lmi.PORT)]


@pytest.fixture(scope="module")
def schema() -> VllmSchema:
    """The installed vLLM's schema, with the runtime quantization methods LMI documents: an example
    that uses one says its image must have it (vLLM 0.32 needs a plugin for bitsandbytes)."""
    installed = load_schema()
    methods = tuple(sorted({*installed.quantization_methods, *lmi.RUNTIME_QUANTIZATION}))
    return dataclasses.replace(installed, quantization_methods=methods)


def runtime_reads(
    obj: LMIModel,
    model_dir: Path,
    schema: VllmSchema,
    role: str = "leader",
    injected: dict[str, str] | None = None,
) -> tuple[ResolvedConfig, dict[str, str]]:
    """What `lmi-runtime args` resolves in the rendered pod (`role`: pod_of), on a node with the GPUs
    it requests, with the variables a controller injects into the pod (`injected`) added."""
    rendered = render(obj, SETTINGS)
    cache_mount(rendered)
    # Values from Secrets (HF_TOKEN) are not configuration; only literal values are.
    env = {var["name"]: var["value"] for var in container_of(rendered, role)["env"] if "value" in var}
    env |= injected or {}
    for path, text in config_mounts(rendered).items():
        if path.is_relative_to(lmi.MODEL_DIR):
            (model_dir / path.relative_to(lmi.MODEL_DIR)).write_text(text, encoding="utf-8")
            continue
        # Elsewhere (the declared adapters' folder): written here, and the variables naming it too.
        local = model_dir.parent / "mounts" / path.relative_to("/")
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_text(text, encoding="utf-8")
        env = {k: str(local) if v == str(path) else v for k, v in env.items()}
    # The cache volume, mounted here rather than at the pod's path.
    env[lmi.CACHE_ENV] = str(model_dir / "cache-volume")
    settings = load_settings(model_dir, env)
    # What the init container leaves in the cache: s3:// sources complete in their folders.
    for source in model_store.sources(settings, env):
        if source.is_s3:
            folder = model_store.local_path(source, model_store.cache_dir(env))
            folder.mkdir(parents=True, exist_ok=True)
            (folder / model_store.COMPLETE_MARKER).write_text("{}")
    local = model_store.localize(settings, env, download=False)
    config = resolve(local, env, schema, device_count=lambda: obj.spec.resources.gpus)
    return config, env


def expected_engine_args(obj: LMIModel, cache: str) -> dict[str, Any]:
    """The vLLM engine arguments the spec stands for (None: not set, vLLM's default applies)."""
    spec, engine = obj.spec, obj.spec.engine
    lora = spec.lora if spec.lora is not None and spec.lora.enabled else None
    model = spec.model.id
    return {
        # An s3:// model is read from its folder in the cache, where the init container fetched it.
        "model": f"{cache}/s3/{model.removeprefix('s3://')}" if model.startswith("s3://") else model,
        # As spec.model.servedModelName's description says.
        "served_model_name": [spec.model.served_model_name or spec.model.id],
        "revision": spec.model.revision,
        "tokenizer": spec.model.tokenizer,
        "trust_remote_code": spec.model.trust_remote_code or None,
        "tensor_parallel_size": spec.tensor_parallel_size(),
        "pipeline_parallel_size": engine.pipeline_parallel_degree
        if engine.pipeline_parallel_degree != 1
        else None,
        "max_num_seqs": engine.effective_max_rolling_batch_size(),
        "max_num_batched_tokens": engine.max_rolling_batch_prefill_tokens,
        "quantization": engine.quantize,
        "max_model_len": engine.max_model_len,
        "dtype": lmi.DTYPE_ALIASES.get(engine.dtype, engine.dtype) if engine.dtype else None,
        "gpu_memory_utilization": engine.gpu_memory_utilization,
        "cpu_offload_gb": engine.cpu_offload_gb_per_gpu,
        "enable_prefix_caching": engine.enable_prefix_caching,
        "speculative_config": engine.speculative_config,
        "enable_lora": True if lora else None,
        "max_loras": lora.effective_max_loras() if lora else None,
        "max_lora_rank": lora.max_lora_rank if lora else None,
        "max_cpu_loras": lora.max_cpu_loras if lora else None,
    }


@pytest.mark.parametrize("obj", MODELS, ids=_name)
def test_the_runtime_reads_the_model_the_spec_specifies(
    obj: LMIModel, schema: VllmSchema, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config, env = runtime_reads(obj, tmp_path, schema)
    expected = expected_engine_args(obj, env[lmi.CACHE_ENV])
    assert {key: config.engine_args.get(key) for key in expected} == expected
    assert config.served_model_names == expected["served_model_name"]
    assert config.mode == ("async" if obj.spec.engine.mode == "async" else "rolling_batch")
    for key in obj.spec.engine.options:
        assert hasattr(config.namespace, lmi.RENAMED.get(key, key)), f"engine.options.{key} was dropped"
    lora = obj.spec.lora
    adapters = {a.name: a.source for a in lora.adapters} if lora is not None and lora.enabled else {}
    # The runtime loads, before it is ready, the adapters the spec declares, from the mounted file.
    declared, _ = declared_adapters(env)
    assert declared == adapters
    check_declared(declared, "declared", preload_dirs(tmp_path, config.enable_lora), config.enable_lora)
    # load_handler puts the model folder on sys.path, as LMI does; the test's own path is restored.
    monkeypatch.setattr(sys, "path", list(sys.path))
    handler = obj.spec.handler
    assert (load_handler(tmp_path) is not None) == (handler is not None and handler.model_py is not None)


MULTI_NODE = [obj for obj in MODELS if obj.spec.resources.nodes > 1]


@pytest.mark.parametrize("dockerfile", RUNTIME_DOCKERFILES, ids=lambda path: path.name)
@pytest.mark.parametrize("rank", [0, 1])
@pytest.mark.parametrize("obj", MULTI_NODE, ids=_name)
def test_each_pod_of_a_group_resolves_its_place_in_the_one_engine_of_its_replica(
    obj: LMIModel,
    rank: int,
    dockerfile: Path,
    schema: VllmSchema,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The leader's and a worker's rendered commands and environment, with the variables
    LeaderWorkerSet's webhook injects (tests/test_multi_node.py shows them served for real),
    resolve to the spec's engine across all the group's nodes, each pod as its node rank."""
    role = "worker" if rank else "leader"
    rendered = render(obj, SETTINGS)
    container = container_of(rendered, role)
    entrypoint, cmd = exec_form(dockerfile, "ENTRYPOINT"), exec_form(dockerfile, "CMD")
    parsed = parse_runtime_argv(kubernetes_argv(entrypoint, cmd, container), capsys)
    assert (parsed.command, str(parsed.model_dir)) == ("serve", lmi.MODEL_DIR)
    assert ("ports" in container) == (role == "leader"), "only the leader serves HTTP"
    (workload,) = [o for o in rendered.objects if o["kind"] in WORKLOAD_KINDS]
    leader = f"{workload['metadata']['name']}-0.{workload['metadata']['name']}.default"
    nodes = obj.spec.resources.nodes
    injected = {
        multi_node.LEADER_ADDRESS_ENV: leader,
        multi_node.GROUP_SIZE_ENV: str(nodes),
        multi_node.WORKER_INDEX_ENV: str(rank),
    }
    config, env = runtime_reads(obj, tmp_path, schema, role, injected)
    expected = expected_engine_args(obj, env[lmi.CACHE_ENV]) | {
        "nnodes": nodes,
        "node_rank": rank,
        "master_addr": leader,
        "master_port": multi_node.MASTER_PORT,
        "distributed_executor_backend": "mp",
    }
    assert {key: config.engine_args.get(key) for key in expected} == expected
    assert config.headless == (role == "worker")
    assert obj.spec.tensor_parallel_size() * obj.spec.engine.pipeline_parallel_degree == (
        obj.spec.resources.gpus * nodes
    )
