"""Dockerfile instructions, read as text (there is no Docker here to ask an image)."""

from __future__ import annotations

import json
import re
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
# Every runtime image (GPU, CPU, ...): each must honour the same contract with the rendered pods.
RUNTIME_DOCKERFILES = sorted((REPO_ROOT / "runtime").glob("Dockerfile*"))


def instructions(dockerfile: Path, keyword: str) -> list[str]:
    """The arguments of every `keyword` instruction (continuation lines joined)."""
    text = re.sub(r"\\\n\s*", " ", dockerfile.read_text())
    return [line.split(None, 1)[1] for line in text.splitlines() if line.split(None, 1)[:1] == [keyword]]


def exec_form(dockerfile: Path, keyword: str) -> list[str]:
    """The words of the image's ENTRYPOINT or CMD: the last such instruction, which must be in exec
    (JSON) form, since a shell form would run under /bin/sh -c; [] when there is none."""
    found = instructions(dockerfile, keyword)
    if not found:
        return []
    words = json.loads(found[-1])
    assert isinstance(words, list) and all(isinstance(w, str) for w in words), f"{dockerfile}: {keyword}"
    return words
