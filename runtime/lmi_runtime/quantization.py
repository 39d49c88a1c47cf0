"""Quantization checks: methods of the installed vLLM and models that are already quantized."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from lmi_runtime.errors import RuntimeConfigError
from lmi_runtime.options import BITSANDBYTES_PLUGIN
from lmi_runtime.properties import Setting

logger = logging.getLogger(__name__)


def installed_methods() -> tuple[str, ...]:
    """Quantization methods the installed vLLM knows (plugins can add some)."""
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS

    return tuple(sorted(str(method) for method in QUANTIZATION_METHODS))


def check_method(setting: Setting, methods: tuple[str, ...]) -> str:
    """The method to pass to vLLM, or an error naming the allowed ones."""
    method = setting.value.strip().lower()
    if method in methods:
        return method
    if method == "bitsandbytes":
        raise RuntimeConfigError(
            f"{setting.describe()}: this vLLM has no built-in bitsandbytes quantization "
            f"(removed from vLLM); install the {BITSANDBYTES_PLUGIN} package in the image, "
            "or use a pre-quantized model or option.quantize=fp8"
        )
    raise RuntimeConfigError(
        f"{setting.describe()}: unknown quantization method; allowed: {', '.join(methods)}"
    )


def model_config_path(model: str, revision: str | None) -> Path | None:
    """config.json of a local model folder, or of a hub model already in the local cache."""
    local = Path(model)
    if local.is_dir():
        path = local / "config.json"
        return path if path.is_file() else None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    # Never downloads: a model that is not cached yet is checked by vLLM itself while loading.
    cached = try_to_load_from_cache(model, "config.json", revision=revision)
    return Path(cached) if isinstance(cached, str) else None


def declared_method(config_path: Path) -> str | None:
    """quantization_config.quant_method of a model's config.json, if it declares one."""
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise RuntimeConfigError(f"{config_path}: cannot read the model configuration: {error}") from error
    quant = config.get("quantization_config") if isinstance(config, dict) else None
    if isinstance(quant, dict) and isinstance(quant.get("quant_method"), str):
        return str(quant["quant_method"]).lower().replace("-", "_")
    return None


def reconcile(
    requested: str | None, setting: Setting | None, declared: str | None, source: Path | None
) -> str | None:
    """What to pass as vLLM's `quantization` given the option and the model's own declaration.

    A pre-quantized model needs no option: vLLM reads the method from config.json and can then pick
    a faster kernel (e.g. awq_marlin); forcing the same method would rule that out, so it is dropped.
    A kernel variant of the declared method (awq_marlin for awq) is an explicit choice and is kept.
    """
    if requested is None or declared is None or setting is None:
        return requested
    normalized = requested.replace("-", "_")
    if normalized == declared:
        logger.info(
            "%s: dropped: the model is already quantized with %s (%s), and without the option vLLM "
            "can choose its fastest kernel for it",
            setting.describe(),
            declared,
            source,
        )
        return None
    if normalized.startswith(declared + "_"):
        return requested
    raise RuntimeConfigError(
        f"{setting.describe()}: conflicts with the model's quantization_config "
        f"(quant_method={declared} in {source}); remove the option to serve the pre-quantized model"
    )
