"""Pure parts of the operator, without a cluster: rendering, LMI properties, status decisions,
drift detection, engine-option checks and the work queue."""

from __future__ import annotations

import asyncio
import datetime
import json
import re
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from lmi_operator import kube
from lmi_operator.api import EngineMode, parse_lmimodel
from lmi_operator.cache import ModelCache, compare_versions
from lmi_operator.drift import contains
from lmi_operator.engine_options import check_options
from lmi_operator.events import EventRecorder
from lmi_operator.kube import load_credentials
from lmi_operator.properties import serving_properties
from lmi_operator.render import CONFIG_HASH, MODEL_LABEL, desired_replicas, render
from lmi_operator.replica_phases import startup_status
from lmi_operator.settings import OperatorSettings
from lmi_operator.status import (
    BATCH_SIZE_DEFAULTED,
    BATCH_SIZE_FIELD,
    LMI_ASYNC_DEFAULT,
    Observed,
    build_status,
    conditions_for,
)
from lmi_operator.status_report import StatusReporter, removals
from lmi_operator.testing.cluster import REPO_ROOT
from lmi_operator.workqueue import WorkQueue

SETTINGS = OperatorSettings()
NOW = datetime.datetime(2026, 11, 27, 12, 0, 0, tzinfo=datetime.UTC)


def model(**spec: Any) -> Any:
    body = {
        "apiVersion": "serving.lmi.dev/v1alpha1",
        "kind": "LMIModel",
        "metadata": {"name": "m", "namespace": "ns", "uid": "u-1", "generation": 1},
        "spec": {
            "model": {"id": "org/model"},
            "engine": {"tensorParallelDegree": 2},
            "resources": {"gpus": 2},
        }
        | spec,
    }
    return parse_lmimodel(body)


def kinds(obj: Any) -> list[str]:
    return [o["kind"] for o in render(obj, SETTINGS).objects]


def deployment(obj: Any) -> dict[str, Any]:
    dep = render(obj, SETTINGS).by_kind("Deployment")
    assert dep is not None
    return dep


def test_children_depend_on_replicas_and_autoscaling() -> None:
    assert kinds(model()) == ["ConfigMap", "Deployment", "Service"]
    assert kinds(model(replicas=2)) == ["ConfigMap", "Deployment", "Service", "PodDisruptionBudget"]
    auto = model(
        replicas=1, autoscaling={"minReplicas": 2, "maxReplicas": 4, "targetCPUUtilizationPercentage": 70}
    )
    assert kinds(auto) == [
        "ConfigMap",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
    ]
    hpa = render(auto, SETTINGS).by_kind("HorizontalPodAutoscaler")
    assert hpa is not None and hpa["spec"]["scaleTargetRef"]["kind"] == "LMIModel"
    # Replicas stay within the autoscaling bounds until the HPA writes spec.replicas.
    assert desired_replicas(auto.spec) == 2 and deployment(auto)["spec"]["replicas"] == 2


