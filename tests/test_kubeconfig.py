"""Credentials out of the cluster, against the real local API server: an exec plugin user running
the whole operator, KUBECONFIG with two files, a proxy from the kubeconfig or the environment (a real
CONNECT proxy), tls-server-name, and answers 429 from API Priority and Fairness waited out."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import socket
import ssl
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from lmi_operator.kube import Credentials, KubeClient, env_proxy, load_credentials
from lmi_operator.main import main
from lmi_operator.testing.cluster import LocalCluster
from tests.kubeapi import Api
from tests.operator_process import OperatorProcess
from tests.test_operator import apply, model_doc, wait_ready
from tests.waiting import eventually

# An exec plugin: appends a line to its calls file, prints an ExecCredential with the token of the
# token file, valid for the given number of seconds.
PLUGIN = """\
import datetime, json, sys
calls, token_file, seconds = sys.argv[1:]
with open(calls, "a") as out:
    out.write("called\\n")
expiry = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=int(seconds))
token = open(token_file).read().strip()
status = {"token": token, "expirationTimestamp": expiry.strftime("%Y-%m-%dT%H:%M:%SZ")}
kind = {"apiVersion": "client.authentication.k8s.io/v1", "kind": "ExecCredential"}
print(json.dumps({**kind, "status": status}))
"""


class Tunnel:
    """A TCP server on `host` that pipes every connection to `target` (a forwarder) or, without a
    target, is an HTTP CONNECT proxy: it records the host:port each CONNECT names and connects to it,
    the host looked up in `names` first (names only the proxy can resolve)."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        target: tuple[str, int] | None = None,
        names: dict[str, str] | None = None,
    ) -> None:
        self.target = target
        self.names = names or {}
        self.targets: list[str] = []
        self.server = socket.create_server((host, 0))
        self.port: int = self.server.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.server.close()

    def _serve(self) -> None:
        with contextlib.suppress(OSError):  # closed
            while True:
                conn, _ = self.server.accept()
                threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            if self.target is None:
                head = b""
                while b"\r\n\r\n" not in head and (chunk := conn.recv(4096)):
                    head += chunk
                method, target, _ = head.split(b"\r\n", 1)[0].decode().split(" ")
                assert method == "CONNECT", head
                self.targets.append(target)
                host, _, port = target.rpartition(":")
                upstream = socket.create_connection((self.names.get(host, host), int(port)))
                conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            else:
                upstream = socket.create_connection(self.target)
            with upstream:
                back = threading.Thread(target=_pipe, args=(upstream, conn), daemon=True)
                back.start()
                _pipe(conn, upstream)
                back.join()


def _pipe(src: socket.socket, dst: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := src.recv(65536):
            dst.sendall(data)
        dst.shutdown(socket.SHUT_WR)


@pytest.fixture
def tunnels() -> Iterator[list[Tunnel]]:
    """Tunnels a test opened, closed at its end."""
    opened: list[Tunnel] = []
    yield opened
    for tunnel in opened:
        tunnel.close()


def kubeconfig(
    cluster: LocalCluster, user: dict[str, Any], namespace: str = "default", **cluster_fields: str
) -> dict[str, Any]:
    """A kubeconfig for the local cluster (its server and CA, then `cluster_fields`) as `user`."""
    admin = yaml.safe_load(cluster.kubeconfig.read_text())
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "local", "cluster": admin["clusters"][0]["cluster"] | cluster_fields}],
        "users": [{"name": "u", "user": user}],
        "contexts": [{"name": "c", "context": {"cluster": "local", "user": "u", "namespace": namespace}}],
        "current-context": "c",
    }


def admin_user(cluster: LocalCluster) -> dict[str, Any]:
    """The local cluster's admin user (client certificate and key data)."""
    user: dict[str, Any] = yaml.safe_load(cluster.kubeconfig.read_text())["users"][0]["user"]
    return user


def write(path: Path, doc: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(doc))
    return path


def list_namespaces(creds: Credentials) -> list[str]:
    """The cluster's namespace names, through KubeClient with `creds`."""

    async def run() -> list[str]:
        client = KubeClient(creds)
        try:
            return [ns["metadata"]["name"] for ns in await client.list("/api/v1/namespaces")]
        finally:
            await client.close()

    return asyncio.run(run())


