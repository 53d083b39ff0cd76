"""The worker process: workflows, activities, and this host's own activity queue."""
from __future__ import annotations

import asyncio
import logging
import signal
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

from temporalio.client import Client
from temporalio.worker import UnsandboxedWorkflowRunner, Worker

from common.config import Settings
from common.db import Database
from workers.activities import StandbyActivities
from workers.exit_watch import unstick, watch_exits
from workers.host import heartbeat_forever, host_info, join_pool, record_host
from workers.log_rotation import rotate_forever
from workers.reaper import reap
from workers.usage import UsageSampler
from workflows.endpoint import EndpointWorkflow
from workflows.gpu_pool import GpuPoolWorkflow
from workflows.instance import InstanceWorkflow
from workflows.pool import PoolWorkflow
from workflows.rollout import RolloutWorkflow

log = logging.getLogger(__name__)
STICKY_TIMEOUT_SECONDS = 1.0
# GpuPoolWorkflow: the per-host GPU queue of instances started before pools (workflows/gpu_pool.py).
WORKFLOWS = [EndpointWorkflow, InstanceWorkflow, PoolWorkflow, GpuPoolWorkflow, RolloutWorkflow]


def serve_metrics(settings: Settings) -> None:
    """Prometheus text at http://<bind>:STANDBY_WORKER_METRICS_PORT/metrics (0: off): instances'
    CPU, memory and GPU use, cold starts. A port in use is logged, not fatal: the worker's job
    is its instances."""
    from prometheus_client import start_http_server

    if settings.worker_metrics_port <= 0:
        return
    try:
        start_http_server(settings.worker_metrics_port, addr=settings.bind)
        log.info("worker metrics on http://%s:%d/metrics", settings.bind, settings.worker_metrics_port)
    except OSError as err:
        log.warning("worker metrics not served on port %d (%s); set STANDBY_WORKER_METRICS_PORT",
                    settings.worker_metrics_port, err)


async def connect(settings: Settings) -> Client:
    return await Client.connect(settings.temporal_target, namespace=settings.temporal_namespace)


async def run_worker(settings: Settings, stop: asyncio.Event | None = None, *, stop_instances_on_exit: bool = False,
                     client: Client | None = None) -> None:
    from workers.backends import make_backend

    from workers.isolation import harden_data_dir

    client = client or await connect(settings)
    db = Database(settings.database_url)
    harden_data_dir(settings)  # before the first instance starts (README.md "Instance isolation")
    backend = make_backend(settings)
    isolation = getattr(backend, "isolation", None)
    if isolation is not None:
        if isolation.uids is not None:
            log.info("instances run as uids %d-%d of their own", isolation.uids.start, isolation.uids.stop - 1)
        else:
            log.warning("instances run as the worker's own user: %s (README.md \"Instance isolation\")",
                        isolation.reason)
    reap(settings, db, backend)
    if settings.backend == "process":
        # Checked once per process: now, not on the first fixed-port start a client waits for.
        from workers.ports import namespace_mode

        await asyncio.to_thread(namespace_mode)
    info, gpus = host_info(settings)
    record_host(db, info, gpus)
    await join_pool(client, settings, info)
    survivors = backend.running_endpoints()
    if survivors:
        unstuck = await unstick(client, settings.temporal_namespace, survivors)
        log.info("took over %d running instance(s); %d workflow(s) unstuck from the previous worker",
                 len(survivors), unstuck)
    acts = StandbyActivities(settings, db, backend, client)
    serve_metrics(settings)
    stop = stop or asyncio.Event()
    with ThreadPoolExecutor(max_workers=64, thread_name_prefix="activity") as pool:
        main = Worker(client, task_queue=settings.task_queue, workflows=WORKFLOWS, activities=acts.all(),
                      activity_executor=pool, max_concurrent_activities=64,
                      workflow_runner=UnsandboxedWorkflowRunner(),
                      # After a worker crash, its workflows' next tasks wait this long on the dead
                      # worker's sticky queue before any worker takes them (default 10 s): the
                      # endpoints' view of their instances converges within seconds of a restart.
                      sticky_queue_schedule_to_start_timeout=timedelta(seconds=STICKY_TIMEOUT_SECONDS))
        host = Worker(client, task_queue=settings.host_task_queue, activities=acts.host_bound(),
                      activity_executor=pool, max_concurrent_activities=64)
        async with main, host:
            log.info("worker on %s and %s (backend %s)", settings.task_queue, settings.host_task_queue,
                     settings.backend)
            watcher = asyncio.create_task(watch_exits(backend, client, stop))
            beats = asyncio.create_task(heartbeat_forever(db, settings, stop))
            sampler = asyncio.create_task(UsageSampler(settings, db, backend, client).run_forever(stop))
            rotator = asyncio.create_task(rotate_forever(settings.logs_dir, settings.log_max_bytes, settings.log_keep,
                                                         stop))
            await stop.wait()
            await asyncio.gather(watcher, beats, sampler, rotator)
    if stop_instances_on_exit and hasattr(backend, "stop_all"):
        # `app.py up` is one machine's whole system: Ctrl-C leaves no instance behind. Their
        # workflows find them gone on the next start and record or replace them.
        backend.stop_all(settings.stop_grace_seconds)


def main(settings: Settings, *, stop_instances_on_exit: bool = False) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s worker %(levelname)s %(message)s")

    async def runner() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await run_worker(settings, stop, stop_instances_on_exit=stop_instances_on_exit)

    asyncio.run(runner())