def test_pod_is_restricted_and_gets_gpus_tolerations_and_probes() -> None:
    pod = deployment(model(startup={"timeoutSeconds": 7200}))["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["automountServiceAccountToken"] is False
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "runAsNonRoot": True,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert container["startupProbe"]["failureThreshold"] * container["startupProbe"]["periodSeconds"] == 7200
    assert container["readinessProbe"]["httpGet"] == {"path": "/ping", "port": "http"}
    assert {"name": "dshm", "emptyDir": {"medium": "Memory"}} in pod["volumes"]
    # A crash's log tail becomes its termination message, which the status quotes.
    assert container["terminationMessagePolicy"] == "FallbackToLogsOnError"


def test_probes_speak_https_when_the_runtime_serves_tls() -> None:
    tls = {"ssl_keyfile": "/tls/tls.key", "ssl_certfile": "/tls/tls.crt"}
    container = deployment(model(engine={"options": tls}))["spec"]["template"]["spec"]["containers"][0]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/ping", "port": "http", "scheme": "HTTPS"}
    # A certificate alone serves no TLS (the runtime refuses it): the probes stay HTTP.
    half = deployment(model(engine={"options": {"ssl_certfile": "/tls/tls.crt"}}))
    assert "scheme" not in half["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]


def test_gpu_resource_comes_from_spec_else_settings() -> None:
    amd = OperatorSettings(gpu_resource_name="amd.com/gpu")
    dep = render(model(), amd).by_kind("Deployment")
    assert dep is not None
    assert dep["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["amd.com/gpu"] == "2"
    own = model(resources={"gpus": 2, "gpuResourceName": "habana.ai/gaudi"})
    dep = render(own, amd).by_kind("Deployment")
    assert (
        dep is not None
        and "habana.ai/gaudi" in dep["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    )


def test_hf_token_only_by_reference() -> None:
    obj = model(model={"id": "org/gated", "hfTokenSecretRef": {"name": "hf", "key": "token"}})
    rendered = render(obj, SETTINGS)
    env = rendered.by_kind("Deployment")["spec"]["template"]["spec"]["containers"][0]["env"]  # type: ignore[index]
    assert {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}} in env
    config = rendered.by_kind("ConfigMap")
    assert config is not None and "hf" not in config["data"]["serving.properties"].split("model_id")[0]


def test_config_change_changes_the_pod_template_hash_and_nothing_else_does() -> None:
    def template_hash(obj: Any) -> str:
        return str(deployment(obj)["spec"]["template"]["metadata"]["annotations"][CONFIG_HASH])

    base = template_hash(model())
    assert template_hash(model()) == base
    assert template_hash(model(engine={"tensorParallelDegree": 2, "maxRollingBatchSize": 8})) != base
    assert template_hash(model(replicas=3)) == base


def test_serving_properties_speak_lmi() -> None:
    text = serving_properties(
        model(
            engine={
                "tensorParallelDegree": 2,
                "mode": "rollingBatch",
                "quantize": "fp8",
                "options": {"enforce_eager": "true"},
            },
            lora={"enabled": True, "maxLoras": 2},
        ).spec
    )
    lines = text.splitlines()
    assert "engine=Python" in lines and "option.rolling_batch=vllm" in lines
    assert "option.max_rolling_batch_size=256" in lines and "option.quantize=fp8" in lines
    assert "option.enable_lora=true" in lines and "option.max_loras=2" in lines
    assert "option.enforce_eager=true" in lines and "option.async_mode=true" not in lines


def test_engine_options_are_checked_against_the_pinned_vllm() -> None:
    assert check_options({"enforce_eager": "true", "limit_mm_per_prompt": '{"image": 1}'}) is None
    message = check_options({"enforce_eagr": "true", "max_num_seqs2": "3", "kv_cache_dtype": "fp8"})
    assert message is not None
    assert "spec.engine.options.enforce_eagr: not an engine or server argument of vLLM" in message
    assert "did you mean enforce_eager" in message and "max_num_seqs2" in message
    assert "must be true or false" in str(check_options({"enforce_eager": "yes"}))
    assert "must be an integer" in str(check_options({"seed": "x"}))
    assert "must be JSON" in str(check_options({"limit_mm_per_prompt": "{image: 1"}))
    assert "set by the runtime itself" in str(check_options({"port": "9000"}))
    # `vllm serve`'s own arguments reach the runtime too (runtime/lmi_runtime/server_setup.py)
    server = {"ssl_keyfile": "/t/k", "ssl_certfile": "/t/c", "h11_max_header_count": "64"}
    assert check_options({**server, "tool_call_parser": "hermes", "output_formatter": "sse"}) is None
    assert "must be an integer" in str(check_options({"h11_max_header_count": "many"}))


def observed(**kw: Any) -> Observed:
    base: dict[str, Any] = {
        "name": "m",
        "namespace": "ns",
        "generation": 2,
        "desired_replicas": 1,
        "gpus_per_replica": 2,
        "gpu_resource": "nvidia.com/gpu",
        "startup_timeout_seconds": 600,
        "deployments": {
            "m": {
                "metadata": {"generation": 5},
                "status": {
                    "observedGeneration": 5,
                    "replicas": 1,
                    "readyReplicas": 1,
                    "updatedReplicas": 1,
                    "availableReplicas": 1,
                },
            }
        },
        "now": NOW,
    }
    # One Deployment, the model's own (`deployment`, `deployment_generation`, `config_hash`).
    if "deployment" in kw:
        kw["deployments"] = {"m": kw.pop("deployment")}
    if "deployment_generation" in kw:
        kw["deployment_generations"] = {"m": kw.pop("deployment_generation")}
    if "config_hash" in kw:
        kw["config_hashes"] = {"m": kw.pop("config_hash")}
    return Observed(**(base | kw))


def reasons(obs: Observed) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in conditions_for(obs)}


def test_available_and_rollout_conditions() -> None:
    assert reasons(observed()) == {
        "Ready": ("True", "Available"),
        "Progressing": ("False", "Available"),
        "Degraded": ("False", "Available"),
        "Reconciling": ("False", "Available"),
        "Stalled": ("False", "Available"),
    }
    rolling = observed(
        deployment={"metadata": {"generation": 6}, "status": {"observedGeneration": 5, "replicas": 1}}
    )
    assert reasons(rolling)["Ready"] == ("False", "RolloutInProgress")
    assert reasons(rolling)["Reconciling"] == ("True", "RolloutInProgress")
    # A generation bumped by others (an annotation) is not a rollout of ours.
    touched = observed(
        deployment={
            "metadata": {"generation": 6},
            "status": {
                "observedGeneration": 5,
                "replicas": 1,
                "readyReplicas": 1,
                "updatedReplicas": 1,
                "availableReplicas": 1,
            },
        },
        deployment_generation=5,
    )
    assert reasons(touched)["Ready"] == ("True", "Available")


def test_a_spec_not_yet_applied_is_never_ready() -> None:
    # The status worker can run before the children worker after a spec change: the live Deployment,
    # fully rolled out, still carries the previous generation's pod template.
    rolled_out = observed().deployments["m"]
    old = {**rolled_out, "spec": {"template": {"metadata": {"annotations": {CONFIG_HASH: "old"}}}}}
    stale = observed(deployment=old, config_hash="new")
    assert reasons(stale)["Ready"] == ("False", "Applying")
    assert reasons(stale)["Reconciling"] == ("True", "Applying")
    ready_c = next(c for c in conditions_for(stale) if c["type"] == "Ready")
    assert ready_c["message"] == "applying generation 2 to the Deployment"
    assert reasons(observed(deployment=old, config_hash="old"))["Ready"] == ("True", "Available")


def test_removals_delete_what_the_wanted_status_lacks() -> None:
    live = {"engineOptions": {"seed": "1", "model_id": "m"}, "replicas": 1, "conditions": [{"type": "A"}]}
    wanted = {"engineOptions": {"model_id": "m"}, "replicas": 1, "conditions": [{"type": "A"}]}
    assert removals(live, wanted) == {"engineOptions": {"seed": None}}
    assert removals(wanted, wanted) is None
    assert removals({"conditions": [{"type": "A"}, {"type": "B"}]}, wanted) == {"conditions": [{"type": "A"}]}


NOT_READY = {
    "metadata": {"generation": 1},
    "status": {"observedGeneration": 1, "replicas": 1, "updatedReplicas": 1},
}


def pod(**status: Any) -> dict[str, Any]:
    return {"metadata": {"name": "m-1"}, "status": status}


@pytest.mark.parametrize(
    ("the_pod", "reason"),
    [
        (
            pod(
                conditions=[
                    {
                        "type": "PodScheduled",
                        "status": "False",
                        "reason": "Unschedulable",
                        "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu.",
                    }
                ]
            ),
            "InsufficientGPU",
        ),
        (
            pod(containerStatuses=[{"name": "c", "state": {"waiting": {"reason": "ImagePullBackOff"}}}]),
            "ImagePullFailed",
        ),
        (
            pod(
                containerStatuses=[
                    {
                        "name": "c",
                        "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                        "lastState": {"terminated": {"reason": "Error", "exitCode": 1}},
                    }
                ]
            ),
            "CrashLoop",
        ),
        (
            pod(
                containerStatuses=[
                    {
                        "name": "c",
                        "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                        "lastState": {"terminated": {"reason": "OOMKilled", "exitCode": 137}},
                    }
                ]
            ),
            "OOMKilled",
        ),
        (
            pod(
                containerStatuses=[
                    {
                        "name": "c",
                        "state": {
                            "waiting": {
                                "reason": "CreateContainerConfigError",
                                "message": 'secret "hf" not found',
                            }
                        },
                    }
                ]
            ),
            "MissingSecret",
        ),
        (
            pod(
                containerStatuses=[
                    {
                        "name": "c",
                        "ready": False,
                        "started": False,
                        "state": {"running": {"startedAt": "2026-11-27T11:00:00Z"}},
                    }
                ]
            ),
            "StartupTimeout",
        ),
    ],
)
def test_pod_problems_become_reasons(the_pod: dict[str, Any], reason: str) -> None:
    obs = observed(deployment=NOT_READY, pods=[the_pod], free_gpus_by_node={"n1": 1})
    got = reasons(obs)
    assert (
        got["Ready"] == ("False", reason)
        and got["Degraded"] == ("True", reason)
        and got["Stalled"][0] == "True"
    )


def crashed(exit_code: int, reason: str, message: str) -> dict[str, Any]:
    """A pod whose model server crash-loops, its status as a kubelet writes it."""
    terminated = {
        "exitCode": exit_code,
        "reason": reason,
        "message": message,
        "startedAt": "2026-11-27T11:58:02Z",
        "finishedAt": "2026-11-27T11:58:09Z",
        "containerID": "containerd://4f1c0e",
    }
    return pod(
        phase="Running",
        containerStatuses=[
            {
                "name": "model-server",
                "image": "lmi-runtime:dev",
                "imageID": "docker.io/library/lmi-runtime@sha256:0d1e",
                "containerID": "containerd://4f1c0e",
                "ready": False,
                "started": False,
                "restartCount": 4,
                "state": {
                    "waiting": {
                        "reason": "CrashLoopBackOff",
                        "message": "back-off 1m20s restarting failed container=model-server "
                        "pod=m-1_ns(0b6f0b6e-4a7c-4c57-9d0e-5d1b6c2e2f6a)",
                    }
                },
                "lastState": {"terminated": terminated},
            }
        ],
    )


LOG_TAIL = (
    "INFO 2026-11-27 11:58:08,120 lmi_runtime: reading /opt/ml/model/serving.properties\n"
    "lmi-runtime: error: option.max_rolling_batch_sise=4: unknown option; did you mean "
    "max_rolling_batch_size?\n"
)
TRACEBACK_TAIL = (
    "Traceback (most recent call last):\n"
    '  File "/usr/lib/python3/site-packages/vllm/worker.py", line 12, in load\n'
    "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 1.00 GiB\n"
)


@pytest.mark.parametrize(
    ("the_pod", "reason", "says"),
    [
        (
            crashed(2, "Error", LOG_TAIL),
            "CrashLoop",
            "pod m-1: container model-server is crash-looping (restarts: 4, last exit: code 2, Error: "
            "lmi-runtime: error: option.max_rolling_batch_sise=4: unknown option; did you mean "
            "max_rolling_batch_size?)",
        ),
        (
            crashed(1, "Error", TRACEBACK_TAIL),
            "CrashLoop",
            "(restarts: 4, last exit: code 1, Error: torch.OutOfMemoryError: CUDA out of memory. "
            "Tried to allocate 1.00 GiB)",
        ),
        (crashed(1, "Error", ""), "CrashLoop", "(restarts: 4, last exit: code 1, Error)"),
        (
            crashed(137, "OOMKilled", "INFO loading weights\n"),
            "OOMKilled",
            "container model-server was OOMKilled (restarts: 4, last exit: code 137, OOMKilled: "
            "INFO loading weights); raise spec.resources.memory",
        ),
    ],
)
def test_a_crash_shows_its_exit_and_last_words(the_pod: dict[str, Any], reason: str, says: str) -> None:
    (ready, *_) = conditions_for(observed(deployment=NOT_READY, pods=[the_pod]))
    assert (ready["status"], ready["reason"]) == ("False", reason)
    assert says in ready["message"]


def fetch_failed(exit_code: int, message: str, waiting: str = "CrashLoopBackOff") -> dict[str, Any]:
    """A pod whose init container `fetch` failed, its status as a kubelet writes it."""
    return pod(
        phase="Pending",
        initContainerStatuses=[
            {
                "name": "fetch",
                "ready": False,
                "restartCount": 2,
                "state": {"waiting": {"reason": waiting}},
                "lastState": {"terminated": {"exitCode": exit_code, "reason": "Error", "message": message}},
            }
        ],
        containerStatuses=[
            {"name": "model-server", "ready": False, "state": {"waiting": {"reason": "PodInitializing"}}}
        ],
    )


@pytest.mark.parametrize(
    ("exit_code", "reason", "says"),
    [
        (
            3,
            "DownloadFailed",
            "pod m-1: lmi-runtime: error: download failed: OPTION_MODEL_ID=s3://models/x: AccessDenied: "
            "these credentials may not list or read it (attempts: 3)",
        ),
        (
            4,
            "DownloadStalled",
            "pod m-1: lmi-runtime: error: download stalled: OPTION_MODEL_ID=s3://models/x: "
            "no progress for 600s",
        ),
    ],
)
def test_a_failed_or_stalled_download_is_reported_with_the_fetchs_words(
    exit_code: int, reason: str, says: str
) -> None:
    words = says.split("pod m-1: ", 1)[1].split(" (attempts")[0]
    # The first failure already counts: the init container is restarting, not yet in back-off.
    for waiting in ("CrashLoopBackOff", "PodInitializing"):
        the_pod = fetch_failed(exit_code, f"INFO listing s3://models/x\n{words}\n", waiting)
        (ready, *_) = conditions_for(observed(deployment=NOT_READY, pods=[the_pod]))
        assert (ready["status"], ready["reason"]) == ("False", reason)
        assert ready["message"].startswith(says.split(" (attempts")[0])
    # Any other failure of the init container (a configuration error) is a crash loop as before.
    (ready, *_) = conditions_for(
        observed(deployment=NOT_READY, pods=[fetch_failed(2, "lmi-runtime: error: x")])
    )
    assert ready["reason"] == "CrashLoop"


def test_the_cache_is_an_empty_dir_a_named_claim_or_a_claim_the_operator_makes() -> None:
    def cache_volume(obj: Any, settings: OperatorSettings = SETTINGS) -> dict[str, Any]:
        dep = render(obj, settings).by_kind("Deployment")
        assert dep is not None
        return next(v for v in dep["spec"]["template"]["spec"]["volumes"] if v["name"] == "cache")

    assert cache_volume(model()) == {"name": "cache", "emptyDir": {}}
    sized = model(cache={"emptyDir": {"sizeLimit": "50Gi"}})
    assert cache_volume(sized) == {"name": "cache", "emptyDir": {"sizeLimit": "50Gi"}}
    shared = model(cache={"persistentVolumeClaim": {"claimName": "models"}})
    assert cache_volume(shared) == {"name": "cache", "persistentVolumeClaim": {"claimName": "models"}}
    assert "PersistentVolumeClaim" not in kinds(shared)

    owned = model(cache={"claimTemplate": {"size": "100Gi", "storageClassName": "fast"}})
    assert cache_volume(owned) == {"name": "cache", "persistentVolumeClaim": {"claimName": "m-cache"}}
    claim = render(owned, SETTINGS).by_kind("PersistentVolumeClaim")
    assert claim is not None and claim["metadata"]["name"] == "m-cache"
    assert claim["metadata"]["ownerReferences"][0]["uid"] == "u-1"
    assert claim["spec"] == {
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": "100Gi"}},
        "storageClassName": "fast",
    }
    # The operator's default applies to models without spec.cache; a model's own cache wins.
    default = OperatorSettings.from_env(
        {"LMI_OPERATOR_DEFAULT_CACHE": '{"claimTemplate": {"size": "1Ti", "accessMode": "ReadWriteMany"}}'}
    )
    assert cache_volume(model(), default) == {
        "name": "cache",
        "persistentVolumeClaim": {"claimName": "m-cache"},
    }
    assert cache_volume(shared, default)["persistentVolumeClaim"] == {"claimName": "models"}
    assert [o["kind"] for o in render(shared, default).objects].count("PersistentVolumeClaim") == 0


def test_the_default_cache_setting_names_what_is_wrong() -> None:
    for raw, says in [
        (
            '{"claimTemplat": {}}',
            "LMI_OPERATOR_DEFAULT_CACHE='{\"claimTemplat\": {}}': claimTemplat: Extra inputs",
        ),
        (
            '{"claimTemplate": {"size": "1Gi"}}',
            "claimTemplate.accessMode must be ReadWriteMany in the default",
        ),
        ("{oops", "LMI_OPERATOR_DEFAULT_CACHE='{oops': Value error, Expecting property name"),
    ]:
        with pytest.raises(ValueError) as err:
            OperatorSettings.from_env({"LMI_OPERATOR_DEFAULT_CACHE": raw})
        assert says in str(err.value)


def test_the_init_container_downloads_without_gpus_and_s3_credentials_stay_references() -> None:
    obj = model(
        model={
            "id": "s3://models/llama",
            "s3": {
                "credentialsSecretRef": {"name": "s3"},
                "endpointUrl": "http://minio:9000",
                "region": "eu-west-1",
            },
        },
        startup={"downloadStallSeconds": 120},
        serviceAccountName="reader",
        resources={"gpus": 2, "cpu": 4, "memory": "32Gi"},
    )
    pod = deployment(obj)["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    assert init["args"] == ["fetch", "--model-dir", "/opt/ml/model"]
    assert init["resources"] == {"requests": {"cpu": "4", "memory": "32Gi"}}
    env = {e["name"]: e for e in init["env"]}
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"] == {
        "secretKeyRef": {"name": "s3", "key": "AWS_ACCESS_KEY_ID"}
    }
    assert env["AWS_SESSION_TOKEN"]["valueFrom"]["secretKeyRef"]["optional"] is True
    assert env["AWS_ENDPOINT_URL_S3"]["value"] == "http://minio:9000"
    assert env["AWS_REGION"]["value"] == "eu-west-1"
    assert env["LMI_DOWNLOAD_STALL_SECONDS"]["value"] == "120"
    # The runtime keys vLLM's compile cache itself; the pod no longer pins one folder for all.
    assert "VLLM_CACHE_ROOT" not in env
    assert pod["serviceAccountName"] == "reader" and pod["automountServiceAccountToken"] is True
    config = render(obj, SETTINGS).by_kind("ConfigMap")
    assert config is not None and "REPLACE" not in json.dumps(config)


def test_a_single_replica_claim_refuses_more_replicas() -> None:
    with pytest.raises(
        ValueError, match=re.escape("cache.claimTemplate.accessMode other than ReadWriteMany")
    ):
        model(cache={"claimTemplate": {"size": "1Gi"}}, replicas=2)
    with pytest.raises(ValueError, match=re.escape("spec.autoscaling.maxReplicas above 1")):
        model(
            cache={"claimTemplate": {"size": "1Gi", "accessMode": "ReadWriteOncePod"}},
            autoscaling={"maxReplicas": 3, "targetCPUUtilizationPercentage": 50},
        )
    model(cache={"claimTemplate": {"size": "1Gi", "accessMode": "ReadWriteMany"}}, replicas=4)


def starting_pod(name: str, **status: Any) -> dict[str, Any]:
    """A replica created at 11:00:00 with the given status (as a kubelet writes it)."""
    return {"metadata": {"name": name, "creationTimestamp": "2026-11-27T11:00:00Z"}, "status": status}


FETCHED = {
    "name": "fetch",
    "state": {
        "terminated": {
            "exitCode": 0,
            "startedAt": "2026-11-27T11:00:05Z",
            "finishedAt": "2026-11-27T11:01:05Z",
        }
    },
}
RUNNING_SERVER = {
    "name": "model-server",
    "ready": False,
    "state": {"running": {"startedAt": "2026-11-27T11:01:06Z"}},
}


def test_each_replicas_phase_comes_from_its_pod_and_its_runtimes_report() -> None:
    pending = starting_pod("p-pending", conditions=[{"type": "PodScheduled", "status": "False"}])
    downloading = starting_pod(
        "p-downloading",
        initContainerStatuses=[
            {"name": "fetch", "state": {"running": {"startedAt": "2026-11-27T11:00:03Z"}}}
        ],
    )
    starting = starting_pod("p-starting", initContainerStatuses=[FETCHED], containerStatuses=[RUNNING_SERVER])
    compiling = starting_pod(
        "p-compiling", initContainerStatuses=[FETCHED], containerStatuses=[RUNNING_SERVER]
    )
    ready = starting_pod(
        "p-ready",
        initContainerStatuses=[FETCHED],
        containerStatuses=[RUNNING_SERVER | {"ready": True}],
        conditions=[{"type": "Ready", "status": "True", "lastTransitionTime": "2026-11-27T11:02:30Z"}],
    )
    runtime = {
        # 11:01:50 UTC, 40 s into the server's start.
        "p-compiling": {
            "phase": "Compiling",
            "since": 1795777310.4,
            "seconds": {"Starting": 14.2, "LoadingWeights": 30.0},
        },
        "p-ready": {
            "phase": "Ready",
            "since": 1795777350.0,
            "seconds": {"Starting": 14, "LoadingWeights": 30, "Compiling": 40},
        },
    }
    status = startup_status([ready, compiling, starting, downloading, pending], runtime)
    assert status is not None and status["phase"] == "Pending"
    by_pod = {entry["pod"]: entry for entry in status["replicas"]}
    assert [e["pod"] for e in status["replicas"]] == [
        "p-pending",
        "p-downloading",
        "p-starting",
        "p-compiling",
        "p-ready",
    ]
    assert by_pod["p-pending"] == {
        "pod": "p-pending",
        "phase": "Pending",
        "since": "2026-11-27T11:00:00Z",
        "seconds": {},
    }
    assert by_pod["p-downloading"] == {
        "pod": "p-downloading",
        "phase": "Downloading",
        "since": "2026-11-27T11:00:03Z",
        "seconds": {"Pending": 3},
    }
    # Without the runtime's report the pod only tells that the server started.
    assert (
        by_pod["p-starting"]["phase"] == "Starting"
        and by_pod["p-starting"]["since"] == "2026-11-27T11:01:06Z"
    )
    assert by_pod["p-starting"]["seconds"] == {"Pending": 5, "Downloading": 60}
    assert by_pod["p-compiling"] == {
        "pod": "p-compiling",
        "phase": "Compiling",
        "since": "2026-11-27T11:01:50Z",
        "seconds": {"Pending": 5, "Downloading": 60, "Starting": 14, "LoadingWeights": 30},
    }
    assert by_pod["p-ready"] == {
        "pod": "p-ready",
        "phase": "Ready",
        "since": "2026-11-27T11:02:30Z",
        "seconds": {"Pending": 5, "Downloading": 60, "Starting": 14, "LoadingWeights": 30, "Compiling": 40},
    }
    assert startup_status([], {}) is None


def test_the_startup_status_is_written_and_stays_stable() -> None:
    pods = [starting_pod("p-1", initContainerStatuses=[FETCHED], containerStatuses=[RUNNING_SERVER])]
    startup = startup_status(pods, {})
    obs = observed(deployment=NOT_READY, pods=pods, startup=startup, startup_timeout_seconds=7200)
    status = build_status(obs, None)
    assert status["startup"] == {"phase": "Starting", "replicas": startup["replicas"]}  # type: ignore[index]
    later = Observed(**{**obs.__dict__, "now": NOW + datetime.timedelta(minutes=5)})
    assert build_status(later, status) == status
    # The status schema holds what the operator writes.
    parse_lmimodel(
        {
            "apiVersion": "serving.lmi.dev/v1alpha1",
            "kind": "LMIModel",
            "metadata": {"name": "m"},
            "spec": {"model": {"id": "org/m"}},
            "status": status,
        }
    )


def test_a_restart_by_the_startup_probe_is_a_startup_timeout_not_a_crash() -> None:
    # The kubelet stopped the server after the whole budget (600 s) without it ever being ready.
    the_pod = crashed(137, "Error", "INFO loading weights\n")
    terminated = the_pod["status"]["containerStatuses"][0]["lastState"]["terminated"]
    terminated |= {"startedAt": "2026-11-27T11:40:00Z", "finishedAt": "2026-11-27T11:50:05Z"}
    (ready, *_) = conditions_for(observed(deployment=NOT_READY, pods=[the_pod]))
    assert (ready["status"], ready["reason"]) == ("False", "StartupTimeout")
    assert (
        "was restarted after 605s without becoming ready, over spec.startup.timeoutSeconds=600"
        in ready["message"]
    )
    # A short run that crashed is a crash.
    (ready, *_) = conditions_for(observed(deployment=NOT_READY, pods=[crashed(137, "Error", "x\n")]))
    assert ready["reason"] == "CrashLoop"


def test_a_crash_message_stays_short() -> None:
    endless = "lmi-runtime: error: " + "x" * 10_000 + "\n" + "y" * 3000
    (ready, *_) = conditions_for(observed(deployment=NOT_READY, pods=[crashed(2, "Error", endless)]))
    assert ready["reason"] == "CrashLoop" and "Error: lmi-runtime: error: xxx" in ready["message"]
    assert len(ready["message"]) < 700 and ready["message"].endswith("xx...)")


def test_invalid_spec_wins_and_timestamps_are_stable() -> None:
    obs = observed(invalid_spec="spec.engine.options.x: not an engine argument")
    status = build_status(obs, None)
    assert status["conditions"][0]["reason"] == "InvalidSpec" and status["observedGeneration"] == 2
    later = Observed(**{**obs.__dict__, "now": NOW + datetime.timedelta(minutes=5)})
    assert build_status(later, status) == status


def batch_advice(obs: Observed) -> list[dict[str, str]]:
    return [c for c in conditions_for(obs) if c["type"] == BATCH_SIZE_DEFAULTED]


def test_async_mode_at_lmis_default_batch_size_is_reported() -> None:
    obs = observed(engine_mode="async")
    assert batch_advice(obs) == [
        {
            "type": "BatchSizeDefaulted",
            "status": "True",
            "reason": "LMIAsyncDefault",
            "message": "async mode with LMI's default max_rolling_batch_size 32; vLLM's engine reaches "
            "about 3x the throughput at 256 on an H200; set spec.engine.maxRollingBatchSize to raise it",
        }
    ]
    # Advice, not health: the five health conditions read exactly as they do without it.
    assert reasons(obs) == reasons(observed()) | {"BatchSizeDefaulted": ("True", "LMIAsyncDefault")}
    stamped = next(c for c in build_status(obs, None)["conditions"] if c["type"] == BATCH_SIZE_DEFAULTED)
    assert stamped["observedGeneration"] == 2 and stamped["lastTransitionTime"] == "2026-11-27T12:00:00Z"


@pytest.mark.parametrize(
    ("mode", "batch_size"),
    [("async", 32), ("async", 256), ("rollingBatch", None), ("rollingBatch", 64), (None, None)],
    ids=["async-set-to-the-default", "async-raised", "rolling-batch", "rolling-batch-set", "spec-unread"],
)
def test_a_set_batch_size_or_rolling_batch_mode_is_not_reported(
    mode: EngineMode | None, batch_size: int | None
) -> None:
    obs = observed(engine_mode=mode, max_rolling_batch_size=batch_size)
    assert batch_advice(obs) == []
    assert reasons(obs) == reasons(observed())


def test_setting_the_batch_size_removes_the_condition_and_keeps_the_others_stamps() -> None:
    before = build_status(observed(engine_mode="async"), None)
    later = NOW + datetime.timedelta(minutes=5)
    after = build_status(observed(engine_mode="async", max_rolling_batch_size=256, now=later), before)
    assert [c["type"] for c in after["conditions"]] == [
        "Ready",
        "Progressing",
        "Degraded",
        "Reconciling",
        "Stalled",
    ]
    assert after["conditions"] == before["conditions"][:5]


class AnsweringClient(kube.KubeClient):
    """A client that answers every request as if the API server took it, and keeps the status
    applies, so that the whole status path runs without a cluster."""

    def __init__(self) -> None:
        super().__init__(kube.Credentials(server="https://127.0.0.1:1"))
        self.statuses: list[dict[str, Any]] = []

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        params: Mapping[str, str] | None = None,
        content_type: str = "application/json",
        guarded: bool = True,
    ) -> dict[str, Any]:
        if method == "GET":
            return {"items": []}  # a cluster without nodes
        if path.endswith("/status"):
            self.statuses.append(body["status"])
        return {**body, "metadata": {"name": "answered", **body["metadata"]}}


def reported_advice(engine: dict[str, Any]) -> list[dict[str, Any]]:
    """The BatchSizeDefaulted conditions of the status the reporter writes for a model with `engine`."""
    client = AnsweringClient()
    cache = ModelCache(client, (), *[lambda _: None] * 3)
    body = {
        "apiVersion": "serving.lmi.dev/v1alpha1",
        "kind": "LMIModel",
        "metadata": {"name": "m", "namespace": "ns", "uid": "u-1", "generation": 1},
        "spec": {"model": {"id": "org/model"}, "engine": engine},
    }
    cache.observe_model(body, deleted=False)
    reporter = StatusReporter(client, cache, SETTINGS, EventRecorder(client))
    asyncio.run(reporter.report(("ns", "m")))
    reporter.forget(("ns", "m"))  # out of the models-by-reason gauge again
    (status,) = client.statuses
    return [c for c in status["conditions"] if c["type"] == BATCH_SIZE_DEFAULTED]


def test_the_reporter_advises_from_the_spec_and_the_named_field_silences_it() -> None:
    (advice,) = reported_advice({})
    assert (advice["status"], advice["reason"]) == ("True", "LMIAsyncDefault")
    assert advice["message"].endswith("set spec.engine.maxRollingBatchSize to raise it")
    assert reported_advice({"mode": "async"}) == [advice]
    # The field the message names, at that path, is the one that removes the advice.
    assert BATCH_SIZE_FIELD == "spec.engine.maxRollingBatchSize"
    assert reported_advice({"maxRollingBatchSize": 32}) == []
    assert reported_advice({"mode": "rollingBatch"}) == []
    # An invalid spec is not applied (the batch size may not go through engine.options either).
    assert reported_advice({"options": {"max_num_seqs": "256"}}) == []


def test_the_api_reference_says_the_default_the_figures_and_the_condition() -> None:
    reference = (REPO_ROOT / "docs" / "api.md").read_text()
    mode_row = next(line for line in reference.splitlines() if line.startswith("| `mode` |"))
    size_row = next(line for line in reference.splitlines() if line.startswith("| `maxRollingBatchSize` |"))
    for row in (mode_row, size_row):
        assert (
            "LMI's default batch size of 32 caps throughput" in row
            and "5.2-5.7k tokens/s" in row
            and "15.7k at 256" in row
        )
        assert f"condition {BATCH_SIZE_DEFAULTED} (reason {LMI_ASYNC_DEFAULT})" in row


def test_contains_ignores_server_defaults_and_canonical_quantities() -> None:
    desired = {"spec": {"containers": [{"name": "c", "resources": {"limits": {"memory": "1024Mi"}}}]}}
    live = {
        "spec": {
            "containers": [
                {"name": "c", "resources": {"limits": {"memory": "1Gi"}}, "imagePullPolicy": "Always"}
            ],
            "dnsPolicy": "ClusterFirst",
        }
    }
    assert contains(live, desired)
    assert not contains(live, {"spec": {"containers": [{"name": "c", "image": "x"}]}})
    assert not contains({"a": [1, 2]}, {"a": [1]})
    assert not contains({"a": "1"}, {"a": 1})


def test_work_queue_deduplicates_and_retries() -> None:
    seen: list[str] = []
    failures = {"b": 1}

    async def process(key: str) -> None:
        seen.append(key)
        if failures.get(key):
            failures[key] -= 1
            raise RuntimeError("transient")

    async def main() -> None:
        queue: WorkQueue[str] = WorkQueue(process, workers=2, base_delay=0.01)
        for key in ["a", "a", "b", "a"]:
            queue.add(key)
        runner = asyncio.create_task(queue.run())
        await asyncio.sleep(0.2)
        runner.cancel()

    asyncio.run(main())
    assert seen.count("a") == 1 and seen.count("b") == 2


def test_engine_args_table_matches_the_installed_vllm() -> None:
    """`make engine-args` output is committed; it must match the pinned vLLM the tests install."""
    out = subprocess.run(
        [sys.executable, "-m", "lmi_runtime", "engine-args-table"], capture_output=True, text=True, check=True
    ).stdout
    committed = (REPO_ROOT / "operator" / "lmi_operator" / "vllm_engine_args.json").read_text()
    assert json.loads(out) == json.loads(committed), "stale table: run `make engine-args`"


def test_liveness_is_ok_on_standby_and_fails_when_the_queue_stalls() -> None:
    from lmi_operator.health import Health
    from lmi_operator.kube import Credentials, KubeClient
    from lmi_operator.reconciler import Reconciler

    health = Health(stall_seconds=5)
    assert health.check() == (200, {"role": "standby"})
    reconciler = Reconciler(KubeClient(Credentials(server="https://127.0.0.1:1")), SETTINGS)
    health.reconciler = reconciler
    assert health.check() == (200, {"role": "leader", "queued": 0})
    reconciler.queue._queued.add(("ns", "m"))
    reconciler.last_progress -= 60
    status, body = health.check()
    assert status == 500 and "no reconcile finished for 60s" in str(body["error"])


def test_in_cluster_credentials_bracket_an_ipv6_service_host(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, text in (("ca.crt", "ca"), ("token", "t0ken\n"), ("namespace", "ops")):
        (tmp_path / name).write_text(text)
    monkeypatch.setattr(kube, "SA_DIR", tmp_path)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "absent"))
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "fd00:10:96::1")
    creds = load_credentials()
    assert (creds.server, creds.bearer(), creds.namespace) == ("https://[fd00:10:96::1]:443", "t0ken", "ops")
    assert creds.ca_data == b"ca"
    # A projected token rotates: every request reads the file again.
    (tmp_path / "token").write_text("rotated\n")
    assert creds.bearer() == "rotated"
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    assert load_credentials().server == "https://10.96.0.1:443"


