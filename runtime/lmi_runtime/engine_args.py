"""LMI settings -> the vLLM serve Namespace and AsyncEngineArgs fields, for the INSTALLED vLLM.

vLLM's own argument parser is the schema: each LMI string value becomes argv for the parser action
of its field (booleans as --x / --no-x, lists as several values, JSON for config objects), so vLLM
converts and validates it exactly as `vllm serve` would, and options removed from vLLM are caught.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import enum
import functools
import io
import json
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmi_runtime import options as lmi
from lmi_runtime.devices import dev_nvidia_count, max_tensor_parallel, visible_gpu_count
from lmi_runtime.errors import RuntimeConfigError
from lmi_runtime.lmi_schema import ResponseFormat
from lmi_runtime.multi_node import Group, group_of
from lmi_runtime.properties import LmiSettings, Setting
from lmi_runtime.quantization import (
    check_method,
    declared_method,
    installed_methods,
    model_config_path,
    reconcile,
)
from lmi_runtime.vllm_compat import vllm_attr, vllm_version

logger = logging.getLogger(__name__)

_TRUE = frozenset({"true", "1", "yes", "on", "t", "y"})
_FALSE = frozenset({"false", "0", "no", "off", "f", "n"})

ASYNC_MODE = "async"
ROLLING_BATCH_MODE = "rolling_batch"


@dataclass(frozen=True)
class ArgSpec:
    """How one vLLM serve argument is written on a command line."""

    dest: str
    flag: str
    kind: str  # "bool" (--x/--no-x), "flag" (--x only), "list" (several values) or "value"
    simple_type: str  # bool, int, float, str, list or json: the table's type for the operator
    choices: tuple[str, ...] = ()


@dataclass(frozen=True)
class VllmSchema:
    """The installed vLLM's serve arguments, read from its own parser and AsyncEngineArgs."""

    version: str
    engine_fields: Mapping[str, str]  # public AsyncEngineArgs field -> simple type
    args: Mapping[str, ArgSpec]  # every serve parser destination (engine and frontend)
    quantization_methods: tuple[str, ...]
    parser_factory: Callable[[], argparse.ArgumentParser] = field(compare=False)


def _simple_type_of_annotation(annotation: str) -> str:
    head = annotation.replace(" ", "").split("|")
    if head[0] == "bool":
        return "bool"
    for name in ("int", "float"):
        if name in head:
            return name
    if any(part.startswith(("dict", "list", "tuple", "set")) or "Config" in part for part in head):
        return "json"
    return "str"


def _arg_spec(action: argparse.Action, annotation: str | None) -> ArgSpec:
    long_flags = [flag for flag in action.option_strings if flag.startswith("--")]
    flag = long_flags[0]
    if isinstance(action, argparse.BooleanOptionalAction):
        return ArgSpec(action.dest, flag, "bool", "bool")
    if action.nargs == 0:
        return ArgSpec(action.dest, flag, "flag", "bool")
    choices = tuple(str(choice) for choice in action.choices or ())
    if action.nargs in ("+", "*") or isinstance(action.nargs, int):
        return ArgSpec(action.dest, flag, "list", "list", choices)
    if action.type in (int, float, str, bool):
        simple = action.type.__name__
    elif annotation is not None:
        simple = _simple_type_of_annotation(annotation)
    else:
        simple = "str"
    return ArgSpec(action.dest, flag, "value", simple, choices)


def _make_parser() -> argparse.ArgumentParser:
    parser_class = vllm_attr("FlexibleArgumentParser")
    make_arg_parser = vllm_attr("make_arg_parser")
    # exit_on_error=False turns bad values into ArgumentError, which names the argument.
    parser: argparse.ArgumentParser = make_arg_parser(parser_class(prog="lmi-runtime", exit_on_error=False))
    return parser


