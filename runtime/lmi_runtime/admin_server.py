"""The adapter management port: the operator brings a replica to its declared adapters here.

It listens on $LMI_ADMIN_PORT, a port the model's Service does not expose, and answers only requests
signed by a key listed in $LMI_ADMIN_KEYS_FILE (admin_auth; the file is read per request, as the
kubelet refreshes it), so a client of the model cannot load adapters from arbitrary paths. Routes:

- GET  /lmi/adapters: {"adapters": [{name, source, state, reason, message}]}
- PUT  /lmi/adapters with {"adapters": {name: source}}: converge to that set, then answer as GET.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from lmi_runtime.adapter_set import DeclaredAdapters
from lmi_runtime.adapter_sources import adapters_of
from lmi_runtime.admin_auth import verify
from lmi_runtime.errors import RuntimeConfigError
from lmi_runtime.lmi_schema import error_body
from lmi_runtime.options import ADMIN_ADAPTERS_PATH, ADMIN_KEYS_ENV, ADMIN_PORT_ENV


def admin_settings(environ: Mapping[str, str]) -> tuple[int, Path] | None:
    """(port, public keys file) of the management port, None when $LMI_ADMIN_PORT is unset."""
    raw = environ.get(ADMIN_PORT_ENV)
    if not raw:
        return None
    if not raw.isdigit() or not 0 < int(raw) < 65536:
        raise RuntimeConfigError(f"{ADMIN_PORT_ENV}={raw!r}: expected a port number from 1 to 65535")
    keys = environ.get(ADMIN_KEYS_ENV, "").strip()
    if not keys:
        raise RuntimeConfigError(
            f"{ADMIN_PORT_ENV} is set but {ADMIN_KEYS_ENV} is not: the port accepts only signed requests"
        )
    return int(raw), Path(keys)


def _public_keys(file: Path) -> list[str]:
    try:
        return [line for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    except OSError:
        return []


def _error(code: int, message: str) -> JSONResponse:
    return JSONResponse(error_body(code, message), status_code=code)


def admin_app(declared: DeclaredAdapters, keys_file: Path, enable_lora: bool) -> Starlette:
    """The management application over one replica's declared adapters."""

    async def adapters(request: Request) -> JSONResponse:
        body = await request.body()
        header = request.headers.get("authorization", "")
        if not verify(header, request.method, request.url.path, body, _public_keys(keys_file)):
            return _error(401, f"the request must be signed by a key in {keys_file} (the operator's)")
        if request.method == "PUT":
            try:
                document = json.loads(body)
            except ValueError:
                return _error(400, "the body is not JSON")
            try:
                wanted = adapters_of(
                    document.get("adapters") if isinstance(document, dict) else None, "adapters"
                )
            except RuntimeConfigError as error:
                return _error(400, str(error))
            if wanted and not enable_lora:
                return _error(400, "LoRA is not enabled: set option.enable_lora=true")
            await declared.converge(wanted)
        return JSONResponse(declared.report())

    return Starlette(routes=[Route(ADMIN_ADAPTERS_PATH, adapters, methods=["GET", "PUT"])])


def admin_server(app: Starlette) -> uvicorn.Server:
    """A quiet uvicorn server for `app` (serve it on its own socket with `serve(sockets=[...])`)."""
    return uvicorn.Server(uvicorn.Config(app, lifespan="off", log_config=None, access_log=False))
