"""Random LMIModels against the real API server and operator (issue 8, item 5): valid and invalid
specs with huge strings, unicode, deep option maps and extreme numbers are rejected by the API server
naming the field, reported InvalidSpec, or reconciled; the operator never logs an error for them."""

from __future__ import annotations

import collections
import json
import logging
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmi_operator.testing.cluster import LocalCluster
from lmi_operator.testing.operator import OperatorThread
from tests.kubeapi import Api
from tests.waiting import eventually

pytestmark = pytest.mark.cluster

API_OUTCOMES: collections.Counter[str] = collections.Counter()


def _nest(depth: int, leaf: Any) -> Any:
    for i in range(depth):
        leaf = {f"k{i}": leaf}
    return leaf


UNICODE = st.characters(codec="utf-8", exclude_categories=["Cs"])
HUGE = st.integers(min_value=5_000, max_value=400_000).map(lambda n: "ü" * n)
ODD_TEXT = st.one_of(
    st.text(max_size=50),
    st.text(alphabet=UNICODE, max_size=30),
    HUGE,
    st.sampled_from(["", " ", "\x00", "💥" * 3, "a\nb", "../../etc/passwd", "${HF_TOKEN}"]),
)
SMALL_TEXT = st.text(alphabet=UNICODE, min_size=1, max_size=30)
EXTREME_INT = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, -1, 1, 2**31, 2**53 + 1, 2**63 - 1, -(2**63), 10**30]),
)
NUMBER = st.one_of(EXTREME_INT, st.floats(allow_nan=False, allow_infinity=False), st.just(1e308))
ANY_SCALAR = st.one_of(st.none(), st.booleans(), NUMBER, ODD_TEXT)
DEEP = st.integers(min_value=1, max_value=120).flatmap(lambda d: ANY_SCALAR.map(lambda leaf: _nest(d, leaf)))
ANY_VALUE = st.one_of(ANY_SCALAR, DEEP, st.lists(ANY_SCALAR, max_size=3))

# Real vLLM options, a misspelt one and one that repeats a first-class field.
OPTION_NAMES = ["enforce_eager", "dtype", "seed", "block_size", "swap_space", "enforce_eagr", "max_model_len"]


@st.composite
def lmimodels(draw: st.DrawFn) -> dict[str, Any]:
    # A third of the examples put garbage anywhere; the rest are well-typed with odd values, which
    # the API server's schema admits and the operator must judge (InvalidSpec) or reconcile.
    wild = draw(st.integers(min_value=0, max_value=2)) == 0

    def pick(valid: st.SearchStrategy[Any]) -> Any:
        return draw(st.one_of(valid, valid, valid, ANY_VALUE) if wild else valid)

    gpus = pick(st.sampled_from([0, 1, 2, 4, 8]))
    tp = pick(st.sampled_from([gpus if isinstance(gpus, int) and gpus > 0 else 1, "max"]))
    if wild:
        options = draw(
            st.one_of(
                st.dictionaries(st.text(max_size=10), ANY_VALUE, max_size=3),
                DEEP,
            )
        )
    else:
        odd = st.one_of(NUMBER.map(str), st.text(max_size=40), st.sampled_from(["true", "1e309", "-1"]))
        options = draw(st.dictionaries(st.sampled_from(OPTION_NAMES), odd, max_size=3))
    text = ODD_TEXT if wild else SMALL_TEXT
    spec: dict[str, Any] = {
        "model": {
            "id": pick(st.sampled_from(["Qwen/Qwen2.5-0.5B-Instruct", "/opt/ml/model", "s3://bucket/m/x"]))
        },
        "engine": {"tensorParallelDegree": tp, "options": options},
        "resources": {"gpus": gpus},
        "replicas": pick(st.integers(min_value=0, max_value=2)),
    }
    if draw(st.booleans()):
        spec["engine"]["maxModelLen"] = draw(EXTREME_INT if wild else st.integers(1, 2**62))
    if draw(st.booleans()):
        spec["engine"]["speculativeConfig"] = draw(st.one_of(DEEP, st.dictionaries(ODD_TEXT, ANY_VALUE)))
    if draw(st.booleans()):
        names = st.from_regex(r"[A-Z_][A-Z0-9_]{0,10}", fullmatch=True)
        spec["env"] = draw(
            st.lists(
                st.fixed_dictionaries({"name": ODD_TEXT if wild else names, "value": text}),
                max_size=3,
                unique_by=lambda e: e["name"],
            )
        )
    if draw(st.booleans()):
        spec["image"] = draw(text)
    if draw(st.booleans()):
        spec["handler"] = {"modelPy": draw(text)}
    if draw(st.booleans()):
        spec["scheduling"] = {"nodeSelector": draw(st.dictionaries(text, text, max_size=2))}
    if draw(st.booleans()):
        spec["startup"] = {"timeoutSeconds": draw(EXTREME_INT if wild else st.integers(60, 86400))}
    if wild and draw(st.booleans()):
        spec[draw(ODD_TEXT)] = draw(ANY_VALUE)  # an unknown field
    return spec


