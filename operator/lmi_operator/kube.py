"""A small async Kubernetes API client: server-side apply, get, list, status patches and events.

Plain dicts on the wire and no generated model classes: the operator touches only a handful of
kinds, and the official client's models cost tens of MiB and CPU in the hot path."""

from __future__ import annotations

import base64
import collections
import json
import os
import re
import ssl
import tempfile
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import yaml

from lmi_operator import metrics
from lmi_operator.api import API_VERSION, KIND, PLURAL

FIELD_MANAGER = "lmi-operator"
# Status has a manager of its own: its apply owns the whole status and nothing of the children.
STATUS_FIELD_MANAGER = "lmi-operator-status"
USER_AGENT = "lmi-operator/0.1.0"
# Items per page of a list (client-go's pager uses 500).
LIST_PAGE_SIZE = 500
SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")

# The kinds the operator manages or reads: (apiVersion, kind) -> plural.
PLURALS: dict[tuple[str, str], str] = {
    ("v1", "ConfigMap"): "configmaps",
    ("v1", "Service"): "services",
    ("v1", "Pod"): "pods",
    ("v1", "Event"): "events",
    ("v1", "Secret"): "secrets",
    ("apps/v1", "Deployment"): "deployments",
    ("apps/v1", "ReplicaSet"): "replicasets",
    ("policy/v1", "PodDisruptionBudget"): "poddisruptionbudgets",
    ("autoscaling/v2", "HorizontalPodAutoscaler"): "horizontalpodautoscalers",
    ("coordination.k8s.io/v1", "Lease"): "leases",
    ("events.k8s.io/v1", "Event"): "events",
    (API_VERSION, KIND): PLURAL,
}


# Characters YAML (the decoder of apply patches) refuses raw: C1 controls, lone surrogates and
# non-characters.
_YAML_UNSAFE = re.compile("[\x7f-\x9f\ud800-\udfff\ufeff\ufffe\uffff]")


def encode_body(body: Any) -> bytes:
    """JSON that the API server's YAML decoder also reads: raw UTF-8 rather than the surrogate-pair
    escapes json.dumps writes beyond the BMP (emoji), with the characters YAML refuses escaped."""
    text = json.dumps(body, separators=(",", ":"), ensure_ascii=False)
    return _YAML_UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", text).encode()


class ApiError(Exception):
    """A non-2xx answer from the API server, with its Status reason and message."""

    def __init__(self, status: int, body: Mapping[str, Any] | str) -> None:
        self.status = status
        self.reason = body.get("reason", "") if isinstance(body, Mapping) else ""
        self.message = body.get("message", "") if isinstance(body, Mapping) else body
        super().__init__(f"{status} {self.reason}: {self.message}")


class NotLeading(RuntimeError):
    """A write attempted by a replica that does not hold the Lease (or no longer may act on it)."""


@dataclass(frozen=True)
class Credentials:
    """Where the API server is and how to authenticate to it."""

    server: str
    ca_data: bytes | None = None
    cert_data: bytes | None = None
    key_data: bytes | None = None
    token: str | None = None
    token_path: Path | None = None
    insecure: bool = False
    namespace: str = "default"

    def bearer(self) -> str | None:
        """The bearer token, re-read from its file each time (projected tokens rotate)."""
        if self.token_path is not None:
            return self.token_path.read_text().strip()
        return self.token


def _file_or_data(entry: Mapping[str, Any], key: str, base: Path) -> bytes | None:
    if data := entry.get(f"{key}-data"):
        return base64.b64decode(data)
    if path := entry.get(key):
        return (base / str(path)).read_bytes()
    return None


def load_credentials(kubeconfig: str | None = None) -> Credentials:
    """Credentials from `kubeconfig`, $KUBECONFIG or ~/.kube/config, or the pod's ServiceAccount
    when none of those exists and the process runs in a cluster."""
    path = kubeconfig or os.environ.get("KUBECONFIG") or str(Path.home() / ".kube" / "config")
    if not Path(path).exists() and os.environ.get("KUBERNETES_SERVICE_HOST"):
        host, port = os.environ["KUBERNETES_SERVICE_HOST"], os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        return Credentials(
            # An IPv6 address (an IPv6-only cluster's Service IP) is bracketed in a URL.
            server=f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}",
            ca_data=(SA_DIR / "ca.crt").read_bytes(),
            token_path=SA_DIR / "token",
            namespace=(SA_DIR / "namespace").read_text().strip(),
        )
    config = yaml.safe_load(Path(path).read_text())
    base = Path(path).resolve().parent
    ctx_name = config.get("current-context")
    ctx = next(c["context"] for c in config["contexts"] if c["name"] == ctx_name)
    cluster = next(c["cluster"] for c in config["clusters"] if c["name"] == ctx["cluster"])
    user: dict[str, Any] = next(
        (u["user"] for u in config.get("users", []) if u["name"] == ctx.get("user")), {}
    )
    return Credentials(
        server=cluster["server"],
        ca_data=_file_or_data(cluster, "certificate-authority", base),
        cert_data=_file_or_data(user, "client-certificate", base),
        key_data=_file_or_data(user, "client-key", base),
        token=user.get("token"),
        token_path=base / user["tokenFile"] if user.get("tokenFile") else None,
        insecure=bool(cluster.get("insecure-skip-tls-verify")),
        namespace=ctx.get("namespace", "default"),
    )


