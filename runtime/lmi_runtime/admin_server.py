"""The adapter management port: the operator brings a replica to its declared adapters here.

It listens on $LMI_ADMIN_PORT, a port the model's Service does not expose, and answers only requests
that carry $LMI_ADMIN_TOKEN as a bearer token (the operator keeps it in a Secret it mounts into the
pods), so a client of the model cannot load adapters from arbitrary paths. Two routes:

- GET  /lmi/adapters: {"adapters": [{name, source, state, reason, message}]}
- PUT  /lmi/adapters with {"adapters": {name: source}}: converge to that set, then answer as GET.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from lmi_runtime.adapter_set import DeclaredAdapters
from lmi_runtime.adapter_sources import adapters_of
from lmi_runtime.errors import RuntimeConfigError
from lmi_runtime.lmi_schema import error_body
from lmi_runtime.options import ADMIN_ADAPTERS_PATH, ADMIN_PORT_ENV, ADMIN_TOKEN_ENV


def admin_settings(environ: Mapping[str, str]) -> tuple[int, str] | None:
    """(port, token) of the management port, None when $LMI_ADMIN_PORT is unset."""
    raw = environ.get(ADMIN_PORT_ENV)
    if not raw:
        return None
    if not raw.isdigit() or not 0 < int(raw) < 65536:
        raise RuntimeConfigError(f"{ADMIN_PORT_ENV}={raw!r}: expected a port number from 1 to 65535")
    token = environ.get(ADMIN_TOKEN_ENV, "").strip()
    if not token:
        raise RuntimeConfigError(
            f"{ADMIN_PORT_ENV} is set but {ADMIN_TOKEN_ENV} is empty: the port needs a token"
        )
    return int(raw), token


def admin_app(declared: DeclaredAdapters, token: str, enable_lora: bool) -> Starlette:
    """The management application over one replica's declared adapters."""
    expected = f"Bearer {token}".encode()

    def refused(request: Request) -> JSONResponse | None:
        given = request.headers.get("authorization", "").encode("latin-1", errors="replace")
        if hmac.compare_digest(given, expected):
            return None
        return JSONResponse(error_body(401, "a valid bearer token is required"), status_code=401)

    async def adapters(request: Request) -> JSONResponse:
        if (refusal := refused(request)) is not None:
            return refusal
        if request.method == "PUT":
            try:
                body = await request.json()
                wanted = adapters_of(body.get("adapters") if isinstance(body, dict) else None, "adapters")
            except ValueError:
                return JSONResponse(error_body(400, "the body is not JSON"), status_code=400)
            except RuntimeConfigError as error:
                return JSONResponse(error_body(400, str(error)), status_code=400)
            if wanted and not enable_lora:
                return JSONResponse(
                    error_body(400, "LoRA is not enabled: set option.enable_lora=true"), status_code=400
                )
            await declared.converge(wanted)
        return JSONResponse(declared.report())

    return Starlette(routes=[Route(ADMIN_ADAPTERS_PATH, adapters, methods=["GET", "PUT"])])


def admin_server(app: Starlette) -> uvicorn.Server:
    """A quiet uvicorn server for `app` (serve it on its own socket with `serve(sockets=[...])`)."""
    config = uvicorn.Config(app, lifespan="off", log_config=None, access_log=False)
    return uvicorn.Server(config)
