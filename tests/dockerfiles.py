"""Dockerfile instructions, read with the local image builder's parser (there is no Docker here to
ask an image; the same parser runs runtime/Dockerfile.cpu for the real node)."""

from __future__ import annotations

from pathlib import Path

from lmi_operator.testing.images import parse_dockerfile

REPO_ROOT = Path(__file__).resolve().parents[1]
# Every runtime image (GPU, CPU, ...): each must honour the same contract with the rendered pods.
RUNTIME_DOCKERFILES = sorted((REPO_ROOT / "runtime").glob("Dockerfile*"))


def instructions(dockerfile: Path, keyword: str) -> list[str]:
    """The arguments of every `keyword` instruction (continuation lines joined)."""
    return [ins.argument for ins in parse_dockerfile(dockerfile.read_text()) if ins.keyword == keyword]


def exec_form(dockerfile: Path, keyword: str) -> list[str]:
    """The words of the image's ENTRYPOINT or CMD: the last such instruction, which must be in exec
    (JSON) form, since a shell form would run under /bin/sh -c; [] when there is none."""
    found = [ins for ins in parse_dockerfile(dockerfile.read_text()) if ins.keyword == keyword]
    return found[-1].exec_form() if found else []
