"""A small async Kubernetes API client: server-side apply, get, list, status patches and events.

Plain dicts on the wire and no generated model classes: the operator touches only a handful of
kinds, and the official client's models cost tens of MiB and CPU in the hot path. Measured (VmRSS
after `import lmi_operator.main`, 64.2 MiB, then three rounds of listing namespaces, pods and nodes
of the local cluster): +0.3 MiB through KubeClient on aiohttp, which kopf loads anyway, +20.5 MiB
through the kubernetes package's CoreV1Api. Kubeconfig files are read by that package's loader
(lmi_operator.kubeconfig); in a pod, the ServiceAccount's three files are read here."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ipaddress
import json
import os
import re
import ssl
import tempfile
import urllib.request
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import aiohttp

from lmi_operator import metrics
from lmi_operator.api import API_VERSION, KIND, PLURAL
from lmi_operator.render_lws import LWS_API_VERSION, LWS_KIND

FIELD_MANAGER = "lmi-operator"
# Status has a manager of its own: its apply owns the whole status and nothing of the children.
STATUS_FIELD_MANAGER = "lmi-operator-status"
USER_AGENT = "lmi-operator/0.1.0"
# Items per page of a list (client-go's pager uses 500).
LIST_PAGE_SIZE = 500
SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
# Answers 429 (API Priority and Fairness, max-requests-inflight) are retried as client-go does: up to
# 10 times, after the Retry-After the server asked for; capped, as a server could ask for minutes.
MAX_THROTTLED_RETRIES = 10
MAX_RETRY_AFTER_SECONDS = 10.0

# The kinds the operator manages or reads: (apiVersion, kind) -> plural.
PLURALS: dict[tuple[str, str], str] = {
    ("v1", "ConfigMap"): "configmaps",
    ("v1", "Service"): "services",
    ("v1", "Pod"): "pods",
    ("v1", "Event"): "events",
    ("v1", "Secret"): "secrets",
    ("v1", "PersistentVolumeClaim"): "persistentvolumeclaims",
    ("apps/v1", "Deployment"): "deployments",
    ("apps/v1", "ReplicaSet"): "replicasets",
    ("batch/v1", "Job"): "jobs",
    ("policy/v1", "PodDisruptionBudget"): "poddisruptionbudgets",
    ("autoscaling/v2", "HorizontalPodAutoscaler"): "horizontalpodautoscalers",
    ("coordination.k8s.io/v1", "Lease"): "leases",
    ("events.k8s.io/v1", "Event"): "events",
    (LWS_API_VERSION, LWS_KIND): "leaderworkersets",
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
    token_path: Path | None = None
    # A kubeconfig user's token, refreshed by the kubernetes package's loader once it expires (exec
    # plugins, auth providers): called for every request.
    token_source: Callable[[], str | None] | None = field(default=None, compare=False, repr=False)
    insecure: bool = False
    namespace: str = "default"
    # The name the serving certificate is checked against when the server's address is not in it.
    tls_server_name: str | None = None
    # The kubeconfig cluster's proxy-url; without it, HTTPS_PROXY and NO_PROXY decide (env_proxy).
    proxy: str | None = None

    def bearer(self) -> str | None:
        """The bearer token: re-read from its file each time (projected tokens rotate), or the
        kubeconfig user's (fetched again once it expires)."""
        if self.token_path is not None:
            return self.token_path.read_text().strip()
        return self.token_source() if self.token_source is not None else None


def load_credentials(kubeconfig: str | None = None) -> Credentials:
    """Credentials from `kubeconfig`, $KUBECONFIG (files joined with ':') or ~/.kube/config, or the
    pod's ServiceAccount when none of those files exists and the process runs in a cluster."""
    paths = kubeconfig or os.environ.get("KUBECONFIG") or str(Path.home() / ".kube" / "config")
    exists = any(Path(p).expanduser().exists() for p in paths.split(os.pathsep) if p)
    if not exists and os.environ.get("KUBERNETES_SERVICE_HOST"):
        host, port = os.environ["KUBERNETES_SERVICE_HOST"], os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        return Credentials(
            # An IPv6 address (an IPv6-only cluster's Service IP) is bracketed in a URL.
            server=f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}",
            ca_data=(SA_DIR / "ca.crt").read_bytes(),
            token_path=SA_DIR / "token",
            namespace=(SA_DIR / "namespace").read_text().strip(),
        )
    if not exists:
        raise ValueError(f"no kubeconfig: {paths} does not exist, and KUBERNETES_SERVICE_HOST is unset")
    # Imported here: it imports this module (Credentials).
    from lmi_operator.kubeconfig import load_kubeconfig

    return load_kubeconfig(paths)


def env_proxy(server: str) -> str | None:
    """The proxy for `server` from HTTPS_PROXY (HTTP_PROXY for http), unless NO_PROXY names its host,
    a domain above it or a network holding its address; localhost and loopback addresses are never
    proxied. What client-go's http.ProxyFromEnvironment picks when the kubeconfig names no proxy."""
    url = urlsplit(server)
    host = url.hostname or ""
    proxies = urllib.request.getproxies_environment()
    proxy, no_proxy = proxies.get(url.scheme), proxies.get("no", "")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        bypassed = host == "localhost" or bool(urllib.request.proxy_bypass(host))
    else:
        entries = [e.strip() for e in no_proxy.split(",") if e.strip()]
        bypassed = address.is_loopback or "*" in entries or any(_holds(e, address) for e in entries)
    return None if bypassed else proxy