@pytest.fixture
def admin_sa(cluster: LocalCluster, namespace: str) -> Iterator[tuple[str, str]]:
    """A ServiceAccount of `namespace` bound to cluster-admin: (its name, a token for it)."""
    name = f"sa-{uuid.uuid4().hex[:6]}"
    cluster.kubectl("create", "serviceaccount", name, "-n", namespace)
    binding = f"{namespace}-{name}"
    cluster.kubectl(
        "create",
        "clusterrolebinding",
        binding,
        "--clusterrole=cluster-admin",
        f"--serviceaccount={namespace}:{name}",
    )
    try:
        yield name, cluster.kubectl("create", "token", name, "-n", namespace).stdout.strip()
    finally:
        cluster.kubectl("delete", "clusterrolebinding", binding, "--wait=false", check=False)


def exec_user(tmp_path: Path, token: str, seconds: int) -> tuple[dict[str, Any], Path]:
    """A kubeconfig user whose exec plugin gives `token` valid `seconds`, and its calls file."""
    (tmp_path / "plugin.py").write_text(PLUGIN)
    (tmp_path / "token").write_text(token)
    calls = tmp_path / "calls"
    args = [str(tmp_path / "plugin.py"), str(calls), str(tmp_path / "token"), str(seconds)]
    user = {
        "exec": {
            "apiVersion": "client.authentication.k8s.io/v1",
            "command": sys.executable,
            "args": args,
            "interactiveMode": "Never",
        }
    }
    return user, calls


@pytest.mark.cluster
def test_an_exec_plugin_user_runs_the_operator_through_a_proxy_with_tls_server_name(
    cluster: LocalCluster,
    lmi_crd: str,
    namespace: str,
    admin_sa: tuple[str, str],
    tmp_path: Path,
    tunnels: list[Tunnel],
) -> None:
    """The whole operator (kopf's watches and its own requests) with a kubeconfig as managed clusters
    have them: an exec plugin user, a proxy-url, and a server address its certificate does not name
    (127.0.0.2, forwarded to the API server) with the name to check in tls-server-name."""
    host, port = cluster.server.removeprefix("https://").rsplit(":", 1)
    forward = Tunnel("127.0.0.2", target=(host, int(port)))
    proxy = Tunnel()
    tunnels += [forward, proxy]
    user, calls = exec_user(tmp_path, admin_sa[1], seconds=3600)
    fields = {
        "server": f"https://127.0.0.2:{forward.port}",
        "tls-server-name": "kubernetes",
        "proxy-url": proxy.url,
    }
    config = write(tmp_path / "kubeconfig", kubeconfig(cluster, user, namespace, **fields))
    lease = f"lmi-{uuid.uuid4().hex[:6]}"
    env = {"LMI_OPERATOR_NAMESPACES": namespace, "LMI_OPERATOR_LEASE_NAME": lease}
    proc = OperatorProcess(config, tmp_path / "operator.log", "exec-op", env).start()
    try:
        proc.wait_ready()
        apply(cluster, namespace, model_doc("m1"))
        wait_ready(cluster, namespace, "m1")
        # This process did the work (a session operator may watch every namespace too): it holds the
        # Lease of the context's namespace and reconciled.
        holder = cluster.kubectl(
            "get", "lease", lease, "-n", namespace, "-o", "jsonpath={.spec.holderIdentity}"
        )
        assert holder.stdout == "exec-op"
        reconciles = {
            k: v for k, v in proc.metrics().items() if k.startswith("lmi_operator_reconciles_total")
        }
        assert any('result="ok"' in k and v > 0 for k, v in reconciles.items()), reconciles
        assert calls.read_text().count("called") >= 1
        # Every connection went through the proxy: the operator's client and kopf's watches alike.
        assert len(proxy.targets) >= 2 and set(proxy.targets) == {f"127.0.0.2:{forward.port}"}, proxy.targets
    finally:
        proc.kill()


@pytest.mark.cluster
def test_an_expiring_exec_credential_is_fetched_again(
    cluster: LocalCluster, namespace: str, admin_sa: tuple[str, str], tmp_path: Path
) -> None:
    # A minute of validity is within the loader's 5 minutes of skew: every request runs the plugin.
    user, calls = exec_user(tmp_path, admin_sa[1], seconds=60)
    creds = load_credentials(str(write(tmp_path / "kubeconfig", kubeconfig(cluster, user))))
    before = calls.read_text().count("called")
    assert namespace in list_namespaces(creds)
    assert calls.read_text().count("called") > before