def _ssl_context(creds: Credentials) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cadata=creds.ca_data.decode() if creds.ca_data else None)
    if creds.insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if creds.cert_data and creds.key_data:
        # ssl only loads client certificates from files: write them to a private temp folder.
        with tempfile.TemporaryDirectory() as tmp:
            cert, key = Path(tmp) / "tls.crt", Path(tmp) / "tls.key"
            cert.write_bytes(creds.cert_data)
            key.write_bytes(creds.key_data)
            ctx.load_cert_chain(str(cert), str(key))
    return ctx


def object_path(api_version: str, kind: str, namespace: str | None, name: str | None = None) -> str:
    """The REST path of a namespaced object (or of its collection when `name` is None)."""
    prefix = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    plural = PLURALS[(api_version, kind)]
    path = f"{prefix}/namespaces/{namespace}/{plural}" if namespace else f"{prefix}/{plural}"
    return f"{path}/{quote(name)}" if name else path


class KubeClient:
    """An aiohttp session against one API server; counts its requests by verb for metrics/benches."""

    def __init__(self, creds: Credentials, timeout: float = 30.0) -> None:
        self.creds = creds
        self.requests: collections.Counter[str] = collections.Counter()
        # Requests by method and path, for tests and benchmarks that count per object.
        self.requests_by_path: collections.Counter[tuple[str, str]] = collections.Counter()
        self._ssl = _ssl_context(creds)
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None
        # With leader election: whether this replica may write now. A leader paused past its renew
        # deadline (SIGSTOP, a stalled node) wakes up with workers mid-reconcile; they must not write.
        self.write_guard: Callable[[], bool] | None = None

    async def close(self) -> None:
        """Close the HTTP session."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=self._ssl, limit=32), timeout=self._timeout
            )
        return self._session

    def _headers(self) -> dict[str, str]:
        headers = {"Accept": "application/json", "User-Agent": USER_AGENT}
        if token := self.creds.bearer():
            headers["Authorization"] = f"Bearer {token}"
        return headers

    async def watch(self, path: str, **params: str) -> AsyncIterator[dict[str, Any]]:
        """Stream the watch events ({type, object}) of a collection until the server ends it."""
        self.requests["WATCH"] += 1
        query = {"watch": "1", "allowWatchBookmarks": "false", **params}
        timeout = aiohttp.ClientTimeout(total=None, sock_read=None)
        async with self._open().get(
            self.creds.server + path, params=query, headers=self._headers(), timeout=timeout
        ) as resp:
            if resp.status >= 400:
                raise ApiError(resp.status, await resp.text())
            async for line in resp.content:
                if line.strip():
                    event: dict[str, Any] = json.loads(line)
                    yield event

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        params: Mapping[str, str] | None = None,
        content_type: str = "application/json",
        guarded: bool = True,
    ) -> dict[str, Any]:
        """Send one request; return the decoded JSON body or raise ApiError. A write is refused
        (NotLeading) while `write_guard` says no, unless `guarded` is False (the Lease's own)."""
        if guarded and method != "GET" and self.write_guard is not None and not self.write_guard():
            raise NotLeading(f"{method} {path} refused: this replica does not hold the Lease")
        session = self._open()
        headers = self._headers()
        data = None
        if body is not None:
            headers["Content-Type"] = content_type
            data = encode_body(body)
        self.requests[method] += 1
        self.requests_by_path[method, path] += 1
        metrics.API_REQUESTS.labels(method).inc()
        async with session.request(
            method, self.creds.server + path, data=data, params=params, headers=headers
        ) as resp:
            text = await resp.text()
            try:
                payload = json.loads(text) if text else {}
            except json.JSONDecodeError:
                payload = text
            if resp.status >= 400:
                raise ApiError(resp.status, payload)
            result: dict[str, Any] = payload if isinstance(payload, dict) else {}
            return result

    async def apply(
        self,
        obj: Mapping[str, Any],
        *,
        force: bool = True,
        field_manager: str = FIELD_MANAGER,
        subresource: str | None = None,
    ) -> dict[str, Any]:
        """Server-side apply `obj` (a complete manifest, or a whole `subresource` such as status)
        as `field_manager`."""
        meta = obj["metadata"]
        path = object_path(obj["apiVersion"], obj["kind"], meta.get("namespace"), meta["name"])
        params = {"fieldManager": field_manager, "force": "true" if force else "false"}
        return await self.request(
            "PATCH",
            f"{path}/{subresource}" if subresource else path,
            body=obj,
            params=params,
            content_type="application/apply-patch+yaml",
        )

    async def get(self, path: str) -> dict[str, Any] | None:
        """GET one object; None when it does not exist."""
        try:
            return await self.request("GET", path)
        except ApiError as err:
            if err.status == 404:
                return None
            raise

    async def list(self, path: str, page_size: int = LIST_PAGE_SIZE, **params: str) -> list[dict[str, Any]]:
        """GET a collection page by page (limit/continue) and return all its items: one answer for a
        whole cluster's pods would be as large as the cluster."""
        items: list[dict[str, Any]] = []
        query = {**params, "limit": str(page_size)}
        while True:
            page = await self.request("GET", path, params=query)
            items += page.get("items", [])
            if not (token := page.get("metadata", {}).get("continue")):
                return items
            query["continue"] = token

    async def merge_patch(self, path: str, patch: Mapping[str, Any]) -> dict[str, Any]:
        """A JSON merge patch of the object at `path`: for what an apply cannot do (remove keys that
        another manager owns) and for counters (an Event's count)."""
        return await self.request(
            "PATCH",
            path,
            body=patch,
            params={"fieldManager": FIELD_MANAGER},
            content_type="application/merge-patch+json",
        )
