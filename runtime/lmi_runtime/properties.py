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
from lmi_runtime.options import (
    ENV_ALIASES,
    MODEL_ID_ENV,
    OPTION_ENV_PREFIX,
    PROPERTIES_FILE,
    REVISION_ENV,
    TENSOR_PARALLEL_DEGREE_ENV,
)

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


def _alias_of(target: str) -> str:
    """The alias a variable was filled from (messages name what the person actually set)."""
    return next(source for source, (aliased, _) in ENV_ALIASES.items() if aliased == target)


def settings_from_environment(environ: Mapping[str, str]) -> dict[str, Setting]:
    """LMI options named by environment variables (OPTION_*, HF_MODEL_ID, ... and the aliases)."""
    env = _apply_env_aliases(environ)
    options: dict[str, Setting] = {}
    for key, value in env.items():
        if not key.startswith(OPTION_ENV_PREFIX) or key == OPTION_ENV_PREFIX:
            continue
        name = key[len(OPTION_ENV_PREFIX) :]
        # LMI lower-cases only all-upper names; matching is case-insensitive either way.
        name = name.lower() if _UPPER_NAME.fullmatch(name) else name
        options[name.lower()] = Setting(value, key if environ.get(key) else _alias_of(key))
    if MODEL_ID_ENV in env and "model_id" not in options:
        options["model_id"] = Setting(env[MODEL_ID_ENV], MODEL_ID_ENV)
    if REVISION_ENV in env and "revision" not in options:
        options["revision"] = Setting(env[REVISION_ENV], REVISION_ENV)
    if TENSOR_PARALLEL_DEGREE_ENV in env and "tensor_parallel_degree" not in options:
        target = TENSOR_PARALLEL_DEGREE_ENV
        label = target if environ.get(target) else _alias_of(target)
        options["tensor_parallel_degree"] = Setting(env[target], label)
    return options


def load_settings(model_dir: Path, environ: Mapping[str, str]) -> LmiSettings:
    """Merge the environment and `<model_dir>/serving.properties`; the file wins, as in LMI."""
    options = settings_from_environment(environ)
    top_level: dict[str, Setting] = {}
    if environ.get(OPTION_ENV_PREFIX + "ENGINE"):
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
