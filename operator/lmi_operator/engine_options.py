"""Checks of spec.engine.options that CEL cannot make: is each key an engine or server argument of
the pinned vLLM (or an LMI option), and does its value parse as that argument's type?

The table, vllm_engine_args.json, is generated from the installed vLLM by `make engine-args`, so
the operator reports InvalidSpec before a pod spends minutes loading weights only to fail."""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Mapping
from functools import cache
from importlib import resources
from typing import Any

_INT = re.compile(r"^[+-]?[0-9]+[kKmMgG]?$")


@cache
def table() -> dict[str, Any]:
    """The engine-argument table of the pinned vLLM, shipped with the package."""
    text = resources.files("lmi_operator").joinpath("vllm_engine_args.json").read_text()
    loaded: dict[str, Any] = json.loads(text)
    return loaded


def _known() -> dict[str, str]:
    t = table()
    lmi = t["lmi_options"]
    known: dict[str, str] = {**t["server_args"], **t["engine_args"]}
    for lmi_name, vllm_name in lmi["renamed"].items():
        known[lmi_name] = known.get(vllm_name, "str")
    for name in [*lmi["lmi_only"], *lmi["removed_in_vllm"]]:
        known.setdefault(name, "str")
    return known


def _type_error(value: str, kind: str) -> str | None:
    if kind == "bool" and value.lower() not in ("true", "false"):
        return "must be true or false"
    if kind == "int" and not _INT.match(value):
        return "must be an integer"
    if kind == "float":
        try:
            float(value)
        except ValueError:
            return "must be a number"
    if kind == "json":
        try:
            json.loads(value)
        except json.JSONDecodeError as err:
            return f"must be JSON ({err.msg} at position {err.pos})"
    return None


def check_options(options: Mapping[str, str]) -> str | None:
    """None when every option is valid, else one message naming each bad key and what is allowed."""
    t = table()
    known = _known()
    owned = set(t["lmi_options"]["runtime_owned"])
    problems: list[str] = []
    for key, value in sorted(options.items()):
        where = f"spec.engine.options.{key}"
        if key in owned:
            problems.append(f"{where}: set by the runtime itself, not configurable")
        elif key not in known:
            close = difflib.get_close_matches(key, list(known), n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            problems.append(
                f"{where}: not an engine or server argument of vLLM {t['vllm_version']} nor an LMI "
                f"option{hint}"
            )
        elif error := _type_error(value, known[key]):
            problems.append(f"{where}: {value!r} {error}")
    return "; ".join(problems) or None