class _Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def operator_errors() -> Iterator[_Errors]:
    handler = _Errors()
    loggers = [logging.getLogger(n) for n in ("lmi_operator", "kopf")]
    for lg in loggers:
        lg.addHandler(handler)
    try:
        yield handler
    finally:
        for lg in loggers:
            lg.removeHandler(handler)


def test_random_lmimodels_are_rejected_invalid_or_reconciled(
    cluster: LocalCluster, operator: OperatorThread, namespace: str, operator_errors: _Errors
) -> None:
    api = Api(cluster.kubeconfig)
    path = f"/apis/serving.lmi.dev/v1alpha1/namespaces/{namespace}/lmimodels"
    accepted: list[str] = []
    examples = 0

    @settings(
        max_examples=120,
        deadline=None,
        database=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.large_base_example,
        ],
    )
    @given(spec=lmimodels())
    def post(spec: dict[str, Any]) -> None:
        nonlocal examples
        examples += 1
        name = f"z{uuid.uuid4().hex[:10]}"
        doc = {"apiVersion": "serving.lmi.dev/v1alpha1", "kind": "LMIModel", "metadata": {"name": name}}
        size = len(json.dumps(doc | {"spec": spec}).encode())
        code, body = api.request("POST", path, doc | {"spec": spec}, timeout=60)
        if code == 0:
            # The API server cuts requests over its 3 MiB limit off without an answer.
            assert size > 3 * 2**20, (size, body)
            API_OUTCOMES["rejected by the API server (over 3 MiB, connection closed)"] += 1
            return
        if code == 201:
            accepted.append(name)
            return
        # Refused: a 4xx that names what is wrong (a spec field, or the request itself).
        assert 400 <= code < 500, (code, body)
        message = body.get("message", "") if isinstance(body, dict) else str(body)
        if code == 422:
            assert "spec" in message, message[:2000]
            API_OUTCOMES["rejected by the API server (422, names the field)"] += 1
        else:
            assert code in (400, 413), (code, size, message[:2000])
            API_OUTCOMES[f"rejected by the API server ({code})"] += 1

    post()
    outcomes: dict[str, str] = {}

    def all_have_status() -> bool:
        code, body = api.request("GET", path)
        assert code == 200
        for item in body["items"]:
            status = item.get("status") or {}
            if status.get("observedGeneration") != item["metadata"]["generation"]:
                continue
            ready = next(c for c in status["conditions"] if c["type"] == "Ready")
            outcomes[item["metadata"]["name"]] = ready["reason"]
            if ready["reason"] == "InvalidSpec":
                assert "spec." in ready["message"], ready["message"][:2000]
        return set(accepted) <= set(outcomes)

    try:
        eventually(all_have_status, timeout=120, interval=1, what="a status on every accepted model")
    except AssertionError:
        missing = sorted(set(accepted) - set(outcomes))
        specs = [api.request("GET", f"{path}/{n}")[1] for n in missing[:3]]
        logged = [f"{r.name}: {r.getMessage()[:1500]}" for r in operator_errors.records][-5:]
        raise AssertionError(f"no status on {missing}: {json.dumps(specs)[:4000]}; log: {logged}") from None
    for name in accepted:
        reason = outcomes[name]
        API_OUTCOMES["InvalidSpec" if reason == "InvalidSpec" else "reconciled"] += 1
    time.sleep(1)
    errors = [
        f"{r.name}: {r.getMessage()[:500]}"
        for r in operator_errors.records
        # kopf's own retried requests (a 429 while the CRD's storage starts) are handled, not errors.
        if (r.levelno >= logging.ERROR or r.exc_info) and "will retry" not in r.getMessage()
    ]
    print(f"API fuzz outcomes ({examples} examples): {dict(API_OUTCOMES)}")
    assert not errors, errors
    assert sum(API_OUTCOMES.values()) == examples
    assert API_OUTCOMES["reconciled"] and API_OUTCOMES["InvalidSpec"], dict(API_OUTCOMES)
    json.dumps(dict(API_OUTCOMES))
