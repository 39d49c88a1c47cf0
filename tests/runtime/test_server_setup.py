"""vLLM's server start-up steps done by `lmi-runtime serve`: open-files limit, TLS (and its refresh),
keep-alive, header limits, parser plugins and vLLM's argument checks; one real server on CPU."""

from __future__ import annotations

import contextlib
import datetime
import http.client
import ipaddress
import json
import resource
import select
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from lmi_runtime.engine_args import resolve
from lmi_runtime.errors import RuntimeConfigError
from lmi_runtime.properties import load_settings
from lmi_runtime.server_setup import max_header_count, uvicorn_options, validate_server_args
from tests.runtime.conftest import (
    RuntimeServer,
    TinyModel,
    async_mode_properties,
    serving,
    write_properties,
)

# A tool parser plugin as users write one: vLLM's pythonic parser registered under a new name.
PLUGIN = """
from vllm.tool_parsers import ToolParserManager
from vllm.tool_parsers.pythonic_tool_parser import PythonicToolParser

ToolParserManager.register_module("lmi_test_parser", module=PythonicToolParser)
"""
KEEP_ALIVE_S = 1
MAX_HEADERS = 20
MAX_EVENT_BYTES = 16384


def write_certificate(folder: Path, common_name: str) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (key.pem, cert.pem), named `common_name`."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_path, cert_path = folder / "key.pem", folder / "cert.pem"
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


def namespace_for(tmp_path: Path, properties: dict[str, str]) -> object:
    """vLLM's serve Namespace the runtime resolves for `properties` (no engine starts)."""
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    write_properties(tmp_path, properties)
    return resolve(load_settings(tmp_path, {}), {}, device_count=lambda: 0).namespace


def test_uvicorn_gets_vllms_server_options(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key, cert = write_certificate(tmp_path, "unit")
    monkeypatch.setenv("VLLM_HTTP_TIMEOUT_KEEP_ALIVE", "7")
    namespace = namespace_for(
        tmp_path,
        {
            "option.ssl_keyfile": str(key),
            "option.ssl_certfile": str(cert),
            "option.ssl_cert_reqs": "2",
            "option.uvicorn_log_level": "warning",
            "option.disable_uvicorn_access_log": "true",
            "option.h11_max_header_count": "9",
        },
    )
    options = uvicorn_options(namespace)  # type: ignore[arg-type]
    assert options["timeout_keep_alive"] == 7
    assert (options["ssl_keyfile"], options["ssl_certfile"], options["ssl_cert_reqs"]) == (
        str(key),
        str(cert),
        2,
    )
    assert options["log_level"] == "warning" and options["access_log"] is False
    # httptools (uvicorn's choice when installed) is kept unless the h11 event-size limit is asked for
    assert "http" not in options and "h11_max_incomplete_event_size" not in options
    assert max_header_count(namespace) == 9  # type: ignore[arg-type]
    limited = uvicorn_options(namespace_for(tmp_path, {"option.h11_max_incomplete_event_size": "1000"}))  # type: ignore[arg-type]
    assert (limited["http"], limited["h11_max_incomplete_event_size"]) == ("h11", 1000)
    assert max_header_count(namespace_for(tmp_path, {})) == 256  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("properties", "message"),
    [
        (
            {"option.ssl_keyfile": "/nonexistent/key.pem"},
            "option.ssl_keyfile=/nonexistent/key.pem: no such file",
        ),
        (
            {"option.ssl_keyfile": "KEY"},
            "option.ssl_keyfile is set without option.ssl_certfile: TLS needs both",
        ),
        (
            {"option.ssl_certfile": "CERT"},
            "option.ssl_certfile is set without option.ssl_keyfile: TLS needs both",
        ),
        (
            {"option.tool_parser_plugin": "/nonexistent/parser.py"},
            "option.tool_parser_plugin=/nonexistent/parser.py: no such file",
        ),
        (
            {"option.enable_auto_tool_choice": "true", "option.tool_call_parser": "no_such_parser"},
            "option.tool_call_parser: invalid tool call parser: no_such_parser (chose from",
        ),
    ],
)
def test_bad_server_options_fail_before_the_engine(
    tmp_path: Path, properties: dict[str, str], message: str
) -> None:
    key, cert = write_certificate(tmp_path, "unit")
    resolved = {k: v.replace("KEY", str(key)).replace("CERT", str(cert)) for k, v in properties.items()}
    with pytest.raises(RuntimeConfigError) as raised:
        validate_server_args(namespace_for(tmp_path, resolved))  # type: ignore[arg-type]
    assert message in str(raised.value)


