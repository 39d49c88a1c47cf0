"""Start and stop a real local control plane: etcd, kube-apiserver, kube-controller-manager,
kube-scheduler and kwok, as plain processes on free 127.0.0.1 ports under one folder."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from lmi_operator.testing.certs import CertPaths, write_pki
from lmi_operator.testing.lws import LwsController
from lmi_operator.testing.node import NODE_IP, RealNode
from lmi_operator.testing.nodes import DEFAULT_NODES, FakeNode
from lmi_operator.testing.processes import die_with_parent, free_port, http_ok

__all__ = ["REPO_ROOT", "ClusterError", "LocalCluster", "free_port", "tools_bin_dir"]

REPO_ROOT = Path(__file__).resolve().parents[3]
# Stages beside kwok's stock ones: what a kubelet does that they don't, and the fault states tests use.
REPO_STAGES = tuple(sorted((REPO_ROOT / "tools" / "kwok").glob("*.yaml")))
# With a real node: ServiceAccounts' requests at Metadata level (who, what, the answer's code) once
# answered; nothing else (the components' and the tests' own requests would drown them).
AUDIT_POLICY = {
    "apiVersion": "audit.k8s.io/v1",
    "kind": "Policy",
    "omitStages": ["RequestReceived"],
    "rules": [
        {"level": "Metadata", "userGroups": ["system:serviceaccounts"]},
        {"level": "None"},
    ],
}


class ClusterError(RuntimeError):
    """The local control plane could not be started; the message names the component and its log."""


def tools_bin_dir() -> Path:
    """The folder with the pinned binaries: $LMI_TOOLS_BIN, else what `tools/build-tools.sh` builds
    (or finds already built) for the versions pinned in tools/versions.env."""
    if env := os.environ.get("LMI_TOOLS_BIN"):
        return Path(env)
    out = subprocess.run(
        ["bash", str(REPO_ROOT / "tools" / "build-tools.sh")],
        check=True,
        stdout=subprocess.PIPE,
        text=True,
    ).stdout
    return Path(out.strip().splitlines()[-1])


@dataclass(frozen=True)
class Ports:
    """The 127.0.0.1 ports one cluster listens on."""

    etcd_client: int
    etcd_peer: int
    apiserver: int
    controller_manager: int
    scheduler: int
    kwok: int

    @classmethod
    def pick(cls) -> Ports:
        """Free ports, chosen now (a later clash fails loudly at start-up, naming the component)."""
        return cls(*(free_port() for _ in range(6)))


class LocalCluster:
    """A control plane rooted in `workdir`. `start()` brings it up with fake GPU nodes (and, with
    `real_node`, a kubelet + containerd node that runs CPU pods for real, and with `lws`, the
    LeaderWorkerSet controller) and waits until it schedules pods; `stop()` ends exactly the
    processes it started."""

    def __init__(
        self,
        workdir: Path,
        bin_dir: Path,
        nodes: Sequence[FakeNode] = DEFAULT_NODES,
        real_node: bool = False,
        lws: bool = False,
    ) -> None:
        self.workdir = workdir
        self.bin_dir = bin_dir
        self.nodes = tuple(nodes)
        self.real_node: RealNode | None = None
        if real_node:
            self.real_node = RealNode(workdir, bin_dir, workdir / "kubeconfig", free_port())
        self.lws = LwsController(workdir, bin_dir) if lws else None
        # The processes this object started: judged by their handles, never by /proc alone.
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self.kubeconfig = workdir / "kubeconfig"
        self.logs = workdir / "logs"
        self.audit_log = self.logs / "audit.log"
        self._state = workdir / "state.json"

    # -- public API ---------------------------------------------------------------------------

    @property
    def server(self) -> str:
        """The apiserver URL."""
        return f"https://127.0.0.1:{self._load_state()['ports']['apiserver']}"

    def start(self, detach: bool = False, timeout: float = 120.0) -> None:
        """Start every component and wait for Ready GPU nodes. With `detach`, the processes outlive
        this Python process (for `make cluster-up`); otherwise they die with it."""
        if self.running():
            raise ClusterError(f"a cluster already runs in {self.workdir}: stop it first")
        # A fresh cluster every time: etcd refuses a data dir bootstrapped with other peer URLs.
        shutil.rmtree(self.workdir / "etcd", ignore_errors=True)
        shutil.rmtree(self.logs, ignore_errors=True)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir()
        pki = write_pki(self.workdir / "pki")
        ports = Ports.pick()
        self._write_kubeconfig(pki, ports)
        self._save_state({"ports": ports.__dict__, "pids": {}})
        deadline = time.monotonic() + timeout
        try:
            self._spawn("etcd", self._etcd_args(ports), detach)
            self._wait("etcd", deadline, lambda: http_ok(f"http://127.0.0.1:{ports.etcd_client}/health"))
            self._spawn("kube-apiserver", self._apiserver_args(pki, ports), detach)
            self._wait("kube-apiserver", deadline, lambda: self._https_ok(pki, ports.apiserver, "/readyz"))
            self._spawn("kube-controller-manager", self._kcm_args(pki, ports), detach)
            self._spawn("kube-scheduler", self._scheduler_args(ports), detach)
            self._spawn("kwok", self._kwok_args(ports), detach)
            if self.lws is not None:
                self._spawn(self.lws.name, self.lws.prepare(pki, self.kubeconfig, self.kubectl), detach)
            self._wait(
                "kube-controller-manager",
                deadline,
                lambda: self._https_ok(None, ports.controller_manager, "/healthz"),
            )
            self._wait("kube-scheduler", deadline, lambda: self._https_ok(None, ports.scheduler, "/healthz"))
            self._wait("kwok", deadline, lambda: http_ok(f"http://127.0.0.1:{ports.kwok}/healthz"))
            if self.lws is not None:
                self._wait(self.lws.name, deadline, self.lws.ready, "serving its webhooks")
            self.add_nodes(self.nodes)
            self._wait("kwok", deadline, self._nodes_ready, "done making the fake nodes Ready")
            # Pods cannot be created in a namespace until its default ServiceAccount exists.
            self._wait(
                "kube-controller-manager",
                deadline,
                self._default_sa,
                "done creating the default ServiceAccount",
            )
            if self.real_node is not None:
                if detach:
                    raise ClusterError("the real node runs only attached to the process that starts it")
                self.real_node.start()
        except BaseException:
            self.stop()
            raise

    def stop(self, grace: float = 10.0) -> None:
        """Stop the processes this cluster started, newest first: SIGTERM, then SIGKILL after `grace`."""
        if self.real_node is not None:
            self.real_node.stop()
        if not self._state.exists():
            return
        pids: dict[str, int] = self._load_state()["pids"]
        for name, pid in reversed(list(pids.items())):
            if self._is_ours(name, pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
        end = time.monotonic() + grace
        for name, pid in pids.items():
            while self._is_ours(name, pid) and time.monotonic() < end:
                time.sleep(0.1)
            if self._is_ours(name, pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        self._state.unlink()

    def running(self) -> dict[str, int]:
        """Components whose recorded pid is still alive, by name."""
        if not self._state.exists():
            return {}
        pids: dict[str, int] = self._load_state()["pids"]
        return {name: pid for name, pid in pids.items() if self._is_ours(name, pid)}

    def pid(self, component: str) -> int:
        """The pid of a running component (for fault-injection tests)."""
        pids: dict[str, int] = self._load_state()["pids"]
        return pids[component]

    def restart(self, component: str, timeout: float = 60.0) -> None:
        """Stop one component and start it again with the same flags and ports."""
        state = self._load_state()
        ports = Ports(**state["ports"])
        pki = self._pki_paths()
        pid = state["pids"][component]
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        while self._is_ours(component, pid):
            time.sleep(0.1)
        args = {
            "etcd": lambda: self._etcd_args(ports),
            "kube-apiserver": lambda: self._apiserver_args(pki, ports),
            "kube-controller-manager": lambda: self._kcm_args(pki, ports),
            "kube-scheduler": lambda: self._scheduler_args(ports),
            "kwok": lambda: self._kwok_args(ports),
        }[component]()
        self._spawn(component, args, detach=False)
        if component == "kube-apiserver":
            self._wait(
                component, time.monotonic() + timeout, lambda: self._https_ok(pki, ports.apiserver, "/readyz")
            )

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 120.0
    ) -> subprocess.CompletedProcess[str]:
        """Run this cluster's kubectl against it; raises with kubectl's stderr when `check` fails."""
        proc = subprocess.run(
            [str(self.bin_dir / "kubectl"), "--kubeconfig", str(self.kubeconfig), *args],
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise subprocess.CalledProcessError(proc.returncode, proc.args, proc.stdout, proc.stderr)
        return proc

    @contextlib.contextmanager
    def port_forward(self, namespace: str, target: str, port: int = 8080) -> Iterator[int]:
        """`kubectl port-forward` to `target` (svc/NAME or pod/NAME) on a free local port, which it
        yields; the forward ends with the block."""
        proc = subprocess.Popen(
            [
                str(self.bin_dir / "kubectl"),
                "--kubeconfig",
                str(self.kubeconfig),
                "port-forward",
                "-n",
                namespace,
                target,
                f":{port}",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert proc.stdout is not None and proc.stderr is not None
            line = proc.stdout.readline()  # "Forwarding from 127.0.0.1:PORT -> 8080"
            if "127.0.0.1:" not in line:
                raise ClusterError(f"kubectl port-forward {target}: {line}{proc.stderr.read()}".strip())
            yield int(line.split("127.0.0.1:", 1)[1].split()[0])
        finally:
            proc.terminate()
            proc.wait(10)

    def memory_rss_mib(self) -> dict[str, float]:
        """Resident memory of each running component, in MiB (from /proc)."""
        out: dict[str, float] = {}
        for name, pid in self.running().items():
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    out[name] = int(line.split()[1]) / 1024
        return out

    # -- component flags ------------------------------------------------------------------------

    def _etcd_args(self, p: Ports) -> list[str]:
        client, peer = f"http://127.0.0.1:{p.etcd_client}", f"http://127.0.0.1:{p.etcd_peer}"
        return [
            "--name=local",
            f"--data-dir={self.workdir / 'etcd'}",
            f"--listen-client-urls={client}",
            f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=local={peer}",
            "--unsafe-no-fsync=true",
            "--log-level=warn",
        ]

    def _apiserver_args(self, pki: CertPaths, p: Ports) -> list[str]:
        return [
            f"--etcd-servers=http://127.0.0.1:{p.etcd_client}",
            *self._apiserver_address_args(),
            f"--secure-port={p.apiserver}",
            f"--tls-cert-file={pki.admin_cert}",
            f"--tls-private-key-file={pki.admin_key}",
            f"--client-ca-file={pki.ca_cert}",
            "--authorization-mode=Node,RBAC",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={pki.sa_pub}",
            f"--service-account-signing-key-file={pki.sa_key}",
            # The real node's kubelet (logs, exec, port-forward) is reached on its InternalIP.
            "--kubelet-preferred-address-types=InternalIP,Hostname",
            f"--kubelet-client-certificate={pki.admin_cert}",
            f"--kubelet-client-key={pki.admin_key}",
            "--service-cluster-ip-range=10.96.0.0/16",
            "--allow-privileged=true",
            "--profiling=false",
            "--v=1",
        ]

    def _apiserver_address_args(self) -> list[str]:
        if self.real_node is None:
            return ["--bind-address=127.0.0.1"]
        # Pods on the real node reach the API server through the `kubernetes` Service, whose
        # endpoint is the advertised address: the node's bridge gateway. The server can bind one
        # address only, and this machine's own clients use 127.0.0.1, hence every address.
        # Requests of ServiceAccounts (the in-cluster operator's) are audited: a test reads the
        # log for requests its RBAC denied.
        policy = self.workdir / "audit-policy.yaml"
        policy.write_text(yaml.safe_dump(AUDIT_POLICY, sort_keys=False))
        return [
            "--bind-address=0.0.0.0",
            f"--advertise-address={NODE_IP}",
            f"--audit-policy-file={policy}",
            f"--audit-log-path={self.audit_log}",
            "--audit-log-format=json",
        ]

    def _kcm_args(self, pki: CertPaths, p: Ports) -> list[str]:
        return [
            f"--kubeconfig={self.kubeconfig}",
            f"--authentication-kubeconfig={self.kubeconfig}",
            f"--authorization-kubeconfig={self.kubeconfig}",
            "--leader-elect=false",
            "--bind-address=127.0.0.1",
            f"--secure-port={p.controller_manager}",
            f"--service-account-private-key-file={pki.sa_key}",
            f"--root-ca-file={pki.ca_cert}",
            "--use-service-account-credentials=true",
            "--profiling=false",
            "--v=1",
        ]

    def _scheduler_args(self, p: Ports) -> list[str]:
        return [
            f"--kubeconfig={self.kubeconfig}",
            f"--authentication-kubeconfig={self.kubeconfig}",
            f"--authorization-kubeconfig={self.kubeconfig}",
            "--leader-elect=false",
            "--bind-address=127.0.0.1",
            f"--secure-port={p.scheduler}",
            "--profiling=false",
            "--v=1",
        ]

    def _kwok_args(self, p: Ports) -> list[str]:
        stages = self.workdir / "kwok-stages.yaml"
        docs = [(self.bin_dir.parent / "kwok-stages.yaml").read_text()]
        docs += [s.read_text() for s in REPO_STAGES]
        stages.write_text("\n---\n".join(docs))
        return [
            f"--kubeconfig={self.kubeconfig}",
            f"--config={stages}",
            "--manage-all-nodes=false",
            "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake",
            f"--server-address=127.0.0.1:{p.kwok}",
            "--node-ip=127.0.0.1",
            # Without leases the node lifecycle controller marks the nodes (and their pods) NotReady.
            "--node-lease-duration-seconds=40",
            "--cidr=10.244.0.1/16",
        ]

    # -- helpers ----------------------------------------------------------------------------------

    def _spawn(self, name: str, args: list[str], detach: bool) -> None:
        binary = self.bin_dir / name
        if not binary.exists():
            raise ClusterError(f"{name}: {binary} is missing; run `make tools`")
        log = (self.logs / f"{name}.log").open("ab")
        proc = subprocess.Popen(
            [str(binary), *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=None if detach else die_with_parent,
            cwd=self.workdir,
        )
        log.close()
        self._procs[name] = proc
        state = self._load_state()
        state["pids"][name] = proc.pid
        self._save_state(state)

    def _is_ours(self, name: str, pid: int) -> bool:
        started = self._procs.get(name)
        if started is not None and started.pid == pid:
            # Started by this object: its handle knows (and reaps) it, whatever /proc shows while
            # the kernel is still loading a freshly exec'd binary.
            return started.poll() is None
        # Started by another process (`make cluster-up`): the pid may have been reused after our
        # process ended, so check it still runs our binary. An empty cmdline is a process still
        # being exec'd (state D), which counts as ours.
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        zombie = stat.rsplit(")", 1)[1].split()[0] == "Z"
        if zombie:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
            return False
        return cmdline in (b"", str(self.bin_dir / name).encode())

    def _wait(self, component: str, deadline: float, ready: Callable[[], bool], what: str = "ready") -> None:
        log = self.logs / f"{component}.log"
        while time.monotonic() < deadline:
            pid = self._load_state()["pids"].get(component)
            if pid is not None and not self._is_ours(component, pid):
                raise ClusterError(f"{component} exited during start-up; see {log}")
            with contextlib.suppress(Exception):
                if ready():
                    return
            time.sleep(0.2)
        raise ClusterError(f"{component} not {what} in time; see {log}")

    def _https_ok(self, pki: CertPaths | None, port: int, path: str) -> bool:
        if pki is None:
            # Controller-manager and scheduler serve self-signed certificates; /healthz is open.
            ctx = ssl._create_unverified_context()
        else:
            ctx = ssl.create_default_context(cafile=str(pki.ca_cert))
            ctx.load_cert_chain(str(pki.admin_cert), str(pki.admin_key))
        try:
            with urllib.request.urlopen(f"https://127.0.0.1:{port}{path}", timeout=2, context=ctx) as resp:
                return bool(resp.status == 200)
        except urllib.error.HTTPError:
            return False

    def add_nodes(self, nodes: Sequence[FakeNode]) -> None:
        """Create kwok nodes (kwok makes them Ready by itself; a test may add its own)."""
        for node in nodes:
            manifest = node.manifest()
            self.kubectl(
                "apply",
                "--server-side",
                "--field-manager=lmi-local-cluster",
                "-f",
                "-",
                input=json.dumps(manifest),
            )
            # A Node's status is dropped on create by some versions: set it through the subresource.
            status = {"status": manifest["status"]}
            self.kubectl(
                "patch", "node", node.name, "--subresource=status", "--type=merge", "-p", json.dumps(status)
            )

    def _nodes_ready(self) -> bool:
        out = self.kubectl("get", "nodes", "-o", "json").stdout
        items = json.loads(out)["items"]
        ready = {
            n["metadata"]["name"]
            for n in items
            if any(c["type"] == "Ready" and c["status"] == "True" for c in n["status"].get("conditions", []))
        }
        return {n.name for n in self.nodes} <= ready

    def _default_sa(self) -> bool:
        return self.kubectl("get", "serviceaccount", "default", "-n", "default", check=False).returncode == 0

    def _pki_paths(self) -> CertPaths:
        folder = self.workdir / "pki"
        return CertPaths(
            ca_cert=folder / "ca.crt",
            ca_key=folder / "ca.key",
            admin_cert=folder / "admin.crt",
            admin_key=folder / "admin.key",
            sa_key=folder / "sa.key",
            sa_pub=folder / "sa.pub",
        )

    def _write_kubeconfig(self, pki: CertPaths, ports: Ports) -> None:
        def b64(path: Path) -> str:
            return base64.b64encode(path.read_bytes()).decode()

        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "lmi-local",
                    "cluster": {
                        "server": f"https://127.0.0.1:{ports.apiserver}",
                        "certificate-authority-data": b64(pki.ca_cert),
                    },
                }
            ],
            "users": [
                {
                    "name": "admin",
                    "user": {
                        "client-certificate-data": b64(pki.admin_cert),
                        "client-key-data": b64(pki.admin_key),
                    },
                }
            ],
            "contexts": [{"name": "lmi-local", "context": {"cluster": "lmi-local", "user": "admin"}}],
            "current-context": "lmi-local",
        }
        self.kubeconfig.write_text(yaml.safe_dump(config, sort_keys=False))
        self.kubeconfig.chmod(0o600)

    def _load_state(self) -> dict[str, dict[str, int]]:
        state: dict[str, dict[str, int]] = json.loads(self._state.read_text())
        return state

    def _save_state(self, state: dict[str, dict[str, int]]) -> None:
        tmp = self._state.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        tmp.replace(self._state)
