"""The product's images, built locally with no registry: the operator image (operator/Dockerfile),
the runtime's CPU image (runtime/Dockerfile.cpu) and the test images built on it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmi_operator.testing.images import Image, ImageBuilder
from lmi_operator.testing.node import node_selector, tolerations

REPO_ROOT = Path(__file__).resolve().parents[3]
CPU_DOCKERFILE = REPO_ROOT / "runtime" / "Dockerfile.cpu"
OPERATOR_DOCKERFILE = REPO_ROOT / "operator" / "Dockerfile"
# The name later Dockerfiles use in FROM; pods use the content-tagged Image.reference.
CPU_IMAGE_NAME = "lmi/lmi-runtime:cpu"
OPERATOR_IMAGE_NAME = "lmi/lmi-operator:dev"


def build_operator_image() -> Image:
    """Build (or find cached) the operator image from the checkout."""
    return ImageBuilder().build(OPERATOR_DOCKERFILE, REPO_ROOT, OPERATOR_IMAGE_NAME)


def build_runtime_cpu_image() -> Image:
    """Build (or find cached) the runtime CPU image from the checkout."""
    return ImageBuilder().build(CPU_DOCKERFILE, REPO_ROOT, CPU_IMAGE_NAME)


def build_model_image(context: Path, models: dict[str, str], name: str) -> Image:
    """The CPU runtime image plus model folders of `context` baked at the given paths
    (folder name in `context` -> absolute path in the image), for tests that serve a path model id."""
    base = build_runtime_cpu_image()
    # COPY keeps modes, and libraries write weights 0600: the image's user (1000) must read them.
    for folder in models:
        for path in (context / folder).rglob("*"):
            path.chmod(0o755 if path.is_dir() else 0o644)
    lines = [f"FROM {base.name}"]
    lines += [f"COPY {folder} {target}/" for folder, target in sorted(models.items())]
    dockerfile = context / "Dockerfile"
    dockerfile.write_text("\n".join(lines) + "\n")
    return ImageBuilder().build(dockerfile, context, name)


def cpu_model(name: str, image: str | None, model_id: str, **spec: Any) -> dict[str, Any]:
    """An LMIModel for the real node: no GPU, a model baked into `image` (None: the operator's
    runtime image), eager fp32 on the CPU (vLLM's bf16 CPU kernels crash on this machine's AMX),
    1 GiB of KV cache; `spec` adds or replaces top-level spec fields."""
    base: dict[str, Any] = {
        "model": {"id": model_id},
        "engine": {
            "tensorParallelDegree": 1,
            "maxModelLen": 256,
            "dtype": "fp32",
            "options": {"enforce_eager": "true"},
        },
        "resources": {"gpus": 0, "cpu": "1", "memory": "6Gi"},
        "env": [{"name": "VLLM_CPU_KVCACHE_SPACE", "value": "1"}],
        "scheduling": {"nodeSelector": node_selector(), "tolerations": tolerations()},
        "startup": {"timeoutSeconds": 900},
    }
    if image is not None:
        base["image"] = image
    return {
        "apiVersion": "serving.lmi.dev/v1alpha1",
        "kind": "LMIModel",
        "metadata": {"name": name},
        "spec": base | spec,
    }