def test_plugin_registers_the_parser_it_names(tmp_path: Path) -> None:
    plugin = tmp_path / "lmi_parser_plugin.py"
    plugin.write_text(PLUGIN)
    validate_server_args(
        namespace_for(  # type: ignore[arg-type]
            tmp_path,
            {
                "option.tool_parser_plugin": str(plugin),
                "option.enable_auto_tool_choice": "true",
                "option.tool_call_parser": "lmi_test_parser",
            },
        )
    )


def _limit_open_files() -> None:
    # The test starts the server at a low limit so that the raise is visible.
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))


@pytest.fixture(scope="module")
def tls_server(
    tiny_model: TinyModel, vllm_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[RuntimeServer, Path]]:
    """A server with TLS (refreshed), keep-alive 1 s, header limits, a tool parser plugin and
    option.tgi_compat (server-sent events, answers in a list)."""
    folder = tmp_path_factory.mktemp("tls")
    key, cert = write_certificate(folder, "first")
    plugin = folder / "lmi_parser_plugin.py"
    plugin.write_text(PLUGIN)
    model_dir = tmp_path_factory.mktemp("tls-model-dir")
    write_properties(
        model_dir,
        async_mode_properties(
            tiny_model.path,
            ssl_keyfile=str(key),
            ssl_certfile=str(cert),
            enable_ssl_refresh="true",
            h11_max_header_count=str(MAX_HEADERS),
            h11_max_incomplete_event_size=str(MAX_EVENT_BYTES),
            tool_parser_plugin=str(plugin),
            enable_auto_tool_choice="true",
            tool_call_parser="lmi_test_parser",
            tgi_compat="true",
        ),
    )
    env = {**vllm_env, "VLLM_HTTP_TIMEOUT_KEEP_ALIVE": str(KEEP_ALIVE_S)}
    with serving(model_dir, env, folder / "server.log", tls_ca=cert, preexec_fn=_limit_open_files) as server:
        yield server, cert


@pytest.mark.vllm
def test_open_files_limit_is_raised(tls_server: tuple[RuntimeServer, Path]) -> None:
    server, _ = tls_server
    limits = Path(f"/proc/{server.process.pid}/limits").read_text()
    soft = int(next(line for line in limits.splitlines() if line.startswith("Max open files")).split()[3])
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert soft == min(65535, hard) and soft > 1024


@pytest.mark.vllm
def test_tls_from_the_loading_answer_on(tls_server: tuple[RuntimeServer, Path]) -> None:
    server, _ = tls_server
    assert server.url.startswith("https://")
    # /ping answered 503 over TLS while the engine loaded (the start-up poll used the certificate)
    assert server.pings_before_ready and {code for code, _ in server.pings_before_ready} == {503}
    with server.client() as client:
        assert client.get("/ping").status_code == 200
    with pytest.raises(httpx.TransportError), httpx.Client(timeout=10) as plain:
        plain.get(server.url.replace("https://", "http://") + "/ping")


def _connection(server: RuntimeServer, cert: Path) -> http.client.HTTPSConnection:
    host, port = server.url.removeprefix("https://").split(":")
    return http.client.HTTPSConnection(
        host, int(port), timeout=10, context=ssl.create_default_context(cafile=str(cert))
    )


@pytest.mark.vllm
def test_idle_connections_close_after_vllms_keep_alive(tls_server: tuple[RuntimeServer, Path]) -> None:
    server, cert = tls_server
    connection = _connection(server, cert)
    connection.request("GET", "/ping")
    assert connection.getresponse().read()
    raw = connection.sock
    assert raw is not None
    readable, _, _ = select.select([raw], [], [], KEEP_ALIVE_S + 4)
    assert readable, "the server kept the idle connection open"
    # closed without a TLS close_notify raises instead: closed all the same
    with contextlib.suppress(ssl.SSLError, ConnectionResetError):
        assert raw.recv(1) == b""
    connection.close()


