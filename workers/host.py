"""This worker's host in its pool (docs/architecture.md "Hosts and pools").

At start the worker records its host's facts in the database (GPUs with their memory, CPU cores,
memory, disk, the address its instances are reached at, whether fixed-port commands can have a
network namespace here) and tells its pool's workflow with a `host_up` signal (signal-with-start:
the pool exists from its first host on). Then it heart-beats: one database write every
`host_heartbeat_seconds`; the pool's workflow marks a host whose heartbeat is older than
`host_down_after_seconds` down, and its instances lost.
"""
from __future__ import annotations

import asyncio
import logging
import os
import shutil
import time
from datetime import datetime, timezone

from sqlalchemy import update

from common.config import Settings
from common.db import Database
from common.models import Host
from workflows.placement import HostInfo
from workflows.pool import SIGNAL_HOST_UP, PoolInput, pool_workflow_id

log = logging.getLogger(__name__)


def host_info(settings: Settings) -> tuple[HostInfo, list[dict]]:
    """The host as its pool sees it, and its GPUs in detail (for the hosts page)."""
    import psutil

    from workers.gpus import gpu_details, load_inventory
    from workers.ports import namespace_mode

    inventory = load_inventory(settings)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    info = HostInfo(
        name=settings.host, pool=settings.pool, task_queue=settings.host_task_queue,
        address=settings.advertise_address, gpus=inventory,
        cpu_cores=float(os.cpu_count() or 1), memory_gb=round(psutil.virtual_memory().total / 1024**3, 2),
        disk_gb=round(shutil.disk_usage(settings.data_dir).total / 1024**3, 2),
        cpu_overcommit=settings.cpu_overcommit, memory_overcommit=settings.memory_overcommit,
        disk_overcommit=settings.disk_overcommit,
        netns=(namespace_mode() or "") if settings.backend == "process" else "",
        backend=settings.backend, started_at=time.time(),
    )
    return info, gpu_details(settings, inventory)


def record_host(db: Database, info: HostInfo, gpus: list[dict]) -> None:
    now = datetime.now(timezone.utc)
    with db.session() as session:
        host = session.get(Host, info.name)
        if host is None:
            host = Host(name=info.name)
            session.add(host)
        host.pool, host.task_queue, host.advertise_address = info.pool, info.task_queue, info.address
        host.backend, host.netns, host.gpus = info.backend, info.netns, gpus
        host.cpu_cores, host.memory_gb, host.disk_gb = info.cpu_cores, info.memory_gb, info.disk_gb
        host.cpu_overcommit, host.memory_overcommit = info.cpu_overcommit, info.memory_overcommit
        host.disk_overcommit = info.disk_overcommit
        host.started_at = host.last_heartbeat_at = now


async def join_pool(client, settings: Settings, info: HostInfo) -> None:
    from temporalio.common import WorkflowIDConflictPolicy

    await client.start_workflow(
        "PoolWorkflow",
        PoolInput(pool=info.pool, down_after_seconds=settings.host_down_after_seconds,
                  check_seconds=min(2.0, settings.host_down_after_seconds / 3)),
        id=pool_workflow_id(info.pool), task_queue=settings.task_queue,
        start_signal=SIGNAL_HOST_UP, start_signal_args=[info],
        id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
    )


async def heartbeat_forever(db: Database, settings: Settings, stop: asyncio.Event) -> None:
    """One write per interval: cheap for the database, and the pool only reads it."""
    while not stop.is_set():
        try:
            await asyncio.to_thread(_beat, db, settings.host)
        except Exception:  # noqa: BLE001 - a missed beat is one missed beat; keep beating
            log.exception("host heartbeat failed")
        try:
            await asyncio.wait_for(stop.wait(), settings.host_heartbeat_seconds)
        except asyncio.TimeoutError:
            pass


def _beat(db: Database, name: str) -> None:
    with db.session() as session:
        session.execute(update(Host).where(Host.name == name).values(last_heartbeat_at=datetime.now(timezone.utc)))
