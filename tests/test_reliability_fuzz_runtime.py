"""Random runtime configuration (issue 8, item 5): serving.properties and environment variables
through the runtime's real resolve path (vLLM's own argument parser, no engine start) must give
engine-args JSON or a RuntimeConfigError, never another exception; `lmi-runtime args` must exit 0
with JSON or 2 with one `lmi-runtime: error:` line, never a traceback."""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmi_runtime.engine_args import load_schema, resolve
from lmi_runtime.errors import RuntimeConfigError
from lmi_runtime.options import ENV_ALIASES, RENAMED
from lmi_runtime.properties import load_settings

REPO_ROOT = Path(__file__).resolve().parents[1]
# Outcome counts of the last run, printed at the end (for docs/reliability.md).
RUNTIME_OUTCOMES: collections.Counter[str] = collections.Counter()

OPTION_NAMES = sorted(
    {
        *RENAMED,
        *RENAMED.values(),
        "enforce_eager",
        "max_model_len",
        "dtype",
        "gpu_memory_utilization",
        "trust_remote_code",
        "revision",
        "enable_lora",
        "max_loras",
        "max_lora_rank",
        "rolling_batch",
        "async_mode",
        "entrypoint",
        "task",
        "engine",
        "enable_prefix_caching",
        "speculative_config",
        "served_model_name",
        "load_format",
        "seed",
        "swap_space",
        "block_size",
        "kv_cache_dtype",
        "max_num_seqs",
        "model_loading_timeout",
        "output_formatter",
        "lora_extra_vocab_size",
        "limit_mm_per_prompt",
        "hf_overrides",
        "tokenizer",
    }
)
TOP_LEVEL = ["engine", "job_queue_size", "batch_size", "max_batch_delay", "gpu.minWorkers", "load_on_devices"]
ENV_NAMES = [
    *ENV_ALIASES,
    "HF_MODEL_ID",
    "HF_REVISION",
    "TENSOR_PARALLEL_DEGREE",
    "OPTION_ENGINE",
    "CUDA_VISIBLE_DEVICES",
    *(f"OPTION_{n.upper()}" for n in OPTION_NAMES),
]

# Values: plausible ones, extreme numbers, unicode, JSON (deep too) and huge strings.
NUMBERS = st.sampled_from(
    ["0", "-1", "1", "2", "max", "1e309", "nan", "inf", "-0", "0x10", "99999999999999999999999", "1.5", "½"]
)
WORDS = st.sampled_from(
    [
        "true",
        "false",
        "TRUE",
        "auto",
        "fp16",
        "bf16",
        "fp8",
        "awq",
        "vllm",
        "disable",
        "Python",
        "MPI",
        "",
        " ",
    ]
)


def _deep(depth: int) -> str:
    return "[" * depth + "]" * depth


VALUES = st.one_of(
    NUMBERS,
    WORDS,
    st.text(max_size=40),
    st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=20),
    st.integers(min_value=-(2**80), max_value=2**80).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(min_value=1, max_value=3000).map(_deep),
    st.just(json.dumps({"a": {"b": {"c": [1, 2, {"d": "é"}]}}})),
    st.just('{"method": "ngram", "num_speculative_tokens": 99999999999}'),
    st.integers(min_value=10_000, max_value=300_000).map(lambda n: "x" * n),
    st.just("/no/such/model"),
    st.just("s3://bucket/model"),
)
JSON_VALUES = st.one_of(
    st.integers(min_value=1, max_value=5000).map(_deep),
    st.integers(min_value=1, max_value=5000).map(lambda n: '{"a":' * n + "1" + "}" * n),
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
        lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=5), kids, max_size=3),
        max_leaves=20,
    ).map(json.dumps),
    st.just('{"unterminated": ['),
)
OPTION_KEY = st.one_of(st.sampled_from(OPTION_NAMES), st.text(min_size=1, max_size=30))
PROPERTY_LINE = st.one_of(
    st.tuples(OPTION_KEY, VALUES).map(lambda kv: f"option.{kv[0]}={kv[1]}"),
    st.tuples(st.sampled_from(TOP_LEVEL), VALUES).map(lambda kv: f"{kv[0]}={kv[1]}"),
    st.tuples(st.text(max_size=20), VALUES).map(lambda kv: f"{kv[0]}:{kv[1]}"),
    st.text(max_size=60),  # garbage, comments, lone continuations
    st.just("option.model_id=\\"),
)
ENVIRONMENT = st.dictionaries(
    st.one_of(st.sampled_from(ENV_NAMES), st.from_regex(r"OPTION_[A-Za-z0-9_]{0,20}", fullmatch=True)),
    VALUES.map(lambda v: v.replace("\0", "")),
    max_size=6,
)


