"""The operator as a real child process (`lmi-operator run`), for tests that SIGKILL it, run two of
it, or read its whole log: metrics and health on free ports, stdout and stderr into one file."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from lmi_operator.testing.processes import free_port

REPO_ROOT = Path(__file__).resolve().parents[1]
# The console script's own code path (`lmi-operator run`), with logging set to INFO first: the
# entry point configures no logging, so without this only WARNING and above would be seen.
LAUNCH = (
    "import logging, sys; "
    "logging.basicConfig(level=logging.INFO, stream=sys.stderr, "
    "format='%(asctime)s %(levelname)s %(name)s [%(threadName)s] %(message)s'); "
    "from lmi_operator.cli import main; sys.exit(main(['run']))"
)


def _die_with_parent() -> None:
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class OperatorProcess:
    """One `lmi-operator run` process; `env` adds or overrides LMI_OPERATOR_* settings."""

    def __init__(self, kubeconfig: Path, log_path: Path, identity: str, env: dict[str, str]) -> None:
        self.kubeconfig = kubeconfig
        self.log_path = log_path
        self.identity = identity
        self.metrics_port = free_port()
        self.health_port = free_port()
        self.env = {
            "LMI_OPERATOR_IDENTITY": identity,
            "LMI_OPERATOR_METRICS_PORT": str(self.metrics_port),
            "LMI_OPERATOR_HEALTH_PORT": str(self.health_port),
        } | env
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> OperatorProcess:
        base = {k: v for k, v in os.environ.items() if not k.startswith("LMI_OPERATOR_")}
        env = base | {"KUBECONFIG": str(self.kubeconfig), "PYTHONUNBUFFERED": "1"} | self.env
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", LAUNCH],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=REPO_ROOT,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self, sig: int = signal.SIGKILL, timeout: float = 30.0) -> int | None:
        """Send `sig` and wait for the exit; returns the exit status."""
        if self.proc is None:
            return None
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def metrics(self) -> dict[str, float]:
        """The Prometheus samples, by their full name with labels ({} if not serving yet)."""
        try:
            url = f"http://127.0.0.1:{self.metrics_port}/metrics"
            with urllib.request.urlopen(url, timeout=2) as resp:
                text = resp.read().decode()
        except OSError:
            return {}
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out

    def writes(self) -> dict[str, float]:
        """lmi_operator_api_writes_total by kind."""
        prefix = 'lmi_operator_api_writes_total{kind="'
        return {k[len(prefix) : -2]: v for k, v in self.metrics().items() if k.startswith(prefix)}

    def total_writes(self) -> float:
        return sum(self.writes().values())

    def is_leader(self) -> bool:
        return self.metrics().get("lmi_operator_leader") == 1.0

    def healthy(self) -> bool:
        try:
            url = f"http://127.0.0.1:{self.health_port}/healthz"
            with urllib.request.urlopen(url, timeout=2) as resp:
                return bool(resp.status == 200)
        except OSError:
            return False

    def health_role(self) -> str | None:
        """The role /healthz reports (standby or leader), None when it does not answer 200."""
        try:
            url = f"http://127.0.0.1:{self.health_port}/healthz"
            with urllib.request.urlopen(url, timeout=2) as resp:
                return str(json.loads(resp.read())["role"])
        except OSError:
            return None

    def cpu_seconds(self) -> float:
        """User + system CPU time of the process so far."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Wait until /healthz answers (kopf runs, so this replica leads) or the process died."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise AssertionError(f"operator {self.identity} exited: {self.log()[-3000:]}")
            if self.healthy():
                return
            time.sleep(0.2)
        raise AssertionError(f"operator {self.identity} not healthy in {timeout}s: {self.log()[-3000:]}")