@pytest.mark.parametrize(
    ("a", "b", "order"),
    [
        ("9", "10", -1),  # as integers, not as strings
        ("10", "9", 1),
        ("123", "123", 0),
        ("18446744073709551616", "18446744073709551615", 1),  # past 64 bits
        ("0", "1", None),  # zero is never a live version
        ("012", "12", None),  # leading zeros are not a version
        ("a1", "1", None),  # an aggregated API server's own scheme
        ("", "1", None),
        ("\u0661", "1", None),  # a non-ASCII digit
    ],
)
def test_resource_versions_compare_as_kep_5504_defines_or_not_at_all(
    a: str, b: str, order: int | None
) -> None:
    assert compare_versions(a, b) == order


def _cm(version: str, data: str) -> dict[str, Any]:
    meta = {"name": "m-config", "namespace": "ns", "resourceVersion": version, "labels": {MODEL_LABEL: "m"}}
    return {"kind": "ConfigMap", "metadata": meta, "data": {"v": data}}


def test_a_writes_answer_older_than_the_watched_copy_is_dropped_unless_versions_are_opaque() -> None:
    cache = ModelCache(
        kube.KubeClient(kube.Credentials(server="https://127.0.0.1:1")), (), *[lambda _: None] * 3
    )
    cache.observe_child(_cm("20", "watched"), deleted=False)
    key = ("ns", "m")
    assert key in cache.models, "the child was not attributed to its model by its label"
    cache.written(key, _cm("19", "answer"))
    assert cache.models[key].children["ConfigMap", "m-config"]["data"]["v"] == "watched"
    cache.written(key, _cm("21", "answer"))
    assert cache.models[key].children["ConfigMap", "m-config"]["data"]["v"] == "answer"
    cache.observe_child(_cm("x7", "opaque"), deleted=False)  # incomparable: arrival order wins
    assert cache.models[key].children["ConfigMap", "m-config"]["data"]["v"] == "opaque"


