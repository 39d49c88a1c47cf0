"""The local cluster's process bookkeeping: a process the harness started is judged by its handle,
not by /proc (whose cmdline is empty while the kernel still loads a freshly exec'd binary)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from lmi_operator.testing.cluster import LocalCluster


def fake_tools(tmp_path: Path) -> Path:
    """A bin folder whose `etcd` is `sleep` (the harness only spawns and watches it here)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shutil.copy("/bin/sleep", bin_dir / "etcd")
    return bin_dir


def spawned(tmp_path: Path) -> tuple[LocalCluster, int]:
    cluster = LocalCluster(tmp_path / "cluster", fake_tools(tmp_path))
    cluster.workdir.mkdir()
    cluster.logs.mkdir()
    cluster._save_state({"ports": {}, "pids": {}})
    cluster._spawn("etcd", ["300"], detach=False)
    return cluster, cluster.pid("etcd")


def test_a_started_process_with_an_empty_cmdline_is_still_ours(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cluster, pid = spawned(tmp_path)
    real_read = Path.read_bytes

    def loading(path: Path) -> bytes:
        # What /proc shows while the kernel is still loading the binary (state D).
        return b"" if path == Path(f"/proc/{pid}/cmdline") else real_read(path)

    monkeypatch.setattr(Path, "read_bytes", loading)
    try:
        assert cluster.running() == {"etcd": pid}
        # The start-up check reads the same: it must not declare etcd dead.
        cluster._wait("etcd", time.monotonic() + 1, lambda: True)
    finally:
        cluster.stop()
    assert cluster.running() == {}
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_a_process_that_exited_is_not_ours_and_its_start_up_check_fails(tmp_path: Path) -> None:
    cluster, pid = spawned(tmp_path)
    os.kill(pid, signal.SIGKILL)
    # A freshly exited child: its handle reaps it, so the pid is not taken for a live etcd.
    deadline = time.monotonic() + 10
    while cluster.running() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert cluster.running() == {}
    with pytest.raises(Exception, match="etcd exited during start-up"):
        cluster._wait("etcd", time.monotonic() + 5, lambda: False)
    cluster.stop()


def test_a_process_started_elsewhere_is_judged_by_its_cmdline(tmp_path: Path) -> None:
    # `make cluster-up` starts the components in another process: `down` has only the pids.
    cluster, pid = spawned(tmp_path)
    other = LocalCluster(cluster.workdir, cluster.bin_dir)
    assert other.running() == {"etcd": pid}
    stranger = subprocess.Popen(["sleep", "300"])
    # Once exec'd (its cmdline read back), a process running another binary is not ours.
    while not Path(f"/proc/{stranger.pid}/cmdline").read_bytes():
        time.sleep(0.01)
    try:
        assert not other._is_ours("etcd", stranger.pid)
    finally:
        stranger.kill()
        stranger.wait()
    other.stop()
    deadline = time.monotonic() + 10
    while cluster.running() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert cluster.running() == {}


@pytest.mark.cluster
def test_a_cluster_starts_beside_another_while_the_machine_is_loaded(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    # `make cluster-up` while `make test` ran beside it failed 3 of 3 times ("etcd exited during
    # start-up"): start a second cluster while the session's runs and every core is busy.
    burners = [subprocess.Popen(["sh", "-c", "while :; do :; done"]) for _ in range(os.cpu_count() or 2)]
    second = LocalCluster(tmp_path / "second", cluster.bin_dir)
    try:
        second.start()
        assert set(second.running()) == {
            "etcd",
            "kube-apiserver",
            "kube-controller-manager",
            "kube-scheduler",
            "kwok",
        }
        assert cluster.kubectl("get", "--raw", "/readyz").stdout == "ok"
    finally:
        for burner in burners:
            burner.kill()
            burner.wait()
        second.stop()
    assert second.running() == {}
