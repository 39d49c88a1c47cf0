"""Read LMI configuration: serving.properties in the model directory plus the environment.

Precedence and conversions follow LMI: serving.properties wins over environment variables;
OPTION_<NAME> becomes option.<name>; HF_MODEL_ID and HF_REVISION fill model_id and revision; the
container-level aliases apply only when their target is unset; the tensor parallel degree comes from
serving.properties, then OPTION_TENSOR_PARALLEL_DEGREE, then TENSOR_PARALLEL_DEGREE.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from lmi_runtime.errors import RuntimeConfigError
from lmi_runtime.options import ENV_ALIASES

PROPERTIES_FILE = "serving.properties"
_UPPER_NAME = re.compile(r"[A-Z0-9_]+")


@dataclass(frozen=True)
class Setting:
    """One configured value and where it came from (the key exactly as the person wrote it)."""

    value: str
    label: str

    def describe(self) -> str:
        """`label=value`, the form every message uses to point at a setting."""
        return f"{self.label}={self.value}"


@dataclass(frozen=True)
class LmiSettings:
    """Raw LMI settings: option names (lower case, without "option.") and top-level keys."""

    model_dir: Path
    options: Mapping[str, Setting] = field(default_factory=dict)
    top_level: Mapping[str, Setting] = field(default_factory=dict)


def parse_properties(text: str, path: str = PROPERTIES_FILE) -> dict[str, str]:
    """Parse Java-style properties (key=value or key: value, # and ! comments, \\ continuations)."""
    result: dict[str, str] = {}
    logical: list[tuple[int, str]] = []
    pending = ""
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip() if not pending else raw.lstrip()
        if not pending:
            start = number
            if not line or line[0] in "#!":
                continue
        if line.endswith("\\") and not line.endswith("\\\\"):
            pending += line[:-1]
            continue
        logical.append((start, pending + line))
        pending = ""
    if pending:
        logical.append((start, pending))
    for number, line in logical:
        match = re.match(r"([^=:\s]+)\s*[=:]\s*(.*)$", line) or re.match(r"([^=:\s]+)\s+(.*)$", line)
        if match is None:
            raise RuntimeConfigError(f"{path} line {number}: expected key=value, got {line!r}")
        result[match.group(1)] = match.group(2).strip()
    return result


def _apply_env_aliases(environ: Mapping[str, str]) -> dict[str, str]:
    """The environment with LMI's container-level aliases filled in where the target is unset."""
    env = {key: value for key, value in environ.items() if value != ""}
    for source, (target, inverted) in ENV_ALIASES.items():
        if source in env and target not in env:
            value = env[source]
            if inverted:
                value = {"true": "false", "false": "true"}.get(value.strip().lower(), value)
            env[target] = value
    return env


def settings_from_environment(environ: Mapping[str, str]) -> dict[str, Setting]:
    """LMI options named by environment variables (OPTION_*, HF_MODEL_ID, ... and the aliases)."""
    env = _apply_env_aliases(environ)
    options: dict[str, Setting] = {}
    for key, value in env.items():
        if not key.startswith("OPTION_") or key == "OPTION_":
            continue
        name = key[len("OPTION_") :]
        # LMI lower-cases only all-upper names; matching is case-insensitive either way.
        name = name.lower() if _UPPER_NAME.fullmatch(name) else name
        label = key
        if not environ.get(key):
            label = next(src for src, (target, _) in ENV_ALIASES.items() if target == key)
        options[name.lower()] = Setting(value, label)
    if "HF_MODEL_ID" in env and "model_id" not in options:
        options["model_id"] = Setting(env["HF_MODEL_ID"], "HF_MODEL_ID")
    if "HF_REVISION" in env and "revision" not in options:
        options["revision"] = Setting(env["HF_REVISION"], "HF_REVISION")
    if "TENSOR_PARALLEL_DEGREE" in env and "tensor_parallel_degree" not in options:
        label = "TENSOR_PARALLEL_DEGREE" if environ.get("TENSOR_PARALLEL_DEGREE") else "SM_NUM_GPUS"
        options["tensor_parallel_degree"] = Setting(env["TENSOR_PARALLEL_DEGREE"], label)
    return options


def load_settings(model_dir: Path, environ: Mapping[str, str]) -> LmiSettings:
    """Merge the environment and `<model_dir>/serving.properties`; the file wins, as in LMI."""
    options = settings_from_environment(environ)
    top_level: dict[str, Setting] = {}
    if environ.get("OPTION_ENGINE"):
        top_level["engine"] = options.pop("engine")
    path = model_dir / PROPERTIES_FILE
    if path.is_file():
        for key, value in parse_properties(path.read_text(encoding="utf-8"), str(path)).items():
            if value == "":
                # An empty value means "not set", as an empty environment variable does.
                continue
            if key.startswith("option."):
                options[key[len("option.") :].lower()] = Setting(value, key)
            else:
                top_level[key.lower()] = Setting(value, key)
    return LmiSettings(model_dir=model_dir, options=options, top_level=top_level)