@functools.cache
def load_schema() -> VllmSchema:
    """Read the installed vLLM's AsyncEngineArgs fields and serve parser (cached per process)."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    annotations = {
        f.name: str(f.type) for f in dataclasses.fields(AsyncEngineArgs) if not f.name.startswith("_")
    }
    parser = _make_parser()
    args = {
        action.dest: _arg_spec(action, annotations.get(action.dest))
        for action in parser._actions
        if any(flag.startswith("--") for flag in action.option_strings) and action.dest != "help"
    }
    engine_fields = {
        name: args[name].simple_type if name in args else _simple_type_of_annotation(annotation)
        for name, annotation in annotations.items()
    }
    return VllmSchema(
        version=vllm_version(),
        engine_fields=engine_fields,
        args=args,
        quantization_methods=installed_methods(),
        parser_factory=_make_parser,
    )


@dataclass(frozen=True)
class ResolvedConfig:
    """Everything `serve` needs, computed before any weight is loaded."""

    model_dir: Path
    mode: str
    namespace: argparse.Namespace
    engine_args: dict[str, Any]  # AsyncEngineArgs fields the runtime set, JSON-ready
    served_model_names: list[str]
    enable_lora: bool
    properties: dict[str, str]  # LMI-named configuration, as a custom handler's Input sees it
    response_format: ResponseFormat = field(default_factory=ResponseFormat)
    # A worker of a group of several pods (multi_node): it runs headless, joining the leader's engine.
    headless: bool = False


def parse_bool(setting: Setting) -> bool:
    """LMI's boolean spellings; anything else is an error naming the setting."""
    lowered = setting.value.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise RuntimeConfigError(f"{setting.describe()}: expected true or false")


def parse_positive_int(setting: Setting) -> int:
    """A whole number >= 1, or an error naming the setting."""
    try:
        number = int(setting.value.strip())
    except ValueError:
        number = 0
    if number < 1:
        raise RuntimeConfigError(f"{setting.describe()}: expected a whole number >= 1")
    return number


def _one_of(setting: Setting, allowed: tuple[str, ...], what: str) -> str:
    value = setting.value.strip()
    matches = [choice for choice in allowed if choice.lower() == value.lower()]
    if not matches:
        raise RuntimeConfigError(f"{setting.describe()}: {what}; allowed: {', '.join(allowed)}")
    return matches[0]