@pytest.mark.vllm
def test_header_count_and_size_limits(tls_server: tuple[RuntimeServer, Path]) -> None:
    server, _ = tls_server
    with server.client() as client:
        few = client.get("/ping", headers={f"x-h{i}": "1" for i in range(5)})
        many = client.get("/ping", headers={f"x-h{i}": "1" for i in range(MAX_HEADERS + 5)})
    assert few.status_code == 200
    assert many.status_code == 431 and f"more than {MAX_HEADERS} request headers" in many.text
    # h11's limit is on an incomplete event: a header that arrives piece by piece and outgrows it is
    # refused (a 4xx, or the connection closed), whereas one read whole may pass; so send it slowly.
    context = ssl.create_default_context(cafile=str(server.tls_ca))
    host, port = server.url.removeprefix("https://").split(":")
    with (
        socket.create_connection((host, int(port)), timeout=10) as plain,
        context.wrap_socket(plain, server_hostname=host) as raw,
    ):
        raw.sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\nx-large: ")
        answer: bytes | None
        try:
            for _ in range(MAX_EVENT_BYTES * 2 // 1024):
                raw.sendall(b"a" * 1024)
                time.sleep(0.002)
            answer = raw.recv(64)
        except TimeoutError:
            answer = None  # still waiting for the header's end: the limit did not apply
        except OSError:
            answer = b""  # closed while the header was still coming: refused
    assert answer is not None, "a header over the limit was still being read after 10 s"
    assert answer == b"" or answer.split()[1] in (b"400", b"413", b"431"), answer


@pytest.mark.vllm
def test_tool_parser_plugin_serves_auto_tool_choice(tls_server: tuple[RuntimeServer, Path]) -> None:
    server, _ = tls_server
    tool = {
        "type": "function",
        "function": {"name": "weather", "parameters": {"type": "object", "properties": {}}},
    }
    with server.client() as client:
        answer = client.post(
            "/v1/chat/completions",
            json={
                "model": "lmi",
                "messages": [{"role": "user", "content": "hi"}],
                "tools": [tool],
                "tool_choice": "auto",
                "max_tokens": 4,
            },
        )
    # vLLM refuses tool_choice "auto" (400) unless the auto tool choice parser is loaded
    assert answer.status_code == 200, answer.text


@pytest.mark.vllm
def test_tgi_compat_streams_server_sent_events_and_lists_answers(
    tls_server: tuple[RuntimeServer, Path],
) -> None:
    server, _ = tls_server
    request = {"inputs": "the model", "parameters": {"max_new_tokens": 4, "do_sample": False}}
    with server.client() as client:
        answer = client.post("/invocations", json=request)
        with client.stream("POST", "/invocations", json={**request, "stream": True}) as streamed:
            media_type = streamed.headers["content-type"]
            body = streamed.read().decode()
    assert answer.status_code == 200
    listed = answer.json()
    assert isinstance(listed, list) and set(listed[0]) == {"generated_text"}
    assert media_type.startswith("text/event-stream")
    events = [event for event in body.split("\n\n") if event]
    assert all(event.startswith("data: ") for event in events)
    lines = [json.loads(event.removeprefix("data: ")) for event in events]
    assert len(lines) == 4 and lines[-1]["generated_text"] == listed[0]["generated_text"]


@pytest.mark.vllm
def test_tls_certificate_refresh(tls_server: tuple[RuntimeServer, Path]) -> None:
    server, cert = tls_server
    host, port = server.url.removeprefix("https://").split(":")

    def served_name() -> str:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        with (
            socket.create_connection((host, int(port)), timeout=10) as raw,
            context.wrap_socket(raw) as wrapped,
        ):
            der = wrapped.getpeercert(binary_form=True)
        assert der is not None
        subject = x509.load_der_x509_certificate(der).subject
        return str(subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)

    assert served_name() == "first"
    write_certificate(cert.parent, "second")
    deadline = time.monotonic() + 30
    while served_name() != "second" and time.monotonic() < deadline:
        time.sleep(0.5)
    assert served_name() == "second"
