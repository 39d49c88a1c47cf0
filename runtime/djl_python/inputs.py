"""LMI's Input: the request as a custom handler sees it."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any


class Input:
    """One request: properties (model configuration and request headers) and named content."""

    def __init__(self, properties: Mapping[str, str] | None = None, body: bytes | None = None) -> None:
        self.properties: dict[str, str] = dict(properties or {})
        self.content: dict[str, bytes] = {} if body is None else {"data": body}

    def get_batches(self) -> list[Input]:
        """The requests of this call; the runtime gives a handler one request at a time."""
        return [self]

    def get_properties(self) -> dict[str, str]:
        """Model configuration (LMI option names such as model_id) and the request headers."""
        return self.properties

    def get_property(self, key: str) -> str | None:
        """One property, matched case-insensitively as HTTP headers are."""
        lowered = key.lower()
        return next((value for name, value in self.properties.items() if name.lower() == lowered), None)

    def contains_key(self, key: str) -> bool:
        """Whether the content has an item named `key`."""
        return key in self.content

    def is_empty(self) -> bool:
        """Whether the request carries no content."""
        return not self.content

    def get_as_bytes(self, key: str | None = None) -> bytes:
        """The content item `key`, or the request body."""
        if key is not None:
            if key not in self.content:
                raise KeyError(f"requested data for key:{key} is not found!")
            return self.content[key]
        return self.content.get("data", next(iter(self.content.values()), b""))

    def get_as_string(self, key: str | None = None) -> str:
        """The content decoded as UTF-8."""
        return self.get_as_bytes(key).decode("utf-8")

    def get_as_json(self, key: str | None = None) -> Any:
        """The content parsed as JSON."""
        return json.loads(self.get_as_string(key))

    def get_data(self, key: str | None = None) -> Any:
        """The content decoded by its Content-Type (JSON, text or raw bytes)."""
        content_type = self.get_property("Content-Type") or ""
        if content_type.startswith("application/json"):
            return self.get_as_json(key)
        if content_type.startswith("text/"):
            return self.get_as_string(key)
        return self.get_as_bytes(key) if self.content else None