def _suggest(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    return f"; did you mean {', '.join(close)}?" if close else ""


def _serving_mode(settings: LmiSettings) -> str:
    for key, setting in settings.top_level.items():
        if key not in lmi.TOP_LEVEL_KEYS:
            raise RuntimeConfigError(
                f"{setting.describe()}: unknown serving.properties key"
                + _suggest(key, sorted(lmi.TOP_LEVEL_KEYS) + ["option." + name for name in lmi.RENAMED])
            )
        if key != "engine":
            logger.info("%s: ignored (a DJL Serving model-server setting)", setting.describe())
    if "engine" in settings.top_level:
        _one_of(settings.top_level["engine"], lmi.ENGINE_VALUES, "this runtime serves with vLLM")
    opts = settings.options
    rolling = (
        _one_of(opts["rolling_batch"], lmi.ROLLING_BATCH_VALUES, "unsupported rolling batch")
        if ("rolling_batch" in opts)
        else "auto"
    )
    async_mode = parse_bool(opts["async_mode"]) if "async_mode" in opts else False
    if "entrypoint" in opts:
        _one_of(opts["entrypoint"], lmi.ENTRYPOINT_VALUES, "unsupported entry point")
    if "task" in opts:
        _one_of(opts["task"], lmi.TASK_VALUES, "this runtime serves text generation")
    if async_mode and rolling != "disable":
        raise RuntimeConfigError(
            f"{opts['async_mode'].describe()} needs option.rolling_batch=disable "
            f"(got rolling_batch={rolling})"
        )
    if not async_mode and rolling == "disable":
        logger.warning(
            "option.rolling_batch=disable without option.async_mode=true: serving with the vLLM async "
            "engine anyway"
        )
    return ASYNC_MODE if async_mode else ROLLING_BATCH_MODE


def _collect(settings: LmiSettings, schema: VllmSchema) -> dict[str, Setting]:
    """Map every option to the vLLM argument it sets; reject unknown keys and conflicting twins."""
    wanted: dict[str, Setting] = {}
    known = sorted({*lmi.lmi_option_names(), *schema.args, *schema.engine_fields} - set(lmi.RUNTIME_OWNED))
    for key, setting in sorted(settings.options.items()):
        if key in lmi.MODE_KEYS or key in lmi.RESPONSE_KEYS:
            continue
        if key in lmi.IGNORED_LMI_KEYS:
            logger.info("%s: ignored by this runtime (%s)", setting.describe(), lmi.IGNORED_LMI_KEYS[key])
            continue
        if key in lmi.UNSUPPORTED_LMI_KEYS:
            logger.warning(
                "%s: not supported, ignored: %s", setting.describe(), lmi.UNSUPPORTED_LMI_KEYS[key]
            )
            continue
        if key in lmi.RUNTIME_OWNED:
            raise RuntimeConfigError(f"{setting.describe()}: set by the runtime ({lmi.RUNTIME_OWNED[key]})")
        if key in lmi.RENAMED:
            target = lmi.RENAMED[key]
        elif key in schema.args or key in schema.engine_fields:
            target = key
        elif key in lmi.REMOVED_IN_VLLM:
            logger.warning(
                "%s: accepted but ignored: vLLM %s has no %s (%s)",
                setting.describe(),
                schema.version,
                key,
                lmi.REMOVED_IN_VLLM[key],
            )
            continue
        else:
            raise RuntimeConfigError(
                f"{setting.describe()}: unknown option (not an LMI option nor an engine argument of "
                f"vLLM {schema.version})" + _suggest(key, known)
            )
        previous = wanted.get(target)
        if previous is not None and previous.value.strip() != setting.value.strip():
            raise RuntimeConfigError(
                f"{previous.describe()} and {setting.describe()} set the same engine argument "
                f"({target}) differently; keep one of them"
            )
        wanted[target] = setting
    return wanted


def _response_format(settings: LmiSettings) -> ResponseFormat:
    """option.output_formatter and option.tgi_compat: how the LMI routes frame their answers."""
    opts = settings.options
    tgi_compat = parse_bool(opts[lmi.TGI_COMPAT]) if lmi.TGI_COMPAT in opts else False
    stream = "sse" if tgi_compat else "jsonlines"
    if lmi.OUTPUT_FORMATTER in opts:
        chosen = _one_of(
            opts[lmi.OUTPUT_FORMATTER],
            lmi.OUTPUT_FORMATTER_VALUES,
            "not one of LMI's built-in output formatters (a custom one is a custom handler, model.py)",
        )
        # "json" names the framing of an answer that does not stream; streams keep their default.
        stream = chosen if chosen != "json" else stream
    return ResponseFormat(stream=stream, tgi_compat=tgi_compat)


def _model(wanted: dict[str, Setting], model_dir: Path) -> Setting:
    if "model" in wanted:
        setting = wanted["model"]
        value = setting.value.strip()
        if value.startswith("s3://"):
            load_format = wanted.get("load_format")
            if load_format is None or "runai" not in load_format.value:
                raise RuntimeConfigError(
                    f"{setting.describe()}: not fetched into the cache ($LMI_CACHE_DIR) yet: "
                    "`lmi-runtime fetch` downloads it (the operator's init container runs it; `serve` "
                    "does too), or set option.load_format=runai_streamer to stream it"
                )
        elif value.startswith("/") and not Path(value).exists():
            raise RuntimeConfigError(f"{setting.describe()}: no such file or folder")
        return Setting(value, setting.label)
    if (model_dir / "config.json").is_file():
        return Setting(str(model_dir), "model directory")
    raise RuntimeConfigError(
        f"no model: set option.model_id (or HF_MODEL_ID), or put the model files (config.json) in {model_dir}"
    )


def _tensor_parallel(
    wanted: dict[str, Setting], environ: Mapping[str, str], count: Callable[[], int], group: Group | None
) -> Setting:
    setting = wanted.get("tensor_parallel_size", Setting(lmi.DEFAULT_TENSOR_PARALLEL_DEGREE, "LMI default"))
    if setting.value.strip().lower() != lmi.TENSOR_PARALLEL_MAX:
        parse_positive_int(setting)
        return setting
    pipeline = (
        parse_positive_int(wanted["pipeline_parallel_size"]) if "pipeline_parallel_size" in wanted else 1
    )
    # max: the GPUs of the whole group, each pod seeing its own.
    nodes = group.size if group is not None else 1
    degree = max_tensor_parallel(visible_gpu_count(environ, count) * nodes, pipeline)
    logger.info("%s: resolved to %d", setting.describe(), degree)
    return Setting(str(degree), setting.label)


def _argv_for(spec: ArgSpec, setting: Setting) -> list[str]:
    if spec.kind == "bool":
        return [spec.flag if parse_bool(setting) else "--no-" + spec.flag[2:]]
    if spec.kind == "flag":
        return [spec.flag] if parse_bool(setting) else []
    if spec.kind == "list":
        text = setting.value.strip()
        items: list[Any]
        if text.startswith("["):
            try:
                items = json.loads(text)
            except ValueError as error:
                raise RuntimeConfigError(f"{setting.describe()}: not a JSON list: {error}") from error
        else:
            items = [item for item in re.split(r"[,\s]+", text) if item]
        return [spec.flag, *(item if isinstance(item, str) else json.dumps(item) for item in items)]
    return [f"{spec.flag}={setting.value.strip()}"]


def _convert_plain(setting: Setting, simple_type: str) -> Any:
    """Values of AsyncEngineArgs fields that have no command-line flag, by their declared type."""
    text = setting.value.strip()
    try:
        if simple_type == "bool":
            return parse_bool(setting)
        if simple_type == "int":
            return int(text)
        if simple_type == "float":
            return float(text)
        if simple_type in ("json", "list"):
            return json.loads(text)
    except ValueError as error:
        raise RuntimeConfigError(f"{setting.describe()}: expected a {simple_type} value ({error})") from error
    return text


def _parse(schema: VllmSchema, argv: list[str], owners: dict[str, Setting]) -> argparse.Namespace:
    """Let vLLM's parser convert and validate argv; errors name the LMI setting that caused them."""
    parser = schema.parser_factory()
    flags = {spec.flag: spec.dest for spec in schema.args.values()}
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            namespace: argparse.Namespace = parser.parse_args(argv)
    except argparse.ArgumentError as error:
        dest = flags.get((error.argument_name or "").split("/")[0], "")
        setting = owners.get(dest)
        where = setting.describe() if setting else f"vLLM argument {error.argument_name}"
        raise RuntimeConfigError(f"{where}: {error.message}") from error
    except SystemExit as error:
        lines = [line for line in captured.getvalue().splitlines() if "error:" in line]
        raise RuntimeConfigError(f"vLLM rejected the arguments: {' '.join(lines) or error}") from error
    except (ValueError, TypeError) as error:
        raise RuntimeConfigError(f"vLLM rejected the arguments {' '.join(argv)}: {error}") from error
    return namespace


def _jsonable(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return _jsonable(value.value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "model_dump"):
        return _jsonable(value.model_dump(mode="json"))
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _jsonable({f.name: getattr(value, f.name) for f in dataclasses.fields(value)})
    return str(value)


# JSON values nested deeper than this are refused up front: json.loads and vLLM's parsers recurse,
# and a deeper value would end in a RecursionError (a traceback) instead of a one-line error.
MAX_JSON_DEPTH = 64


def _json_depth(text: str) -> int:
    """How deeply brackets nest in `text`, outside JSON strings."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def resolve(
    settings: LmiSettings,
    environ: Mapping[str, str],
    schema: VllmSchema | None = None,
    device_count: Callable[[], int] = dev_nvidia_count,
) -> ResolvedConfig:
    """Turn LMI settings into vLLM's serve Namespace, failing with one clear line on bad input."""
    schema = schema or load_schema()
    for setting in settings.options.values():
        if _json_depth(setting.value) > MAX_JSON_DEPTH:
            raise RuntimeConfigError(
                f"{setting.label}: JSON nested deeper than {MAX_JSON_DEPTH} levels "
                f"({len(setting.value)} characters)"
            )
    mode = _serving_mode(settings)
    wanted = _collect(settings, schema)
    model = _model(wanted, settings.model_dir)
    wanted["model"] = model
    group = group_of(environ)
    if group is not None:
        for dest, value in group.engine_settings().items():
            wanted[dest] = Setting(value, "LeaderWorkerSet group (LWS_* environment)")
    wanted["tensor_parallel_size"] = _tensor_parallel(wanted, environ, device_count, group)
    if "dtype" in wanted:
        dtype = wanted["dtype"]
        wanted["dtype"] = Setting(
            lmi.DTYPE_ALIASES.get(dtype.value.strip().lower(), dtype.value), dtype.label
        )
    if "quantization" in wanted:
        setting = wanted.pop("quantization")
        method: str | None = check_method(setting, schema.quantization_methods)
        config_path = model_config_path(
            model.value, wanted["revision"].value if "revision" in wanted else None
        )
        declared = declared_method(config_path) if config_path else None
        method = reconcile(method, setting, declared, config_path)
        if method is not None:
            wanted["quantization"] = Setting(method, setting.label)
    if "max_num_seqs" not in wanted:
        default = (
            lmi.DEFAULT_MAX_NUM_SEQS_ASYNC if mode == ASYNC_MODE else lmi.DEFAULT_MAX_NUM_SEQS_ROLLING_BATCH
        )
        wanted["max_num_seqs"] = Setting(str(default), "LMI default")
    enable_lora = parse_bool(wanted["enable_lora"]) if "enable_lora" in wanted else False
    if enable_lora and "max_loras" not in wanted:
        wanted["max_loras"] = Setting(str(lmi.DEFAULT_MAX_LORAS), "LMI default")
    if "served_model_name" not in wanted:
        wanted["served_model_name"] = Setting(lmi.DEFAULT_SERVED_MODEL_NAME, "LMI default")

    argv: list[str] = []
    plain: dict[str, Setting] = {}
    for dest, setting in sorted(wanted.items()):
        if dest in schema.args:
            argv += _argv_for(schema.args[dest], setting)
        else:
            plain[dest] = setting
    namespace = _parse(schema, argv, wanted)
    for dest, setting in plain.items():
        setattr(namespace, dest, _convert_plain(setting, schema.engine_fields[dest]))
    validate = _optional_validator()
    if validate is not None:
        try:
            validate(namespace)
        except (ValueError, TypeError, argparse.ArgumentError) as error:
            raise RuntimeConfigError(f"vLLM rejected the combination of options: {error}") from error

    engine_args = {
        dest: _jsonable(getattr(namespace, dest)) for dest in sorted(wanted) if dest in schema.engine_fields
    }
    served = [str(name) for name in getattr(namespace, "served_model_name", None) or [model.value]]
    properties = {key: setting.value for key, setting in settings.options.items()}
    properties.update(model_id=model.value, model_dir=str(settings.model_dir))
    properties["tensor_parallel_degree"] = wanted["tensor_parallel_size"].value
    return ResolvedConfig(
        model_dir=settings.model_dir,
        mode=mode,
        namespace=namespace,
        engine_args=engine_args,
        served_model_names=served,
        enable_lora=enable_lora,
        properties=properties,
        response_format=_response_format(settings),
        headless=group is not None and group.worker,
    )


def _optional_validator() -> Callable[[argparse.Namespace], None] | None:
    try:
        validator: Callable[[argparse.Namespace], None] = vllm_attr("validate_parsed_serve_args")
    except ImportError:
        return None
    return validator