def _holds(entry: str, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    # Python's proxy_bypass matches names only; NO_PROXY often lists networks (the Service CIDR).
    with contextlib.suppress(ValueError):
        return address in ipaddress.ip_network(entry, strict=False)
    return False


class _NamedServerContext(ssl.SSLContext):
    """A client context that checks the server's certificate against one fixed name (kubeconfig's
    tls-server-name) whatever address is dialled. asyncio hands every connection's hostname to
    wrap_bio: replacing it here serves our session and kopf's, which takes a context, not a name."""

    server_name = ""

    def wrap_bio(
        self,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
        server_side: bool = False,
        server_hostname: str | bytes | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLObject:
        return super().wrap_bio(incoming, outgoing, server_side, self.server_name, session)


def ssl_context(creds: Credentials) -> ssl.SSLContext:
    """The TLS context of `creds`: its CA, client certificate, insecure flag and tls-server-name."""
    ctx: ssl.SSLContext
    if creds.tls_server_name:
        named = _NamedServerContext(ssl.PROTOCOL_TLS_CLIENT)
        named.server_name = creds.tls_server_name
        ctx = named
    else:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if creds.ca_data:
        ctx.load_verify_locations(cadata=creds.ca_data.decode())
    else:
        ctx.load_default_certs()
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


def client_session(
    creds: Credentials,
    *,
    headers: Mapping[str, str] | None = None,
    limit: int = 32,
    timeout: aiohttp.ClientTimeout | None = None,
) -> aiohttp.ClientSession:
    """An aiohttp session to the API server of `creds` (TLS, proxy), for KubeClient and for kopf."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(ssl=ssl_context(creds), limit=limit),
        headers=headers,
        timeout=timeout or aiohttp.ClientTimeout(total=None),
        # The kubeconfig's proxy-url, else what the environment says for this server.
        proxy=creds.proxy or env_proxy(creds.server),
    )


def _retry_delay(retry_after: str) -> float:
    """Seconds to wait from a Retry-After of whole seconds (what the API server sends); 1 s when it
    is missing or a date."""
    try:
        return min(max(float(int(retry_after)), 0.0), MAX_RETRY_AFTER_SECONDS)
    except ValueError:
        return 1.0


def object_path(api_version: str, kind: str, namespace: str | None, name: str | None = None) -> str:
    """The REST path of a namespaced object (or of its collection when `name` is None)."""
    prefix = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    plural = PLURALS[(api_version, kind)]
    path = f"{prefix}/namespaces/{namespace}/{plural}" if namespace else f"{prefix}/{plural}"
    return f"{path}/{quote(name)}" if name else path


class KubeClient:
    """An aiohttp session against one API server; counts its requests by verb for metrics/benches,
    and the answers 429 it waited out (`throttled`)."""

    def __init__(self, creds: Credentials, timeout: float = 30.0, count_paths: bool = False) -> None:
        self.creds = creds
        self.requests: collections.Counter[str] = collections.Counter()
        # Requests by method and path, for tests and benchmarks that count per object; off in
        # production, where it would grow by every object ever touched.
        self.requests_by_path: collections.Counter[tuple[str, str]] = collections.Counter()
        self._count_paths = count_paths
        self.throttled = 0
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
            self._session = client_session(self.creds, timeout=self._timeout)
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
            self.creds.server + path,
            params=query,
            headers=self._headers(),
            timeout=timeout,
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
        (NotLeading) while `write_guard` says no, unless `guarded` is False (the Lease's own). An
        answer 429 is retried after its Retry-After, writes too: the server applied nothing."""
        session = self._open()
        data = None if body is None else encode_body(body)
        for attempt in range(MAX_THROTTLED_RETRIES + 1):
            # Checked before every attempt: the Lease may be lost while a write waits out a 429.
            if guarded and method != "GET" and self.write_guard is not None and not self.write_guard():
                raise NotLeading(f"{method} {path} refused: this replica does not hold the Lease")
            # Per attempt: a token may expire or rotate while a 429 is waited out.
            headers = self._headers()
            if data is not None:
                headers["Content-Type"] = content_type
            self.requests[method] += 1
            if self._count_paths:
                self.requests_by_path[method, path] += 1
            metrics.API_REQUESTS.labels(method).inc()
            async with session.request(
                method,
                self.creds.server + path,
                data=data,
                params=params,
                headers=headers,
            ) as resp:
                status, text = resp.status, await resp.text()
                retry_after = resp.headers.get("Retry-After", "")
            if status != 429 or attempt == MAX_THROTTLED_RETRIES:
                break
            self.throttled += 1
            await asyncio.sleep(_retry_delay(retry_after))
        try:
            payload = json.loads(text) if text else {}
        except json.JSONDecodeError:
            payload = text
        if status >= 400:
            raise ApiError(status, payload)
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
