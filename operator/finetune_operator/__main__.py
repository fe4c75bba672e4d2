"""`python -m finetune_operator` / `finetune-operator`: serve probes, win the lease, then run kopf and the reconciler.

Exit codes: 0 after SIGTERM/SIGINT, 1 when the lease was lost or kopf stopped on its own (the pod restarts and comes
back as a standby), 2 for invalid settings or any command-line argument but --help and --version.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys

import kopf

from finetune_operator import __version__, handlers, kinds, logs
from finetune_operator.controller import Controller
from finetune_operator.k8s import Kube
from finetune_operator.leader import LeaderElector
from finetune_operator.metrics import Metrics
from finetune_operator.progress_server import health_app, metrics_app, progress_app, serve
from finetune_operator.settings import Settings, SettingsError

log = logging.getLogger("finetune_operator")

DESCRIPTION = """Runs the FineTuneJob operator. It takes no arguments: it is configured through environment variables
(see operator/README.md):
  FINETUNE_NAMESPACES, FINETUNE_TRAINER_IMAGE, FINETUNE_ALLOWED_REGISTRIES, FINETUNE_METRICS_PORT,
  FINETUNE_HEALTH_PORT, FINETUNE_PROGRESS_PORT, FINETUNE_PROGRESS_URL, FINETUNE_PROGRESS_KEY(_FILE),
  FINETUNE_LOG_LEVEL, FINETUNE_LOG_FORMAT, FINETUNE_PEERING, FINETUNE_RESYNC_SECONDS, FINETUNE_WORKERS,
  FINETUNE_LEADER_ELECTION, FINETUNE_LEASE_NAME, FINETUNE_LEASE_NAMESPACE, FINETUNE_LEASE_DURATION_SECONDS,
  FINETUNE_GRACE_PERIOD_SECONDS,
  FINETUNE_BIND_ADDRESS, FINETUNE_STATUS_SETTLE_SECONDS, FINETUNE_START_TIMEOUT_SECONDS, FINETUNE_KUEUE
"""


async def integrations(settings: Settings, kube: Kube) -> frozenset[str]:
    """The integrations whose kinds are watched: Kueue's Workloads when FINETUNE_KUEUE is auto and the API serves
    them now. Without them the operator runs as before (Kueue-labelled Jobs are reported Queued until they run);
    installing Kueue later needs an operator restart, said once here rather than by a failing watch."""
    if settings.kueue == "false":
        return frozenset()
    workload = kinds.by_kind("Workload")
    if await kube.serves(workload):
        log.info("Kueue's %s %s are served: watching them", workload.api_version, workload.plural)
        return frozenset({kinds.KUEUE})
    log.warning("FINETUNE_KUEUE is auto but the API serves no %s %s: Kueue is not installed (or an older version); "
                "running without Workloads (restart the operator after installing Kueue)", workload.api_version,
                workload.plural)
    return frozenset()


async def _lead(settings: Settings, kube: Kube, controller: Controller, stop: asyncio.Event,
                kopf_ready: asyncio.Event, elector: LeaderElector | None) -> int:
    """As the leader: run kopf (and through it the controller) until a stop signal, a lost lease or kopf's own end.
    Returns the exit code."""
    loop = asyncio.get_running_loop()
    kopf_stop = asyncio.Event()
    operator = asyncio.create_task(kopf.operator(
        registry=handlers.registry(await integrations(settings, kube)),
        memo=kopf.Memo(controller=controller),
        standalone=not settings.peering,
        peering_name=settings.peering or None,
        clusterwide=settings.clusterwide,
        namespaces=list(settings.namespaces),
        stop_flag=kopf_stop,
        ready_flag=kopf_ready,
    ), name="kopf")

    async def reclaim_signals() -> None:
        # kopf installs its own SIGTERM/SIGINT handlers when it starts; route them back through `stop`.
        await kopf_ready.wait()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)

    waiters = [asyncio.create_task(stop.wait(), name="stop-signal"), operator,
               asyncio.create_task(reclaim_signals(), name="reclaim-signals")]
    if elector is not None:
        waiters.append(asyncio.create_task(elector.lost.wait(), name="lease-lost"))
    code = 0
    done, _ = await asyncio.wait(waiters[:2] + waiters[3:], return_when=asyncio.FIRST_COMPLETED)
    if operator in done:
        code = 0 if stop.is_set() else 1
        if operator.exception() is not None:
            log.error("kopf stopped: %r", operator.exception())
    elif elector is not None and elector.lost.is_set():
        code = 1
    kopf_stop.set()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await asyncio.wait_for(operator, 30)
    for w in waiters:
        w.cancel()
    return code


async def run(settings: Settings) -> int:
    metrics = Metrics()
    kube = Kube(metrics)
    controller = Controller(settings, kube, metrics)
    stop = asyncio.Event()
    kopf_ready = asyncio.Event()
    leading = False
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    def ready() -> bool:
        return leading and kopf_ready.is_set()

    runners = [
        await serve(health_app(lambda: True, ready), settings.bind_address, settings.health_port),
        await serve(metrics_app(metrics), settings.bind_address, settings.metrics_port),
        await serve(progress_app(controller.accept_report, ready), settings.bind_address, settings.progress_port),
    ]
    elector: LeaderElector | None = None
    try:
        await kube.start()
        if settings.leader_election:
            elector = LeaderElector(kube, settings.lease_namespace, settings.lease_name, settings.lease_seconds)
            if not await elector.acquire(stop):
                return 0
            kube.write_guard = elector.holds
        leading = True
        metrics.leader.set(1)
        code = await _lead(settings, kube, controller, stop, kopf_ready, elector)
    finally:
        metrics.leader.set(0)
        await controller.stop()
        if elector is not None and leading:
            await elector.release()
        for runner in runners:
            await runner.cleanup()
        await kube.close()
    return code


def parse_args(argv: list[str]) -> None:
    """Only --help and --version: anything else is a mistake (exit 2 with usage), never a cluster-wide start."""
    parser = argparse.ArgumentParser(prog="finetune-operator", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"finetune-operator {__version__}")
    parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    parse_args(sys.argv[1:] if argv is None else argv)
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        print(f"finetune-operator: {exc}", file=sys.stderr)
        return 2
    logs.configure(settings.log_level, settings.log_format)
    if settings.progress_key_ephemeral:
        log.warning("FINETUNE_PROGRESS_KEY(_FILE) is not set: using a random key for this process only; progress "
                    "tokens of jobs created before a restart will be rejected")
    scope = ",".join(settings.namespaces) or "all namespaces"
    log.info("starting: watching %s, trainer image %s, progress URL %s", scope, settings.trainer_image,
             settings.progress_url)
    return asyncio.run(run(settings))


if __name__ == "__main__":
    raise SystemExit(main())
