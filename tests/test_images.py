"""The container images' Dockerfiles agree with what runs them, and the operator image's install
steps, replayed in a fresh virtualenv (there is no Docker here), give a working, lean operator."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lmi_operator.render import RUNTIME_UID
from tests.dockerfiles import REPO_ROOT, RUNTIME_DOCKERFILES, exec_form, instructions

OPERATOR_DOCKERFILE = REPO_ROOT / "operator" / "Dockerfile"
CHART_DEPLOYMENT = REPO_ROOT / "charts" / "lmi-operator" / "templates" / "deployment.yaml"


def test_operator_image_user_and_command_are_the_charts() -> None:
    chart = CHART_DEPLOYMENT.read_text()
    uid = re.search(r"runAsUser: (\d+)", chart)
    gid = re.search(r"runAsGroup: (\d+)", chart)
    assert uid and gid
    assert instructions(OPERATOR_DOCKERFILE, "USER") == [f"{uid[1]}:{gid[1]}"]
    command = re.search(r"command: (\[.*\])", chart)
    assert command
    words = exec_form(OPERATOR_DOCKERFILE, "ENTRYPOINT") + exec_form(OPERATOR_DOCKERFILE, "CMD")
    assert words == json.loads(command[1]) == ["lmi-operator", "run"]


@pytest.mark.parametrize("dockerfile", RUNTIME_DOCKERFILES, ids=lambda path: path.name)
def test_runtime_image_user_is_the_rendered_pods(dockerfile: Path) -> None:
    assert instructions(dockerfile, "USER") == [f"{RUNTIME_UID}:{RUNTIME_UID}"]


@pytest.mark.timeout(600)
def test_operator_image_install_steps_give_a_lean_working_operator(tmp_path: Path) -> None:
    # The build stage's COPY lines, into a folder standing for the image's filesystem.
    root = tmp_path / "image"
    for copy in instructions(OPERATOR_DOCKERFILE, "COPY"):
        *sources, target = shlex.split(copy)
        for source in sources:
            destination = root / target.lstrip("/")
            if target.endswith("/"):
                destination = destination / Path(source).name
            if (REPO_ROOT / source).is_dir():
                shutil.copytree(REPO_ROOT / source, destination, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                destination.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(REPO_ROOT / source, destination)
    (install,) = [run for run in instructions(OPERATOR_DOCKERFILE, "RUN") if "pip install" in run]
    requirement = next(word for word in shlex.split(install) if word.startswith("/src["))
    assert requirement == "/src[operator]", install

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, str(root / requirement.lstrip("/"))], check=True)

    example = REPO_ROOT / "examples" / "llama-3-8b.yaml"
    operator = str(venv / "bin" / "lmi-operator")
    rendered = subprocess.run([operator, "render", str(example)], capture_output=True, text=True, check=True)
    assert "kind: Deployment" in rendered.stdout
    # The run path's imports (kopf, aiohttp, prometheus-client), and nothing of the model server.
    probe = (
        "import importlib.util, lmi_operator.main; "
        "print(sorted(m for m in ('vllm', 'torch', 'fastapi', 'uvicorn') if importlib.util.find_spec(m)))"
    )
    found = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, check=True)
    assert found.stdout.strip() == "[]", found.stdout
    # Without credentials it stops with one line, as in a pod without its ServiceAccount token.
    run = subprocess.run(
        [operator, "run"],
        capture_output=True,
        text=True,
        env={"PATH": str(venv / "bin"), "HOME": str(tmp_path), "KUBECONFIG": str(tmp_path / "none")},
        timeout=60,
    )
    assert run.returncode == 2 and run.stderr.startswith("error: cannot start:"), run.stderr
    assert "Traceback" not in run.stderr


def test_the_cpu_image_runs_like_the_gpu_image() -> None:
    # The real node's tests run the CPU image: what they prove holds for the GPU image only while
    # both start the same command, as the same user, in the same folder, on the same port.
    gpu, cpu = REPO_ROOT / "runtime" / "Dockerfile", REPO_ROOT / "runtime" / "Dockerfile.cpu"
    for keyword in ("ENTRYPOINT", "CMD"):
        assert exec_form(gpu, keyword) == exec_form(cpu, keyword), keyword
    for keyword in ("USER", "WORKDIR", "EXPOSE"):
        assert instructions(gpu, keyword)[-1] == instructions(cpu, keyword)[-1], keyword