def test_an_answer_after_the_models_deletion_does_not_bring_it_back() -> None:
    cache = ModelCache(
        kube.KubeClient(kube.Credentials(server="https://127.0.0.1:1")), (), *[lambda _: None] * 3
    )
    model = {"kind": "LMIModel", "metadata": {"name": "m", "namespace": "ns", "resourceVersion": "5"}}
    cache.observe_model(model, deleted=False)
    cache.observe_model(model, deleted=True)
    assert ("ns", "m") not in cache.models
    # The status apply that was in flight answers now; so does a child's apply.
    cache.written(("ns", "m"), model | {"metadata": {**model["metadata"], "resourceVersion": "6"}})
    cache.written(("ns", "m"), _cm("7", "late"))
    assert ("ns", "m") not in cache.models


def test_memory_is_trimmed_once_the_models_fell_and_held_still(monkeypatch: pytest.MonkeyPatch) -> None:
    from lmi_operator import memory

    trims: list[int] = []
    polls = [100, 100, 150, 60, 40, 40, 40, 45, 30, 30, 30]
    seen: list[int] = []

    def size() -> int:
        seen.append(polls[min(len(seen), len(polls) - 1)])
        return seen[-1]

    monkeypatch.setattr(memory, "trim", lambda: trims.append(seen[-1]) or True)

    async def scenario() -> None:
        task = asyncio.create_task(memory.Trimmer(size, threshold=20, period=0.001).run())
        while len(seen) < len(polls) + 3:
            await asyncio.sleep(0.001)
        task.cancel()

    asyncio.run(scenario())
    # 150 -> 40 and held still: trimmed once; then 45 -> 30 is 15 below the new peak (under the
    # threshold): not trimmed; a growth alone never trims.
    assert trims == [40], trims


def test_the_deletion_of_a_child_replaced_by_one_named_anew_keeps_the_new_one() -> None:
    cache = ModelCache(
        kube.KubeClient(kube.Credentials(server="https://127.0.0.1:1")), (), *[lambda _: None] * 3
    )

    def job(name: str) -> dict[str, Any]:
        meta = {"name": name, "namespace": "ns", "resourceVersion": "7", "labels": {MODEL_LABEL: "m"}}
        return {"kind": "Job", "metadata": meta}

    cache.observe_child(job("m-inspect-aaaaaa"), deleted=False)
    cache.observe_child(job("m-inspect-bbbbbb"), deleted=False)
    cache.observe_child(job("m-inspect-aaaaaa"), deleted=True)
    assert [j["metadata"]["name"] for j in cache.models["ns", "m"].of_kind("Job")] == ["m-inspect-bbbbbb"]
    cache.observe_child(job("m-inspect-bbbbbb"), deleted=True)
    assert ("ns", "m") not in cache.models, "nothing of the model is left to remember"
