"""`lmi-operator render FILE`: the manifests of the LMIModels in a YAML file, as YAML, offline."""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

from lmi_operator.api import KIND, InvalidLMIModel, parse_lmimodel
from lmi_operator.engine_options import check_options
from lmi_operator.render import render
from lmi_operator.settings import OperatorSettings


class _Dumper(yaml.SafeDumper):
    """Writes multi-line strings (serving.properties, model.py) as literal blocks."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


class RenderError(ValueError):
    """The file holds no LMIModel, or one that is invalid (the message names the document and field)."""


def render_yaml(path: str, namespace: str = "default", settings: OperatorSettings | None = None) -> str:
    """Every object the operator would apply for the LMIModels in `path`, as one YAML stream."""
    text = sys.stdin.read() if path == "-" else Path(path).read_text()
    settings = settings or OperatorSettings.from_env()
    out: list[str] = []
    models = 0
    for index, doc in enumerate(yaml.safe_load_all(text)):
        if not isinstance(doc, dict) or doc.get("kind") != KIND:
            continue
        models += 1
        doc.setdefault("metadata", {}).setdefault("namespace", namespace)
        name = doc["metadata"].get("name", f"document {index}")
        try:
            obj = parse_lmimodel(doc)
        except InvalidLMIModel as err:
            raise RenderError(f"{path}: LMIModel {name}: {err}") from None
        if problem := check_options(obj.spec.engine.options):
            raise RenderError(f"{path}: LMIModel {name}: {problem}")
        for manifest in render(obj, settings).objects:
            out.append(yaml.dump(manifest, Dumper=_Dumper, sort_keys=False, width=1000))
    if not models:
        raise RenderError(f"{path}: no {KIND} found")
    return "".join(f"---\n{doc}" for doc in out)