def _write(folder: Path, lines: list[str], with_config: bool) -> None:
    if with_config:
        (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    # surrogates cannot be written as UTF-8: a file on disk never holds them
    text = "\n".join(lines).encode("utf-8", "replace").decode("utf-8")
    (folder / "serving.properties").write_text(text, encoding="utf-8")


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    lines=st.lists(PROPERTY_LINE, max_size=8),
    environ=ENVIRONMENT,
    with_config=st.booleans(),
    gpus=st.integers(min_value=0, max_value=16),
    data=st.data(),
)
def test_random_runtime_configuration_resolves_or_fails_clearly(
    lines: list[str], environ: dict[str, str], with_config: bool, gpus: int, data: st.DataObject
) -> None:
    schema = load_schema()
    # The installed vLLM's JSON- and list-valued arguments, with JSON that is deep, huge or broken.
    structured = sorted(d for d, spec in schema.args.items() if spec.simple_type in ("json", "list"))
    lines = lines + data.draw(
        st.lists(
            st.tuples(st.sampled_from(structured), st.one_of(VALUES, JSON_VALUES)).map(
                lambda kv: f"option.{kv[0]}={kv[1]}"
            ),
            max_size=2,
        )
    )
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        _write(folder, lines, with_config)
        try:
            config = resolve(load_settings(folder, environ), environ, schema, device_count=lambda: gpus)
        except RuntimeConfigError as err:
            message = str(err)
            assert message.strip(), "a RuntimeConfigError without a message"
            RUNTIME_OUTCOMES["RuntimeConfigError"] += 1
            return
        # Anything else raised here is a bug: hypothesis reports it with its shrunk input.
        json.loads(json.dumps(config.engine_args))
        assert config.engine_args.get("model"), "resolved without a model"
        RUNTIME_OUTCOMES["engine-args"] += 1


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_json_options_resolve_or_fail_clearly(data: st.DataObject) -> None:
    # Only JSON- and list-valued options, everything else valid: the values reach vLLM's parser.
    schema = load_schema()
    structured = sorted(d for d, spec in schema.args.items() if spec.simple_type in ("json", "list"))
    names = data.draw(st.lists(st.sampled_from(structured), min_size=1, max_size=2, unique=True))
    lines = [f"option.{name}={data.draw(JSON_VALUES)}" for name in names]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        _write(folder, lines, with_config=True)
        try:
            config = resolve(load_settings(folder, {}), {}, schema, device_count=lambda: 0)
        except RuntimeConfigError as err:
            assert str(err).strip()
            RUNTIME_OUTCOMES["RuntimeConfigError"] += 1
            return
        json.loads(json.dumps(config.engine_args))
        RUNTIME_OUTCOMES["engine-args"] += 1


def test_runtime_outcome_counts_are_reported() -> None:
    # Runs after the property test in file order; prints the counts for the docs.
    total = sum(RUNTIME_OUTCOMES.values())
    print(f"runtime fuzz outcomes: {dict(RUNTIME_OUTCOMES)} (total {total})")
    if total:
        assert RUNTIME_OUTCOMES["engine-args"] and RUNTIME_OUTCOMES["RuntimeConfigError"]


# Hand-picked nasty inputs through the real CLI process: (serving.properties, environment).
CLI_CASES: list[tuple[str, dict[str, str]]] = [
    ("option.tensor_parallel_degree=99999999999999999999999\noption.max_model_len=1e309\n", {}),
    ("option.speculative_config=" + _deep(2000) + "\n", {}),
    ("option.dtype=ünï€ødé\noption." + "k" * 5000 + "=1\n", {"SM_NUM_GPUS": "½"}),
]


def test_cli_args_never_prints_a_traceback(tmp_path: Path) -> None:
    # A process per case, as a pod runs it: vLLM's import costs seconds each, so the cases are few.
    seen = collections.Counter[str]()
    for i, (text, extra_env) in enumerate(CLI_CASES):
        folder = tmp_path / f"case{i}"
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
        (folder / "serving.properties").write_text(text, encoding="utf-8")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OPTION_", "HF_", "SM_"))}
        env |= extra_env | {"CUDA_VISIBLE_DEVICES": ""}
        proc = subprocess.run(
            [sys.executable, "-m", "lmi_runtime.cli", "args", "--model-dir", str(folder)],
            capture_output=True,
            text=True,
            env=env,
            timeout=180,
            cwd=REPO_ROOT,
        )
        assert "Traceback" not in proc.stderr, f"case {i}: {proc.stderr[-3000:]}"
        if proc.returncode == 0:
            json.loads(proc.stdout)
            seen["engine-args"] += 1
        else:
            assert proc.returncode == 2, f"case {i}: exit {proc.returncode}: {proc.stderr[-2000:]}"
            errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("lmi-runtime: error: ")]
            assert len(errors) == 1, f"case {i}: {proc.stderr[-2000:]}"
            seen["error"] += 1
    print(f"cli outcomes: {dict(seen)}")
