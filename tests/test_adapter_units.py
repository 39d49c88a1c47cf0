"""The declared adapters, without a cluster: what the operator renders for them (no rollout when
they change), how it judges the replicas' answers, and the signatures of its management requests."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from lmi_operator.adapter_status import UNANSWERED, judge, needs_update
from lmi_operator.api import parse_lmimodel
from lmi_operator.render import render
from lmi_operator.render_adapters import ADAPTERS_KEY, ADMIN_KEY_KEY
from lmi_operator.settings import OperatorSettings
from lmi_runtime.admin_auth import Signer, verify

SETTINGS = OperatorSettings()


def model(adapters: list[dict[str, str]] | None, **lora: Any) -> Any:
    spec: dict[str, Any] = {"model": {"id": "org/model"}}
    if adapters is not None:
        spec["lora"] = {"enabled": True, "adapters": adapters, **lora}
    body = {
        "apiVersion": "serving.lmi.dev/v1alpha1",
        "kind": "LMIModel",
        "metadata": {"name": "m", "namespace": "ns", "uid": "u-1", "generation": 1},
        "spec": spec,
    }
    return parse_lmimodel(body)


def by_kind(obj: Any, key: str = "pub") -> dict[str, dict[str, Any]]:
    return {d["kind"]: d for d in render(obj, SETTINGS, key).objects}


def test_changing_adapters_or_the_operator_key_changes_the_configmap_not_the_pods() -> None:
    one = by_kind(model([{"name": "a", "source": "org/a"}]))
    changed = {"a": "s3://bucket/a", "b": "/opt/ml/cache/b"}
    two = by_kind(model([{"name": n, "source": s} for n, s in changed.items()]))
    none = by_kind(model([]))
    rekeyed = by_kind(model([{"name": "a", "source": "org/a"}]), key="another")
    for other in (two, none, rekeyed):
        assert other["Deployment"] == one["Deployment"]
        assert other["Service"] == one["Service"]
    assert json.loads(two["ConfigMap"]["data"][ADAPTERS_KEY]) == changed
    assert json.loads(none["ConfigMap"]["data"][ADAPTERS_KEY]) == {}
    assert rekeyed["ConfigMap"]["data"][ADMIN_KEY_KEY] == "another\n"
    # The management port is the container's, not the Service's.
    container = one["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"http": 8080, "admin": 8081}
    assert [p["name"] for p in one["Service"]["spec"]["ports"]] == ["http"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["LMI_ADAPTERS_FILE"] == "/opt/ml/declared-adapters/adapters.json"
    assert env["LMI_ADMIN_KEYS_FILE"] == "/opt/ml/declared-adapters/admin.pub"
    assert "LMI_ADAPTER_ROUTES" not in env and "LMI_ADAPTERS" not in env


def test_lmis_adapter_routes_are_an_option_and_nothing_is_rendered_without_lora() -> None:
    routed = by_kind(model([], adapterRoutes=True))["Deployment"]
    env = {e["name"]: e.get("value") for e in routed["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["LMI_ADAPTER_ROUTES"] == "true"
    plain = by_kind(model(None))
    container = plain["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert [p["name"] for p in container["ports"]] == ["http"]
    assert not {e["name"] for e in container["env"]} & {"LMI_ADMIN_PORT", "LMI_ADAPTERS_FILE"}
    assert set(plain["ConfigMap"]["data"]) == {"serving.properties"}


def answer(**states: tuple[str, str, str]) -> dict[str, Any]:
    """A runtime's answer: name -> (source, state, reason)."""
    return {
        "adapters": [
            {"name": n, "source": s, "state": st, "reason": r, "message": f"{n}: {r}" if r else ""}
            for n, (s, st, r) in states.items()
        ]
    }


