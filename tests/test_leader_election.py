"""Leader election against the local control plane: the Lease is renewed whatever the workers do."""

from __future__ import annotations

import concurrent.futures
import datetime
import json
import time

from lmi_operator.kube import object_path
from lmi_operator.settings import OperatorSettings
from lmi_operator.testing.cluster import LocalCluster
from lmi_operator.testing.operator import OperatorThread

DURATION = 6  # renew deadline 4 s, a renewal every 1.2 s


def renewed_at(cluster: LocalCluster, namespace: str, name: str) -> datetime.datetime:
    lease = json.loads(cluster.kubectl("get", "lease", name, "-n", namespace, "-o", "json").stdout)
    return datetime.datetime.fromisoformat(lease["spec"]["renewTime"].replace("Z", "+00:00"))


def test_the_lease_is_renewed_while_every_connection_of_the_workers_is_busy(
    cluster: LocalCluster, lmi_crd: str, namespace: str
) -> None:
    """A burst holds every pooled connection of the reconcile workers' client (here: long watches
    filling the pool); the renewals do not queue behind them, so the leader keeps the Lease instead
    of stepping down mid-burst (what 48 workers and 200 new models did before the elector had a
    client of its own)."""
    settings = OperatorSettings(
        leader_election=True,
        lease_namespace=namespace,
        lease_name="busy",
        lease_duration_seconds=DURATION,
        identity="busy-0",
        metrics_port=0,
        health_port=0,
        namespaces=[namespace],
    )
    running = OperatorThread(cluster.kubeconfig, settings).start()
    held: list[concurrent.futures.Future[None]] = []
    try:
        assert running.reconciler is not None
        client = running.reconciler.client
        path = object_path("v1", "ConfigMap", namespace)

        async def hold() -> None:
            async for _ in client.watch(path, timeoutSeconds="30"):
                pass

        held += [running.submit(hold()) for _ in range(64)]
        time.sleep(1.0)
        before = renewed_at(cluster, namespace, "busy")
        time.sleep(2 * DURATION)
        after = renewed_at(cluster, namespace, "busy")
        assert running.error is None, f"the leader stepped down: {running.error!r}"
        assert after - before >= datetime.timedelta(seconds=DURATION), (before, after)
        # The workers' pool was full the whole time: the watches were still open.
        assert not any(h.done() for h in held)
    finally:
        for h in held:
            h.cancel()
        running.stop()
