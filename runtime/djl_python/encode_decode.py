"""LMI's request decoding helpers."""

from __future__ import annotations

from typing import Any

from djl_python.inputs import Input


def decode(inputs: Input, content_type: str | None, key: str | None = None) -> Any:
    """The request payload as LMI decodes it: JSON as is, text as {"inputs": [text]}."""
    if not content_type:
        return inputs.get_as_json(key) if inputs.get_as_bytes(key) else {"inputs": ""}
    if "application/json" in content_type:
        return inputs.get_as_json(key)
    if "text/plain" in content_type:
        return {"inputs": [inputs.get_as_string(key)]}
    if content_type == "application/x-www-form-urlencoded":
        return {"inputs": inputs.get_as_string(key)}
    return {"inputs": inputs.get_as_bytes(key)}