def test_adapters_are_ready_when_every_ready_replica_serves_each_from_its_declared_source() -> None:
    declared = {"a": "org/a", "b": "org/b"}
    both = answer(a=("org/a", "Loaded", ""), b=("org/b", "Loaded", ""))
    report = judge(declared, ["p1", "p2"], {"p1": both, "p2": both})
    assert report.converged and report.loaded == "2/2"
    assert report.condition["reason"] == "AllLoaded"
    assert report.adapters == [
        {"name": "a", "source": "org/a", "loaded": "2/2"},
        {"name": "b", "source": "org/b", "loaded": "2/2"},
    ]
    # b from an older source on p2 (a change not reached yet): loading, not loaded.
    older = answer(a=("org/a", "Loaded", ""), b=("org/old", "Loaded", ""))
    report = judge(declared, ["p1", "p2"], {"p1": both, "p2": older})
    assert not report.converged and report.loaded == "1/2"
    assert report.condition["reason"] == "Loading" and "b on 1/2" in report.condition["message"]


def test_a_failed_adapter_is_named_with_its_replica_and_reason_and_an_unanswering_one_as_unreachable() -> (
    None
):
    declared = {"a": "org/a", "bad": "/no/such"}
    failed = answer(a=("org/a", "Loaded", ""), bad=("/no/such", "Failed", "SourceMissing"))
    report = judge(declared, ["p1", "p2"], {"p1": failed, "p2": UNANSWERED})
    rows = {r["name"]: r for r in report.adapters}
    # The replica that did not answer is named once, in the condition.
    assert rows["a"] == {"name": "a", "source": "org/a", "loaded": "1/2", "reason": "Unreachable"}
    assert rows["bad"]["reason"] == "SourceMissing" and rows["bad"]["message"] == "pod p1: bad: SourceMissing"
    assert report.failed and report.condition["status"] == "False"
    assert report.condition["message"] == (
        "bad: SourceMissing (pod p1: bad: SourceMissing); "
        "pod p2: the management port did not answer, or refused the operator's signature"
    )
    assert report.loaded == "0/2"
    # Not asked yet: loading, no reason.
    fresh = judge(declared, ["p1"], {"p1": None})
    assert fresh.condition["reason"] == "Loading" and "reason" not in fresh.adapters[0]
    nobody = judge(declared, [], {})
    assert (nobody.condition["reason"], nobody.loaded, nobody.adapters) == ("NoReadyReplicas", "0/2", [])
    assert judge({}, ["p1"], {"p1": answer()}).converged


def test_a_replica_is_sent_the_set_when_it_differs_or_failed_one() -> None:
    declared = {"a": "org/a"}
    assert not needs_update(declared, answer(a=("org/a", "Loaded", "")))
    assert needs_update(declared, answer())
    assert needs_update(declared, answer(a=("org/a", "Loaded", ""), x=("org/x", "Loaded", "")))
    assert needs_update(declared, answer(a=("org/b", "Loaded", "")))
    assert needs_update(declared, answer(a=("org/a", "Failed", "SourceMissing")))


@pytest.mark.parametrize(
    ("change", "accepted"),
    [
        ({}, True),
        ({"method": "GET"}, False),
        ({"path": "/lmi/other"}, False),
        ({"body": b'{"adapters": {"x": "/etc"}}'}, False),
        ({"keys": [Signer().public_key]}, False),
        ({"skew": 400}, False),
        ({"skew": -400}, False),
        ({"skew": 200}, True),
        ({"header": "Bearer anything"}, False),
        ({"header": "LMI-Ed25519 12.not-base64!"}, False),
        ({"keys": ["garbage", "SIGNER"]}, True),
    ],
)
def test_the_management_port_accepts_only_fresh_signatures_of_the_same_request(
    change: dict[str, Any], accepted: bool
) -> None:
    signer = Signer()
    body = b'{"adapters": {}}'
    request: dict[str, Any] = {"method": "PUT", "path": "/lmi/adapters", "body": body, "now": time.time()}
    header = change.pop("header", signer.authorization("PUT", "/lmi/adapters", body))
    keys = [signer.public_key if k == "SIGNER" else k for k in change.pop("keys", [signer.public_key])]
    request["now"] += change.pop("skew", 0)
    request |= change
    assert (
        verify(header, request["method"], request["path"], request["body"], keys, now=request["now"])
        is accepted
    )
