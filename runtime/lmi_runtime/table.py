"""The engine-argument table the operator validates LMIModel options against."""

from __future__ import annotations

from typing import Any

from lmi_runtime import options as lmi
from lmi_runtime.engine_args import VllmSchema


def engine_args_table(schema: VllmSchema) -> dict[str, Any]:
    """Engine and server argument names with simple types, and LMI's option names, in a stable order."""
    return {
        "vllm_version": schema.version,
        "engine_args": {name: schema.engine_fields[name] for name in sorted(schema.engine_fields)},
        # `vllm serve`'s own arguments (TLS, keep-alive limits, parsers, CORS, ...): options too.
        "server_args": {
            dest: schema.args[dest].simple_type
            for dest in sorted(schema.args)
            if dest not in schema.engine_fields and dest not in lmi.RUNTIME_OWNED
        },
        "lmi_options": {
            "renamed": dict(sorted(lmi.RENAMED.items())),
            "dtype_aliases": dict(sorted(lmi.DTYPE_ALIASES.items())),
            "removed_in_vllm": sorted(lmi.REMOVED_IN_VLLM),
            "lmi_only": sorted(
                {*lmi.MODE_KEYS, *lmi.RESPONSE_KEYS, *lmi.IGNORED_LMI_KEYS, *lmi.UNSUPPORTED_LMI_KEYS}
                - {"entrypoint"}
                | {"entryPoint"}
            ),
            "runtime_owned": sorted(lmi.RUNTIME_OWNED),
        },
        "quantization_methods": list(schema.quantization_methods),
    }
