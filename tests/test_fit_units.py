"""The memory fit judged before a GPU model's Deployment exists: the inspection Job the operator
renders, what it reads back from the Job's pod, the engine settings it takes from the LMI options,
and the judgement with its condition (no cluster: the kwok and real-node tests run it live)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from lmi_operator.api import parse_lmimodel
from lmi_operator.capacity import Engine, GiB, engine_of
from lmi_operator.fit_status import (
    FITS,
    INSPECTING,
    INSPECTION_FAILED,
    INSUFFICIENT_GPU_MEMORY,
    NO_GPU_NODES,
    GpuType,
    Inspection,
    inspection_of,
    judge,
    read_message,
)
from lmi_operator.properties import lmi_options
from lmi_operator.render import MODEL_LABEL, render, selector_of
from lmi_operator.render_inspect import INSPECTS_LABEL, TERMINATION_LOG
from lmi_operator.settings import OperatorSettings
from lmi_runtime.cli import argument_parser
from lmi_runtime.model_facts import facts_from

DATA = Path(__file__).parent / "data" / "capacity"
EXAMPLES: dict[str, dict[str, Any]] = json.loads((DATA / "example-configs.json").read_text())
SETTINGS = OperatorSettings(leader_election=False, metrics_port=0, health_port=0)
H100 = GpuType("NVIDIA-H100-80GB-HBM3", 81559 * 2**20, 8)
A10G = GpuType("NVIDIA-A10G", 23028 * 2**20, 4)


def model(spec: dict[str, Any], name: str = "m") -> Any:
    body = {
        "apiVersion": "serving.lmi.dev/v1alpha1",
        "kind": "LMIModel",
        "metadata": {"name": name, "namespace": "ns", "uid": "u-1", "generation": 1},
        "spec": {"model": {"id": "org/model"}} | spec,
    }
    return parse_lmimodel(body)


def facts_document(name: str, source: str = "org/model") -> dict[str, Any]:
    """status.modelFacts of an example model, as the operator records it."""
    return {"source": source, **facts_from(EXAMPLES[name]["config"]).to_status()}


def test_the_inspection_job_runs_the_model_servers_image_env_and_properties_without_gpus() -> None:
    obj = model(
        {"resources": {"gpus": 2}, "model": {"id": "org/model", "revision": "v2"}, "image": "team/lmi:1"}
    )
    rendered = render(obj, SETTINGS, inspect=True)
    server = rendered.by_kind("Deployment")["spec"]["template"]["spec"]  # type: ignore[index]
    job = rendered.by_kind("Job")
    assert job is not None and job["metadata"]["name"].startswith("m-inspect-")
    assert job["metadata"]["ownerReferences"][0]["kind"] == "LMIModel"
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    # The operator's runtime image, whatever image the model runs (it has `inspect`).
    assert container["image"] == SETTINGS.runtime_image != server["containers"][0]["image"]
    assert container["env"] == server["containers"][0]["env"]
    assert pod["securityContext"] == server["securityContext"]
    assert "nvidia.com/gpu" not in json.dumps(container["resources"])
    assert "tolerations" not in pod, "no GPU node's taint is tolerated: the Job needs no GPU"
    assert pod["restartPolicy"] == "Never" and job["spec"]["backoffLimit"] == 0
    # Its pod is not one of the model's: the Service and Deployment select by the model label.
    labels = job["spec"]["template"]["metadata"]["labels"]
    assert labels[INSPECTS_LABEL] == "m" and MODEL_LABEL not in labels
    assert not selector_of("m").items() <= labels.items()
    # The runtime's own parser accepts the command (the contract between the two images).
    parsed = argument_parser().parse_args(container["args"])
    assert (parsed.command, parsed.message_file) == ("inspect", Path(TERMINATION_LOG))
    assert container["terminationMessagePolicy"] == "File"


def job_name(spec: dict[str, Any], name: str = "m") -> str:
    job = render(model(spec, name), SETTINGS, inspect=True).by_kind("Job")
    assert job is not None
    return str(job["metadata"]["name"])


def test_the_inspection_job_is_named_anew_for_a_new_template_within_the_label_limit() -> None:
    # A Job's template is immutable: whatever changes it (the source, the revision, spec.env) makes
    # a Job of another name, and the same spec always the same name.
    long = "m" * 63
    first = job_name({}, long)
    assert len(first) <= 63 and first.startswith("m" * 45 + "-inspect-")
    assert job_name({"model": {"id": "org/other"}}, long) != first
    assert job_name({"model": {"id": "org/model", "revision": "v2"}}, long) != first
    assert job_name({"env": [{"name": "AWS_REGION", "value": "eu-west-1"}]}, long) != first
    assert job_name({}, long) == first


def test_without_deploy_the_deployment_is_held_back_and_the_rest_is_rendered() -> None:
    kinds = [o["kind"] for o in render(model({}), SETTINGS, inspect=True, deploy=False).objects]
    assert kinds == ["ConfigMap", "Service", "Job"]


def test_the_engine_of_the_lmi_options_resolves_max_lora_and_engine_options() -> None:
    spec = {
        "resources": {"gpus": 4},
        "engine": {"quantize": "fp8", "maxModelLen": 8192, "options": {"enforce_eager": "true"}},
        "lora": {"enabled": True, "maxLoraRank": 64},
    }
    engine = engine_of(lmi_options(model(spec).spec), 4)
    assert (engine.tensor_parallel, engine.quantize, engine.max_model_len) == (4, "fp8", 8192)
    assert (engine.max_loras, engine.max_lora_rank, engine.enforce_eager) == (4, 64, True)
    plain = engine_of(lmi_options(model({"engine": {"tensorParallelDegree": 1}}).spec), 8)
    assert (plain.tensor_parallel, plain.max_loras, plain.gpu_memory_utilization) == (1, 0, 0.9)


def test_a_70b_model_on_one_gpu_fits_nothing_and_names_the_numbers_and_what_would_fit() -> None:
    facts = facts_document("meta-llama/Llama-3.1-70B-Instruct")
    engine = engine_of({"tensor_parallel_degree": "1", "max_model_len": "8192"}, 1)
    report = judge(Inspection(facts=facts), engine, [A10G, H100], "m-inspect")
    assert not report.deploy and report.insufficient
    assert report.condition["status"] == "False" and report.condition["reason"] == INSUFFICIENT_GPU_MEMORY
    message = report.condition["message"]
    # The larger GPU first, each with its numbers and its remedy.
    assert message.index("NVIDIA-H100-80GB-HBM3") < message.index("NVIDIA-A10G")
    assert message == (
        "needs 138.7 GiB per GPU (weights 131.4 + KV cache 2.5 + LoRA 0.0 + overhead 4.8); "
        "NVIDIA-H100-80GB-HBM3 has 71.7 GiB usable: tensorParallelDegree 2 would fit; "
        # Four A10Gs on a node hold 33 GiB of weights each: nothing within one node fits.
        "NVIDIA-A10G has 20.2 GiB usable"
    )


def test_a_model_that_fits_reports_its_headroom_and_the_types_it_does_not_fit() -> None:
    facts = facts_document("meta-llama/Meta-Llama-3-8B-Instruct")
    engine = engine_of({"tensor_parallel_degree": "1", "max_model_len": "32768"}, 1)
    report = judge(Inspection(facts=facts, job_needed=False), engine, [A10G, H100], "m-inspect")
    assert report.deploy and not report.keep_job and report.facts == facts
    assert (report.condition["status"], report.condition["reason"]) == ("True", FITS)
    assert report.condition["message"].startswith("fits NVIDIA-H100-80GB-HBM3: needs ")
    assert "sequences of 32768 tokens at once; does not fit NVIDIA-A10G" in report.condition["message"]


def test_while_inspecting_the_deployment_waits_and_a_failed_inspection_does_not_block() -> None:
    engine = engine_of({}, 1)
    waiting = judge(Inspection(), engine, [H100], "m-inspect-abc")
    assert (waiting.condition["status"], waiting.condition["reason"]) == ("Unknown", INSPECTING)
    assert not waiting.deploy and waiting.keep_job and waiting.inspecting
    assert "Job m-inspect-abc" in waiting.condition["message"]
    failed = judge(Inspection(error="option.model_id=s3://b/m: NoSuchBucket"), engine, [H100], "j")
    assert (failed.condition["status"], failed.condition["reason"]) == ("Unknown", INSPECTION_FAILED)
    assert failed.deploy and failed.keep_job, "the failed Job stays: it is the record of the failure"
    assert "NoSuchBucket" in failed.condition["message"]
    facts = facts_document("meta-llama/Meta-Llama-3-8B-Instruct")
    unjudged = judge(Inspection(facts=facts), engine, [], "j")
    assert (unjudged.condition["reason"], unjudged.deploy) == (NO_GPU_NODES, True)


def _pod(job: str, message: str | None) -> dict[str, Any]:
    state = {"terminated": {"exitCode": 0, "message": message}} if message is not None else {"running": {}}
    return {"metadata": {"labels": {"job-name": job}}, "status": {"containerStatuses": [{"state": state}]}}


def test_the_result_is_read_from_the_pod_of_the_current_job_only() -> None:
    facts = facts_from(EXAMPLES["meta-llama/Meta-Llama-3-8B-Instruct"]["config"]).to_status()
    document = json.dumps({"facts": facts, "source": "org/model", "revision": "v2"})
    job = {"metadata": {"name": "m-inspect-new"}, "status": {}}
    old = _pod("m-inspect-old", json.dumps({"error": "an older source"}))
    assert inspection_of(job, [old], "org/model", "v2") == Inspection()
    found = inspection_of(job, [old, _pod("m-inspect-new", document)], "org/model", "v2")
    assert found.facts == {"source": "org/model", "revision": "v2", **facts}
    assert inspection_of(job, [_pod("m-inspect-new", None)], "org/model", None) == Inspection()
    failed = {"metadata": {"name": "j"}, "status": {"conditions": [
        {"type": "Failed", "status": "True", "reason": "DeadlineExceeded", "message": "Job was active longer"}
    ]}}  # fmt: skip
    assert (
        inspection_of(failed, [], "org/model", None).error == "Job j: DeadlineExceeded: Job was active longer"
    )


@pytest.mark.parametrize(
    ("message", "error"),
    [
        ("", "the inspection pod ended without its result in its termination message"),
        ("Traceback (most recent call last):", "the inspection pod ended without its result"),
        ('{"error": "option.model_id=org/model: the hub refused: 401"}', "the hub refused: 401"),
        ('{"facts": {"layers": 2}}', "the inspection's result is unreadable: model facts: "),
    ],
)
def test_an_unusable_termination_message_is_an_inspection_failure_naming_why(
    message: str, error: str
) -> None:
    found = read_message(message, "org/model", None)
    assert found.facts is None and found.error is not None and error in found.error


def test_a_70b_model_needs_what_the_estimate_says() -> None:
    # The judgement's numbers are the estimate's (tests/test_capacity.py holds those to vLLM's).
    facts = facts_document("meta-llama/Llama-3.1-70B-Instruct")
    report = judge(Inspection(facts=facts), engine_of({"tensor_parallel_degree": "1"}, 1), [H100], "j")
    needed = float(report.condition["message"].split("needs ")[1].split(" GiB")[0])
    assert needed * GiB > H100.memory


def test_an_inspection_pod_that_cannot_start_fails_at_once_and_one_not_scheduled_yet_waits() -> None:
    job = {"metadata": {"name": "j"}, "status": {}}
    pulling = {
        "metadata": {"name": "j-x", "labels": {"job-name": "j"}},
        "status": {
            "containerStatuses": [{"state": {"waiting": {"reason": "ImagePullBackOff", "message": "no"}}}]
        },
    }
    assert inspection_of(job, [pulling], "org/model", None).error == "pod j-x: ImagePullBackOff: no"
    creating = {
        "metadata": {"name": "j-x", "labels": {"job-name": "j"}},
        "status": {"containerStatuses": [{"state": {"waiting": {"reason": "ContainerCreating"}}}]},
    }
    assert inspection_of(job, [creating], "org/model", None) == Inspection(), "that one passes by itself"
    unschedulable = {
        "metadata": {"name": "j-x", "labels": {"job-name": "j"}},
        "status": {
            "conditions": [
                {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": "0/3 nodes"}
            ]
        },
    }
    # It may pass by itself (a node short of CPU for now): the inspection waits and says why...
    waiting = inspection_of(job, [unschedulable], "org/model", None)
    why = (
        "pod j-x cannot be scheduled (0/3 nodes); "
        "LMI_OPERATOR_INSPECTION_SCHEDULING (chart: operator.inspectionScheduling) places it"
    )
    assert waiting == Inspection(waiting=why)
    report = judge(waiting, Engine(), [H100], "j")
    assert (report.condition["reason"], report.deploy) == ("Inspecting", False)
    assert report.condition["message"].endswith(f"the Deployment waits for it: {why}")
    # ...until the Job's deadline fails it, which says why too.
    deadline = {"type": "Failed", "status": "True", "reason": "DeadlineExceeded", "message": "too long"}
    failed = {**job, "status": {"conditions": [deadline]}}
    error = inspection_of(failed, [unschedulable], "org/model", None).error
    assert error == f"Job j: DeadlineExceeded: too long; {why}"
