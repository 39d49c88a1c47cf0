"""A real node for the local cluster: containerd with runc, a CNI bridge, the pinned kubelet and
kube-proxy, so that pods asking for no GPU (model servers on vLLM for CPU, the operator installed by
its chart) run real containers beside kwok's nodes, and reach Services (the API server's among them).

What runs where (docs/e2e.md): containerd keeps its content and snapshots under the image cache
outside the clone (an imported image costs its import once per machine) and its sockets and state
under the cluster's folder; the kubelet's root, certificates and the CNI allocations live in the
cluster's folder too. Pods get addresses on a bridge that only this machine has; the bridge's
gateway address is the node's InternalIP, where the kubelet listens, so the API server reaches it
for logs, exec and port-forward. One real node runs on a machine at a time (a lock says who).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import IO, Any

import yaml

from lmi_operator.testing.images import Image, ImageBuilder, image_cache_dir
from lmi_operator.testing.processes import die_with_parent, free_port, http_ok

NODE_NAME = "cpu-node"
# The taint and label that keep every pod off this node but those meant for it (CPU model servers).
TAINT_KEY = "lmi.dev/real-node"
NODE_LABEL = "lmi.dev/real-node"
BRIDGE = "lmibr0"
SUBNET = "10.89.0.0/24"
NODE_IP = "10.89.0.1"
CGROUP_ROOT = "lmi-node"
CNI_BIN = Path("/usr/lib/cni")
PAUSE_DIR = Path(__file__).resolve().parents[3] / "tools" / "images" / "pause"


class NodeError(RuntimeError):
    """The real node could not start; the message names the component and its log."""


def tolerations() -> list[dict[str, str]]:
    """What a pod meant for the real node tolerates."""
    return [{"key": TAINT_KEY, "operator": "Exists", "effect": "NoSchedule"}]


def node_selector() -> dict[str, str]:
    """What pins a pod to the real node."""
    return {NODE_LABEL: "true"}


def missing_packages() -> list[str]:
    """The host programs the node needs that are not installed (empty when it can start)."""
    need = {"containerd": "containerd", "runc": "runc", "ip": "iproute2", "debootstrap": "debootstrap"}
    missing = [pkg for program, pkg in need.items() if shutil.which(program) is None]
    if not (CNI_BIN / "bridge").exists():
        missing.append("containernetworking-plugins")
    return missing


class RealNode:
    """containerd + kubelet + CNI bridge registered as `cpu-node` in a LocalCluster rooted in
    `workdir`. `start()` waits for the Node to be Ready; `stop()` removes every pod's containers,
    mounts and network namespace, then the daemons and the bridge."""

    def __init__(self, workdir: Path, bin_dir: Path, kubeconfig: Path, kubelet_port: int) -> None:
        self.workdir = workdir
        self.bin_dir = bin_dir
        self.kubeconfig = kubeconfig
        self.kubelet_port = kubelet_port
        self.store = image_cache_dir().parent / "containerd"
        self.socket = workdir / "containerd" / "containerd.sock"
        self.logs = workdir / "logs"
        self._proxy_health = free_port()
        self._lock: IO[str] | None = None
        self._procs: dict[str, subprocess.Popen[bytes]] = {}

    # -- public API ---------------------------------------------------------------------------

    def start(self, timeout: float = 120.0) -> None:
        """Start containerd, import the pause image, start the kubelet, wait for the Node Ready."""
        if missing := missing_packages():
            raise NodeError(f"the real node needs Debian's {', '.join(missing)}: run `make node-deps`")
        self._take_lock()
        try:
            self._clean_leftovers()
            self._bridge_up()
            self._write_cni()
            pause = self._pause_image()
            self._spawn("containerd", ["containerd", "--config", str(self._containerd_config(pause))])
            self._wait("containerd", time.monotonic() + 60, lambda: self.ctr("version").returncode == 0)
            self.import_image(pause)
            _make_cgroup_root()
            self._spawn("kubelet", [str(self.bin_dir / "kubelet"), *self._kubelet_args()])
            self._wait("kubelet", time.monotonic() + timeout, self._node_ready, "Ready")
            self._spawn("kube-proxy", [str(self.bin_dir / "kube-proxy"), *self._proxy_args()])
            self._wait(
                "kube-proxy",
                time.monotonic() + 60,
                lambda: http_ok(f"http://127.0.0.1:{self._proxy_health}/healthz"),
                "done syncing Services",
            )
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop the kubelet, kill and remove every container, then containerd; release the lock.
        A node that never took the lock has nothing to stop (and must not touch another's)."""
        if self._lock is None:
            return
        self._end("kube-proxy")
        self._end("kubelet")
        self._kill_pod_processes()
        if "containerd" in self._procs:
            for task in self._ctr_ids("tasks", "ls", "-q"):
                self.ctr("tasks", "delete", "--force", task)
            for container in self._ctr_ids("containers", "ls", "-q"):
                self.ctr("containers", "delete", container)
        self._end("containerd")
        self._clean_leftovers()
        self._lock.close()
        self._lock = None

    def import_image(self, image: Image) -> str:
        """Make `image` available to pods (a no-op when the node has it); returns its reference."""
        if self._ctr_ids("images", "ls", "-q", f"name=={image.reference}"):
            return image.reference
        started = time.monotonic()
        present = set(self._ctr_ids("content", "ls", "-q"))
        size = sum(layer.tar.stat().st_size for layer in image.layers if layer.digest not in present) / 2**30
        print(f"[node] importing {image.reference} ({size:.1f} GiB new) into containerd", flush=True)
        proc = subprocess.Popen(
            self._ctr_argv("images", "import", "--no-unpack=false", "-"),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        assert proc.stdin is not None and proc.stdout is not None
        with contextlib.suppress(BrokenPipeError), proc.stdin:
            image.write_oci_archive(proc.stdin, present)
        # ctr says little (a line per image), so reading after the stream cannot block it.
        out = proc.stdout.read().decode(errors="replace")
        proc.wait()
        if proc.returncode != 0 or not self._ctr_ids("images", "ls", "-q", f"name=={image.reference}"):
            raise NodeError(f"ctr images import {image.reference} failed: {out[-2000:]}")
        print(f"[node] imported {image.reference} in {time.monotonic() - started:.0f} s", flush=True)
        return image.reference

    def ctr(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run `ctr` against this node's containerd in the kubelet's namespace."""
        return subprocess.run(self._ctr_argv(*args), capture_output=True, text=True, timeout=120)

    # -- set-up ---------------------------------------------------------------------------------

    def _ctr_argv(self, *args: str) -> list[str]:
        return ["ctr", "--address", str(self.socket), "--namespace", "k8s.io", *args]

    def _ctr_ids(self, *args: str) -> list[str]:
        proc = self.ctr(*args)
        return proc.stdout.split() if proc.returncode == 0 else []

    def _take_lock(self) -> None:
        self.store.mkdir(parents=True, exist_ok=True)
        lock = (self.store / "node.lock").open("w")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            holder = (self.store / "node.owner").read_text() if (self.store / "node.owner").exists() else "?"
            raise NodeError(f"another real node runs on this machine ({holder}); stop it first") from None
        (self.store / "node.owner").write_text(f"pid {os.getpid()}, cluster {self.workdir}\n")
        self._lock = lock

    def _bridge_up(self) -> None:
        # Made here (not by the CNI plugin on the first pod) so the kubelet can listen on its address.
        _ip("link", "add", BRIDGE, "type", "bridge")
        _ip("addr", "add", f"{NODE_IP}/24", "dev", BRIDGE)
        _ip("link", "set", BRIDGE, "up")

    def _write_cni(self) -> None:
        conf_dir = self.workdir / "cni" / "net.d"
        conf_dir.mkdir(parents=True, exist_ok=True)
        conf = {
            "cniVersion": "1.0.0",
            "name": "lmi-local",
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": BRIDGE,
                    "isGateway": True,
                    # A default route through the bridge: Services' cluster IPs (the API server's
                    # among them) are routed by the node, where kube-proxy translates them.
                    "isDefaultGateway": True,
                    "ipMasq": False,
                    "hairpinMode": True,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": SUBNET, "gateway": NODE_IP}]],
                        "dataDir": str(self.workdir / "cni" / "ipam"),
                    },
                }
            ],
        }
        (conf_dir / "10-lmi.conflist").write_text(json.dumps(conf, indent=2))

    def _containerd_config(self, pause: Image) -> Path:
        state = self.workdir / "containerd"
        state.mkdir(parents=True, exist_ok=True)
        cri = 'plugins."io.containerd.grpc.v1.cri"'
        config = f"""version = 2
root = "{self.store / "root"}"
state = "{state / "state"}"
[grpc]
  address = "{self.socket}"
[ttrpc]
  address = "{self.socket}.ttrpc"
[{cri}]
  sandbox_image = "{pause.reference}"
  # Root here lacks CAP_SYS_RESOURCE: runc cannot lower oom_score_adj below the parent's.
  restrict_oom_score_adj = true
  disable_apparmor = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [{cri}.containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [{cri}.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [{cri}.containerd.runtimes.runc.options]
        SystemdCgroup = false
  [{cri}.cni]
    bin_dir = "{CNI_BIN}"
    conf_dir = "{self.workdir / "cni" / "net.d"}"
[plugins."io.containerd.internal.v1.opt"]
  path = "{state / "opt"}"
"""
        path = state / "config.toml"
        path.write_text(config)
        return path

    def _pause_image(self) -> Image:
        with tempfile.TemporaryDirectory() as context:
            shutil.copy(PAUSE_DIR / "Dockerfile", Path(context) / "Dockerfile")
            pause = Path(context) / "pause"
            subprocess.run(
                ["gcc", "-static", "-Os", "-o", str(pause), str(PAUSE_DIR / "pause.c")],
                check=True,
                capture_output=True,
            )
            # A static binary from the same source is the same bytes: the layer cache hits.
            return ImageBuilder().build(Path(context) / "Dockerfile", Path(context), "lmi/pause:local")

    def _kubelet_args(self) -> list[str]:
        root = self.workdir / "kubelet"
        root.mkdir(parents=True, exist_ok=True)
        config: dict[str, Any] = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "address": NODE_IP,
            "port": self.kubelet_port,
            "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1",
            "healthzPort": 0,
            # Local only: the API server's requests (logs, exec, port-forward) are not authenticated.
            "authentication": {"anonymous": {"enabled": True}, "webhook": {"enabled": False}},
            "authorization": {"mode": "AlwaysAllow"},
            # This kernel mounts cgroup v1 hierarchies; systemd does not manage them here.
            "failCgroupV1": False,
            "cgroupDriver": "cgroupfs",
            "cgroupRoot": f"/{CGROUP_ROOT}",
            "failSwapOn": False,
            "containerRuntimeEndpoint": f"unix://{self.socket}",
            "registerWithTaints": [{"key": TAINT_KEY, "value": "true", "effect": "NoSchedule"}],
            # The machine's disk is shared with everything else: never evict for it, never collect
            # the imported images (they cannot be pulled back).
            "evictionHard": {
                "memory.available": "100Mi",
                "nodefs.available": "1%",
                "imagefs.available": "1%",
            },
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "makeIPTablesUtilChains": False,
            "serializeImagePulls": False,
            "maxPods": 30,
            "resolvConf": "/etc/resolv.conf",
        }
        path = root / "config.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return [
            f"--config={path}",
            f"--kubeconfig={self.kubeconfig}",
            f"--hostname-override={NODE_NAME}",
            f"--node-ip={NODE_IP}",
            f"--node-labels={NODE_LABEL}=true",
            f"--root-dir={root}",
            f"--cert-dir={root / 'pki'}",
            "--v=1",
        ]

    def _proxy_args(self) -> list[str]:
        # iptables mode: Services' cluster IPs are DNATed to pod (or API server) addresses for
        # traffic from pods and from this machine alike.
        return [
            f"--kubeconfig={self.kubeconfig}",
            f"--hostname-override={NODE_NAME}",
            "--proxy-mode=iptables",
            f"--cluster-cidr={SUBNET}",
            f"--healthz-bind-address=127.0.0.1:{self._proxy_health}",
            "--metrics-bind-address=",
            # The machine's conntrack table and localhost routing are not this node's to change.
            "--conntrack-max-per-core=0",
            "--iptables-localhost-nodeports=false",
            f"--nodeport-addresses={NODE_IP}/32",
            "--v=1",
        ]

    def _spawn(self, name: str, argv: list[str]) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        with (self.logs / f"{name}.log").open("ab") as log:
            self._procs[name] = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=die_with_parent,
            )

    def _wait(self, name: str, deadline: float, ready: Any, what: str = "ready") -> None:
        while time.monotonic() < deadline:
            if self._procs[name].poll() is not None:
                raise NodeError(f"{name} exited during start-up; see {self.logs / f'{name}.log'}")
            with contextlib.suppress(Exception):
                if ready():
                    return
            time.sleep(0.5)
        raise NodeError(f"{name} not {what} in time; see {self.logs / f'{name}.log'}")

    def _node_ready(self) -> bool:
        proc = subprocess.run(
            [
                str(self.bin_dir / "kubectl"),
                "--kubeconfig",
                str(self.kubeconfig),
                "get",
                "node",
                NODE_NAME,
                "-o",
                "jsonpath={.status.conditions[?(@.type=='Ready')].status}",
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
        return proc.stdout.strip() == "True"

    # -- tear-down ------------------------------------------------------------------------------

    def _end(self, name: str, grace: float = 10.0) -> None:
        proc = self._procs.pop(name, None)
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def _kill_pod_processes(self) -> None:
        # Every process of every pod lives in a cgroup under the kubelet's cgroup root.
        for tasks in Path("/sys/fs/cgroup/pids").glob(f"{CGROUP_ROOT}/**/cgroup.procs"):
            for pid in tasks.read_text().split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)

    def _clean_leftovers(self) -> None:
        """Undo what a node left behind (also one that crashed): pod processes, shims of this
        machine's node store, mounts under the store and the workdir, pod netns, the bridge."""
        self._kill_pod_processes()
        for pid in _pids_with_arg(str(self.store / "root")) + _pids_with_arg("containerd-shim-runc-v2"):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        roots = (str(self.store), str(self.workdir))
        mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
        for mount in sorted((m for m in mounts if m.startswith(roots)), key=len, reverse=True):
            subprocess.run(["umount", "-l", mount], capture_output=True)
        netns = Path("/run/netns")
        for ns in netns.glob("cni-*") if netns.exists() else ():
            subprocess.run(["ip", "netns", "delete", ns.name], capture_output=True)
        subprocess.run(["ip", "link", "delete", BRIDGE], capture_output=True)
        # kube-proxy's Service rules outlive it; its own clean-up removes exactly its chains.
        subprocess.run([str(self.bin_dir / "kube-proxy"), "--cleanup"], capture_output=True)
        for ctrl in Path("/sys/fs/cgroup").iterdir():
            for group in sorted(ctrl.glob(f"{CGROUP_ROOT}/**/"), key=lambda p: len(str(p)), reverse=True):
                with contextlib.suppress(OSError):
                    group.rmdir()
        shutil.rmtree(self.workdir / "cni", ignore_errors=True)


def _make_cgroup_root() -> None:
    """The kubelet's cgroup root must exist in every v1 hierarchy before it starts."""
    for ctrl in Path("/sys/fs/cgroup").iterdir():
        group = ctrl / CGROUP_ROOT
        if ctrl.is_dir() and not group.exists():
            group.mkdir()
            # A cpuset group takes no task until it has CPUs and memory nodes: the parent's.
            for knob in ("cpuset.cpus", "cpuset.mems"):
                if (ctrl / knob).exists():
                    (group / knob).write_text((ctrl / knob).read_text())


def _ip(*args: str) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise NodeError(f"ip {' '.join(args)}: {proc.stderr.strip()}")


def _pids_with_arg(needle: str) -> list[int]:
    out = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError):
                if needle.encode() in (proc / "cmdline").read_bytes():
                    out.append(int(proc.name))
    return [pid for pid in out if pid != os.getpid()]