@pytest.mark.cluster
def test_kubeconfig_files_joined_with_a_colon(
    cluster: LocalCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    whole = kubeconfig(cluster, admin_user(cluster))
    users: dict[str, Any] = {"users": whole.pop("users")}
    # The users' file lives in a folder of its own and names its certificate files relative to it.
    user = users["users"][0]["user"]
    for key in ("client-certificate", "client-key"):
        (tmp_path / "users").mkdir(exist_ok=True)
        (tmp_path / "users" / key).write_bytes(base64.b64decode(user.pop(f"{key}-data")))
        user[key] = key
    # As kubectl: the first file's current-context wins.
    users["current-context"] = "nowhere"
    first, second = write(tmp_path / "clusters.yaml", whole), write(tmp_path / "users" / "config", users)
    monkeypatch.setenv("KUBECONFIG", f"{first}:{tmp_path / 'absent'}:{second}")
    assert "default" in list_namespaces(load_credentials())


def test_a_missing_current_context_names_the_file_and_the_context(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = {"apiVersion": "v1", "kind": "Config", "clusters": [], "users": [], "contexts": []}
    path = write(tmp_path / "kubeconfig", config | {"current-context": "nowhere"})
    with pytest.raises(ValueError, match=rf"{path}.*nowhere"):
        load_credentials(str(path))
    assert main(str(path)) == 2
    assert "nowhere" in capsys.readouterr().err


@pytest.mark.cluster
def test_requests_go_through_the_kubeconfig_proxy_url(
    cluster: LocalCluster, tmp_path: Path, tunnels: list[Tunnel], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("HTTPS_PROXY", raising=False)
    proxy = Tunnel()
    tunnels.append(proxy)
    config = kubeconfig(cluster, admin_user(cluster), **{"proxy-url": proxy.url})
    assert "default" in list_namespaces(load_credentials(str(write(tmp_path / "kubeconfig", config))))
    assert set(proxy.targets) == {cluster.server.removeprefix("https://")}


@pytest.mark.cluster
def test_https_proxy_from_the_environment_unless_no_proxy(
    cluster: LocalCluster, tmp_path: Path, tunnels: list[Tunnel], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The server by a name only the proxy resolves (.invalid never resolves), checked as localhost.
    port = cluster.server.rsplit(":", 1)[1]
    proxy = Tunnel(names={"apiserver.invalid": "127.0.0.1"})
    tunnels.append(proxy)
    fields = {"server": f"https://apiserver.invalid:{port}", "tls-server-name": "localhost"}
    creds = load_credentials(
        str(write(tmp_path / "kubeconfig", kubeconfig(cluster, admin_user(cluster), **fields)))
    )
    monkeypatch.setenv("HTTPS_PROXY", proxy.url)
    monkeypatch.setenv("NO_PROXY", "example.com,10.0.0.0/8")
    assert "default" in list_namespaces(creds)
    assert proxy.targets == [f"apiserver.invalid:{port}"]
    # The loopback server of the cluster's own kubeconfig is never proxied (as client-go does).
    assert "default" in list_namespaces(load_credentials(str(cluster.kubeconfig)))
    monkeypatch.setenv("NO_PROXY", "example.com,.invalid")
    with pytest.raises(aiohttp.ClientConnectorError, match=r"apiserver\.invalid"):
        list_namespaces(creds)
    assert proxy.targets == [f"apiserver.invalid:{port}"]


def test_env_proxy_follows_no_proxy_names_networks_and_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy:3128")
    monkeypatch.setenv("NO_PROXY", ".svc,10.96.0.0/12,fd00::/8")
    assert env_proxy("https://kubernetes.default.svc:443") is None
    assert env_proxy("https://10.96.0.1:443") is None
    assert env_proxy("https://[fd00::1]:6443") is None
    assert env_proxy("https://127.0.0.1:6443") is None
    assert env_proxy("https://localhost:6443") is None
    assert env_proxy("https://api.example.com:6443") == "http://proxy:3128"
    assert env_proxy("https://10.200.0.1:6443") == "http://proxy:3128"
    monkeypatch.setenv("NO_PROXY", "*")
    assert env_proxy("https://api.example.com:6443") is None


@pytest.mark.cluster
def test_tls_server_name_checks_the_certificate_against_that_name(
    cluster: LocalCluster, tmp_path: Path, tunnels: list[Tunnel], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("HTTPS_PROXY", raising=False)
    # 127.0.0.2 is not in the serving certificate (127.0.0.1, localhost, kubernetes... are).
    host, port = cluster.server.removeprefix("https://").rsplit(":", 1)
    forward = Tunnel("127.0.0.2", target=(host, int(port)))
    tunnels.append(forward)
    server = f"https://127.0.0.2:{forward.port}"

    def creds(name: str) -> Credentials:
        fields = {"server": server, "tls-server-name": name}
        config = write(tmp_path / f"kubeconfig-{name}", kubeconfig(cluster, admin_user(cluster), **fields))
        return load_credentials(str(config))

    assert "default" in list_namespaces(creds("kubernetes"))
    with pytest.raises(aiohttp.ClientConnectorCertificateError, match=r"not valid for 'wrong\.example'"):
        list_namespaces(creds("wrong.example"))


@contextlib.contextmanager
def rejecting_flow(cluster: LocalCluster, namespace: str, sa: str) -> Iterator[str]:
    """API Priority and Fairness objects that send every request of ServiceAccount `sa` to a priority
    level of no seats that rejects what it cannot run; yields the FlowSchema's name."""
    name = f"lmi-reject-{uuid.uuid4().hex[:6]}"
    rule = {"verbs": ["*"], "apiGroups": ["*"], "resources": ["*"], "namespaces": ["*"], "clusterScope": True}
    docs = [
        {
            "apiVersion": "flowcontrol.apiserver.k8s.io/v1",
            "kind": "PriorityLevelConfiguration",
            "metadata": {"name": name},
            "spec": {
                "type": "Limited",
                "limited": {
                    "nominalConcurrencyShares": 0,
                    "lendablePercent": 0,
                    "borrowingLimitPercent": 0,
                    "limitResponse": {"type": "Reject"},
                },
            },
        },
        {
            "apiVersion": "flowcontrol.apiserver.k8s.io/v1",
            "kind": "FlowSchema",
            "metadata": {"name": name},
            "spec": {
                "priorityLevelConfiguration": {"name": name},
                "matchingPrecedence": 100,
                "rules": [
                    {
                        "subjects": [
                            {"kind": "ServiceAccount", "serviceAccount": {"name": sa, "namespace": namespace}}
                        ],
                        "resourceRules": [rule],
                        "nonResourceRules": [{"verbs": ["*"], "nonResourceURLs": ["*"]}],
                    }
                ],
            },
        },
    ]
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(docs))
    try:
        yield name
    finally:
        cluster.kubectl("delete", "flowschema,prioritylevelconfiguration", name, "--wait=false", check=False)


@contextlib.contextmanager
def seat_held(cluster: LocalCluster, token: str, path: str) -> Iterator[None]:
    """A POST to `path` whose body never comes: it holds a seat of its priority level until the end
    of the block. A priority level of no seats runs one request when it runs none (the API server
    lets one through rather than none), so this one makes it reject all the others."""
    host, port = cluster.server.removeprefix("https://").rsplit(":", 1)
    context = ssl.create_default_context(cafile=str(cluster.workdir / "pki" / "ca.crt"))
    with context.wrap_socket(
        socket.create_connection((host, int(port))), server_hostname="localhost"
    ) as conn:
        head = f"POST {path} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\n"
        conn.sendall(f"{head}Content-Type: application/json\r\nContent-Length: 100\r\n\r\n".encode())
        yield


@pytest.mark.cluster
def test_answers_429_are_waited_out_for_reads_and_writes(
    cluster: LocalCluster, namespace: str, admin_sa: tuple[str, str], tmp_path: Path
) -> None:
    sa, token = admin_sa
    config = write(tmp_path / "kubeconfig", kubeconfig(cluster, {"token": token}, namespace))
    path = f"/api/v1/namespaces/{namespace}/configmaps"
    with rejecting_flow(cluster, namespace, sa) as flow, seat_held(cluster, token, path):
        api = Api(config)
        eventually(lambda: api.request("GET", path)[0] == 429, timeout=20, what="answers 429")
        # The FlowSchema goes away after 2 s; the requests are then classified as any
        # ServiceAccount's and run.
        deleting = threading.Timer(2.0, cluster.kubectl, ("delete", "flowschema", flow))
        deleting.start()

        async def run() -> tuple[KubeClient, dict[str, Any]]:
            client = KubeClient(load_credentials(str(config)))
            doc = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "throttled"}}
            try:
                created, _ = await asyncio.gather(client.request("POST", path, body=doc), client.list(path))
                return client, created
            finally:
                await client.close()

        started = time.monotonic()
        client, created = asyncio.run(run())
        deleting.join()
    assert time.monotonic() - started >= 1.5
    # Both waited at least once; the POST was applied once (a second create would have been a 409).
    assert client.throttled >= 2 and client.requests["POST"] >= 2 and client.requests["GET"] >= 2
    assert created["metadata"]["name"] == "throttled"
    names = cluster.kubectl("get", "configmaps", "-n", namespace, "-o", "name").stdout.split()
    assert "configmap/throttled" in names
