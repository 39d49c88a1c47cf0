"""The declared adapters: {name: source} from $LMI_ADAPTERS_FILE (what the operator mounts) or else
$LMI_ADAPTERS. Read by `fetch` (to prefetch s3:// adapters) and by `serve` (to load them)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from lmi_runtime.errors import RuntimeConfigError
from lmi_runtime.options import ADAPTERS_ENV, ADAPTERS_FILE_ENV


def adapters_of(listed: object, origin: str) -> dict[str, str]:
    """`listed` checked to be an object of adapter name to source; `origin` names it in errors."""
    if not isinstance(listed, dict) or not all(
        isinstance(k, str) and k and isinstance(v, str) and v for k, v in listed.items()
    ):
        raise RuntimeConfigError(f"{origin}: expected a JSON object of adapter name to source")
    return dict(listed)


def parse_adapters(raw: str, origin: str) -> dict[str, str]:
    """A JSON object of adapter name to source; `origin` names where it came from in errors."""
    try:
        listed = json.loads(raw)
    except json.JSONDecodeError as err:
        raise RuntimeConfigError(f"{origin}: not JSON ({err.msg}); expected {{name: source}}") from None
    return adapters_of(listed, origin)


def declared_adapters(environ: Mapping[str, str]) -> tuple[dict[str, str], str]:
    """The declared adapters and where they were read from (for messages). A file that does not
    exist yet declares none: the operator's ConfigMap key is optional."""
    if path := environ.get(ADAPTERS_FILE_ENV):
        file = Path(path)
        text = file.read_text(encoding="utf-8") if file.is_file() else ""
        return (parse_adapters(text, path) if text.strip() else {}), path
    raw = environ.get(ADAPTERS_ENV)
    return (parse_adapters(raw, ADAPTERS_ENV) if raw else {}), ADAPTERS_ENV
