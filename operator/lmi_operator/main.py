"""`lmi-operator run`: leader election, metrics, then kopf and the reconcile workers until stopped."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Callable

import kopf

from lmi_operator import metrics
from lmi_operator.handlers import build
from lmi_operator.health import Health
from lmi_operator.kube import KubeClient, load_credentials
from lmi_operator.lease import LeaderElector, LeaseConfig
from lmi_operator.reconciler import Reconciler
from lmi_operator.settings import OperatorSettings

log = logging.getLogger("lmi_operator")


class LeadershipLost(RuntimeError):
    """The Lease was lost: exit so that the process restarts as a follower."""


async def run_operator(
    settings: OperatorSettings,
    kubeconfig: str | None = None,
    stop: asyncio.Event | None = None,
    ready: asyncio.Event | None = None,
    on_start: Callable[[Reconciler], None] | None = None,
    count_paths: bool = False,
) -> Reconciler:
    """Run until `stop` is set (or SIGTERM/SIGINT); returns the reconciler (its counters) at the end.
    Raises LeadershipLost when another replica took the Lease. `count_paths`: count requests by path
    (KubeClient.requests_by_path), for tests."""
    creds = load_credentials(kubeconfig)
    client = KubeClient(creds, count_paths=count_paths)
    stop = stop or asyncio.Event()
    lost = asyncio.Event()
    elector: LeaderElector | None = None
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(RuntimeError, ValueError):  # not the main thread (tests)
            loop.add_signal_handler(sig, stop.set)
    health = Health(settings.stall_seconds)
    stop_health = await health.serve(settings.health_port) if settings.health_port else None
    try:
        if settings.leader_election:
            elector = LeaderElector(
                # Its own connections: a burst of reconciles fills the workers' pool, and a renewal
                # queued behind it missed the renew deadline (tests/test_leader_election.py).
                KubeClient(creds),
                LeaseConfig(
                    namespace=settings.lease_namespace or creds.namespace,
                    name=settings.lease_name,
                    identity=settings.identity,
                    duration=settings.lease_duration_seconds,
                    # client-go's proportions: 15 s Lease, 10 s renew deadline, 2 s retry period.
                    renew_deadline=settings.lease_duration_seconds * 2 / 3,
                    retry_period=min(2.0, settings.lease_duration_seconds / 5),
                ),
            )
            acquiring = asyncio.create_task(elector.acquire())
            stopping = asyncio.create_task(stop.wait())
            await asyncio.wait({acquiring, stopping}, return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            if not acquiring.done():
                acquiring.cancel()
                return Reconciler(client, settings)
            metrics.LEADER.set(1)
            client.write_guard = elector.leading

        reconciler = Reconciler(client, settings)
        health.reconciler = reconciler
        if on_start is not None:
            on_start(reconciler)
        registry, kopf_settings = build(reconciler, creds)
        kopf_stop: asyncio.Future[None] = loop.create_future()
        tasks = [
            asyncio.create_task(reconciler.run(), name="reconcile-workers"),
            asyncio.create_task(
                kopf.operator(
                    registry=registry,
                    settings=kopf_settings,
                    standalone=True,
                    # kopf would derive it from the user name, which a container's arbitrary UID
                    # (the chart's 65532, OpenShift's random ones) does not have: getpwuid fails.
                    # kopf types it as a NewType of str that its package does not export.
                    identity=settings.identity,  # type: ignore[arg-type]
                    clusterwide=not settings.namespaces,
                    namespaces=settings.namespaces,
                    stop_flag=kopf_stop,
                    ready_flag=ready,
                ),
                name="kopf",
            ),
        ]
        if elector is not None:
            tasks.append(asyncio.create_task(elector.keep(lost.set), name="lease"))
        waiters = [asyncio.create_task(stop.wait()), asyncio.create_task(lost.wait())]
        done, _ = await asyncio.wait([*tasks, *waiters], return_when=asyncio.FIRST_COMPLETED)
        if not kopf_stop.done():
            kopf_stop.set_result(None)
        for task in [*tasks, *waiters]:
            if task.get_name() != "kopf":
                task.cancel()
        with contextlib.suppress(asyncio.CancelledError, asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), timeout=10)
        for task in done:
            if task in tasks and not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
        if lost.is_set():
            raise LeadershipLost(f"lease {settings.lease_name} lost by {settings.identity}")
        return reconciler
    finally:
        metrics.LEADER.set(0)
        if stop_health is not None:
            await stop_health()
        if elector is not None:
            if not lost.is_set():
                with contextlib.suppress(Exception):
                    await elector.release()
            await elector.client.close()
        await client.close()


def main(kubeconfig: str | None = None) -> int:
    """Entry point of `lmi-operator run`: exit code 0 on a clean stop, 1 when leadership was lost."""
    try:
        settings = OperatorSettings.from_env()
        load_credentials(kubeconfig)
    except (ValueError, OSError, KeyError, StopIteration) as err:
        # Bad settings or credentials: one clear line, no traceback.
        print(f"error: cannot start: {err or type(err).__name__}", file=sys.stderr)
        return 2
    kopf.configure(log_format=kopf.LogFormat[settings.log_format.upper()])
    if settings.metrics_port:
        metrics.serve(settings.metrics_port)
    try:
        asyncio.run(run_operator(settings, kubeconfig))
    except LeadershipLost as err:
        log.error("%s; exiting", err)
        return 1
    return 0
