"""LMI's Output: what a custom handler answers."""

from __future__ import annotations

import json
from typing import Any


class Envelope(bytes):
    """A serialized response chunk (data, last, error, code) as LMI's async engine passes it."""

    fields: dict[str, Any]

    def __new__(cls, fields: dict[str, Any]) -> Envelope:
        """Keep the fields readable; the bytes are their JSON for code that prints them."""
        instance = super().__new__(cls, json.dumps(fields, ensure_ascii=False).encode("utf-8"))
        instance.fields = fields
        return instance


class Output:
    """A response: status code, message, properties (headers such as Content-Type) and content."""

    def __init__(self, code: int = 200, message: str = "OK") -> None:
        self.code = code
        self.message = message
        self.properties: dict[str, str] = {}
        self.content: list[tuple[str | None, bytes]] = []

    def set_code(self, code: int) -> Output:
        """Set the HTTP status code."""
        self.code = code
        return self

    def set_message(self, message: str) -> Output:
        """Set the status message."""
        self.message = message
        return self

    def error(self, error: str, code: int = 424, message: str = "prediction failure") -> Output:
        """Turn this output into an LMI error body with `code`."""
        self.code = code
        self.message = message
        self.add_property("Content-Type", "application/json")
        return self.add_as_json({"code": code, "message": message, "error": error})

    def add_property(self, key: str, val: str) -> Output:
        """Add a property (sent as a response header)."""
        self.properties[key] = val
        return self

    def add(self, value: Any, key: str | None = None) -> Output:
        """Add content: str and bytes as they are, anything else as JSON."""
        if isinstance(value, Envelope):
            self.content.append((key, value))
        elif isinstance(value, str):
            self.content.append((key, value.encode("utf-8")))
        elif isinstance(value, (bytes, bytearray)):
            self.content.append((key, bytes(value)))
        else:
            self.add_as_json(value, key=key)
        return self

    def add_as_json(self, val: Any, key: str | None = None) -> Output:
        """Add content serialized as JSON."""
        self.content.append((key, json.dumps(val, ensure_ascii=False).encode("utf-8")))
        return self

    @staticmethod
    def binary_encode(fields: dict[str, Any]) -> Envelope:
        """Serialize a response chunk for `add`, as LMI's async engine does."""
        return Envelope(fields)
