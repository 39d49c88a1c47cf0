"""The LeaderWorkerSet controller (sigs.k8s.io/lws) in the local control plane: its CRDs and webhook
configurations as the module ships them, its manager's configuration and its readiness.

The manager serves its webhooks for real. They are not optional: the pod webhook labels the group's
pods (group index, worker index, the group's unique hash) and injects LWS_LEADER_ADDRESS and the
other LWS_* variables a multi-node runtime joins its group with, so `ENABLE_WEBHOOKS=false` (the
only switch v0.8.0 has) would leave a group that neither the controller nor vLLM can use. What is
left out is the manager's internal cert rotator (`internalCertManagement.enable: false`): it issues
a certificate for `lws-webhook-service.lws-system.svc` and points the webhook configurations at that
Service, which the API server, a process on this host, cannot reach. Instead the webhook
configurations name `https://127.0.0.1:<port>/...` with the cluster's CA, and the manager serves the
admin certificate, which that CA issued for 127.0.0.1 (the manager already authenticates with it).
"""

from __future__ import annotations

import base64
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from lmi_operator.testing.certs import CertPaths
from lmi_operator.testing.processes import free_port, http_ok

__all__ = ["LwsController", "lws_version"]

_LWS_ENV = Path(__file__).resolve().parents[3] / "tools" / "lws.env"
# The webhook configurations carry the name prefix the module's config/default kustomization gives.
_NAME_PREFIX = "lws-"
# Which patch of config/webhook the module's kustomization applies to which configuration.
_PATCHES = {
    "MutatingWebhookConfiguration": "mutating-patch.yaml",
    "ValidatingWebhookConfiguration": "validating-patch.yaml",
}

Kubectl = Callable[..., subprocess.CompletedProcess[str]]


def lws_version() -> str:
    """The LWS version `tools/build-tools.sh lws` builds, from tools/lws.env."""
    for line in _LWS_ENV.read_text().splitlines():
        if line.startswith("LWS_VERSION="):
            return line.split("=", 1)[1].strip()
    raise ValueError(f"no LWS_VERSION in {_LWS_ENV}")


class LwsController:
    """The LWS manager of one local cluster, from the binary and manifests `tools/build-tools.sh lws`
    puts beside the other tools."""

    def __init__(self, workdir: Path, bin_dir: Path) -> None:
        self.workdir = workdir / "lws"
        version = lws_version()
        self.name = f"lws-manager-{version}"
        self.manifests = bin_dir.parent / f"lws-{version}"
        self.webhook_port = 0
        self.health_port = 0
        self._ca_cert: Path | None = None

    def prepare(self, pki: CertPaths, kubeconfig: Path, kubectl: Kubectl) -> list[str]:
        """Install the CRDs (Established) and the webhook configurations, write the manager's
        serving certificate and configuration, and return the manager's arguments."""
        if not self.manifests.is_dir():
            raise FileNotFoundError(f"{self.manifests} is missing; run `make tools`")
        kubectl(
            "apply", "--server-side", "--field-manager=lmi-local-cluster", "-f", str(self.manifests / "crds")
        )
        self._wait_established(kubectl)
        self.webhook_port, self.health_port, metrics_port = free_port(), free_port(), free_port()
        self._ca_cert = pki.ca_cert
        ca_bundle = base64.b64encode(pki.ca_cert.read_bytes()).decode()
        module_docs = yaml.safe_load_all((self.manifests / "webhook" / "manifests.yaml").read_text())
        docs = [self._webhook_configuration(doc, ca_bundle) for doc in module_docs if doc]
        kubectl(
            "apply",
            "--server-side",
            "--field-manager=lmi-local-cluster",
            "-f",
            "-",
            input=yaml.safe_dump_all(docs),
        )
        certs = self.workdir / "certs"
        certs.mkdir(parents=True, exist_ok=True)
        # controller-runtime's webhook server reads tls.crt and tls.key from its certificate folder.
        (certs / "tls.crt").write_bytes(pki.admin_cert.read_bytes())
        (certs / "tls.key").write_bytes(pki.admin_key.read_bytes())
        (certs / "tls.key").chmod(0o600)
        config = {
            "apiVersion": "config.lws.x-k8s.io/v1alpha1",
            "kind": "Configuration",
            "leaderElection": {"leaderElect": False},
            "health": {"healthProbeBindAddress": f"127.0.0.1:{self.health_port}"},
            "metrics": {"bindAddress": f"127.0.0.1:{metrics_port}"},
            "webhook": {"host": "127.0.0.1", "port": self.webhook_port, "certDir": str(certs)},
            "internalCertManagement": {"enable": False},
        }
        config_file = self.workdir / "config.yaml"
        config_file.write_text(yaml.safe_dump(config, sort_keys=False))
        return [f"--kubeconfig={kubeconfig}", f"--config={config_file}"]

    def ready(self) -> bool:
        """Whether the manager is healthy and serves the pod validating webhook, the last of the four
        it registers: the webhook server starts with the first and answers 404 for the others until
        they are added. The probe trusts only the cluster's CA, as the API server's calls do."""
        if self._ca_cert is None or not http_ok(f"http://127.0.0.1:{self.health_port}/readyz"):
            return False
        # An empty review: controller-runtime answers it (an errored review, status 200) once the
        # path is registered, and logs a `bad request` for it.
        url = f"https://127.0.0.1:{self.webhook_port}/validate--v1-pod"
        context = ssl.create_default_context(cafile=str(self._ca_cert))
        request = urllib.request.Request(url, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=2, context=context) as resp:
                return bool(resp.status == 200)
        except urllib.error.HTTPError:
            return False

    def _wait_established(self, kubectl: Kubectl, timeout: float = 60.0) -> None:
        # Not `kubectl wait`: on a CRD created a moment ago it fails on the missing conditions
        # instead of waiting for them.
        names = [
            yaml.safe_load(f.read_text())["metadata"]["name"]
            for f in (self.manifests / "crds").glob("*.yaml")
        ]
        jsonpath = '{.status.conditions[?(@.type=="Established")].status}'
        deadline = time.monotonic() + timeout
        for name in names:
            while kubectl("get", "crd", name, "-o", f"jsonpath={jsonpath}").stdout != "True":
                if time.monotonic() > deadline:
                    raise TimeoutError(f"CRD {name} not Established after {timeout}s")
                time.sleep(0.2)

    def _webhook_configuration(self, doc: dict[str, Any], ca_bundle: str) -> dict[str, Any]:
        # The module's patches replace whole webhooks (the pod webhooks, to add an objectSelector
        # on LWS pods): apply them as its kustomization does, then point every webhook here.
        ops: list[dict[str, Any]] = yaml.safe_load(
            (self.manifests / "webhook" / _PATCHES[doc["kind"]]).read_text()
        )
        for op in ops:
            if op["op"] != "replace" or not op["path"].startswith("/webhooks/"):
                raise ValueError(f"unexpected patch of the LWS webhooks: {op}")
            doc["webhooks"][int(op["path"].rsplit("/", 1)[1])] = op["value"]
        doc["metadata"]["name"] = _NAME_PREFIX + doc["metadata"]["name"]
        for hook in doc["webhooks"]:
            path = hook["clientConfig"]["service"]["path"]
            hook["clientConfig"] = {
                "url": f"https://127.0.0.1:{self.webhook_port}{path}",
                "caBundle": ca_bundle,
            }
        return doc
