"""The 14-day purge of a stopped endpoint, for real, on Temporal's time-skipping test server.

The real workflows and the real activities (SQLite database, process backend) run in-process;
only the clock is skipped. Activities run in real time while timers skip.
"""
from __future__ import annotations

import asyncio
import shutil
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select
from temporalio.client import WorkflowExecutionStatus
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from common.config import load_settings
from common.db import Database
from common.schema import upgrade
from common.models import Endpoint, Event, Instance
from workers.activities import StandbyActivities
from workers.backends import make_backend
from workflows.contracts import ENDPOINT_WORKFLOW, EndpointInput, endpoint_workflow_id
from workflows.endpoint import EndpointWorkflow
from workers.host import host_info, join_pool, record_host
from workflows.gpu_pool import GpuPoolWorkflow
from workflows.pool import PoolWorkflow
from workflows.instance import InstanceWorkflow

pytestmark = pytest.mark.timeout(120)

FOURTEEN_DAYS = timedelta(days=14)


def test_server_path() -> str:
    return shutil.which("temporal-test-server") or str(Path(sys.executable).parent / "temporal-test-server")


test_server_path.__test__ = False  # a helper, not a test


async def poll(predicate, timeout: float, message: str):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {message} (last: {last!r})")


def test_stopped_endpoint_is_purged_after_14_days(tmp_path):
    asyncio.run(_purge_scenario(tmp_path))


async def _purge_scenario(tmp_path: Path) -> None:
    uid = uuid.uuid4().hex[:8]
    settings = load_settings({
        "STANDBY_DATA_DIR": str(tmp_path / "data"),
        "STANDBY_TASK_QUEUE": f"purge-{uid}",
        "STANDBY_HOST": f"purgehost-{uid}",
        "STANDBY_POOL": f"purgepool-{uid}",
        "STANDBY_GPUS": "",
        "STANDBY_STOP_GRACE_SECONDS": "2",
    })
    assert settings.purge_after_seconds == FOURTEEN_DAYS.total_seconds()  # the default, untouched
    upgrade(settings.database_url)
    db = Database(settings.database_url)
    backend = make_backend(settings)
    name = "purgeme"
    with db.session() as s:
        s.add(Endpoint(name=name, start_command=f"{sys.executable} -m http.server $PORT --bind 127.0.0.1",
                       health_path="/", min_instances=0, idle_retention_seconds=3600,
                       startup_timeout_seconds=30, health_interval_seconds=1, pools=[settings.pool]))

    def endpoint() -> Endpoint:
        with db.session() as s:
            e = s.scalar(select(Endpoint).where(Endpoint.name == name))
            s.expunge(e)
            return e

    def count(model) -> int:
        with db.session() as s:
            return len(list(s.scalars(select(model).where(model.endpoint_id == endpoint().id))))

    env = await WorkflowEnvironment.start_time_skipping(test_server_existing_path=test_server_path())
    try:
        acts = StandbyActivities(settings, db, backend, env.client)
        with ThreadPoolExecutor(max_workers=16) as pool:
            main = Worker(env.client, task_queue=settings.task_queue,
                          workflows=[EndpointWorkflow, InstanceWorkflow, PoolWorkflow, GpuPoolWorkflow],
                          activities=acts.all(), activity_executor=pool)
            host = Worker(env.client, task_queue=settings.host_task_queue, activities=acts.host_bound(),
                          activity_executor=pool)
            async with main, host:
                # As the worker does at start: its host joins its pool.
                info, gpus = host_info(settings)
                record_host(db, info, gpus)
                await join_pool(env.client, settings, info)
                handle = await env.client.start_workflow(
                    ENDPOINT_WORKFLOW, EndpointInput(name=name), id=endpoint_workflow_id(name),
                    task_queue=settings.task_queue)
                await poll(lambda: endpoint().status == "standby", 30, "standby")

                # Serve once, so that there is an instance (row, workdir, log) for the purge to remove.
                await handle.signal("wake")
                await poll(lambda: endpoint().status == "running", 40, "running")
                with db.session() as s:
                    [inst] = s.scalars(select(Instance).where(Instance.endpoint_id == endpoint().id)).all()
                    workdir, pid = Path(inst.workdir), inst.pid
                assert workdir.exists() and pid

                await handle.signal("stop")
                stopped = await poll(lambda: (e := endpoint()).status == "stopped" and e, 40, "stopped")
                assert (stopped.purge_at - stopped.stopped_at) == FOURTEEN_DAYS
                assert count(Instance) == 1 and count(Event) > 0
                assert backend.running_instance_ids() == []

                # Just short of 14 days: nothing happens yet.
                await env.sleep(FOURTEEN_DAYS - timedelta(minutes=5))
                await asyncio.sleep(1.0)  # let any (wrongly) due workflow task run in real time
                assert endpoint().status == "stopped"
                assert (await handle.describe()).status == WorkflowExecutionStatus.RUNNING

                # Past the purge time: the timer fires and the purge runs.
                await env.sleep(timedelta(minutes=6))
                # Polled in real time, not through handle.result(): waiting on a result lets the
                # test server skip time by itself, which would hide a timer set too late.
                e = await poll(lambda: (e := endpoint()).status == "terminated" and e, 30, "terminated")
                assert await handle.result() == "terminated"
                assert e.status_reason == "purged after being stopped"
                with db.session() as s:
                    events = s.scalars(select(Event).where(Event.endpoint_id == e.id)).all()
                    # Only the tombstone event remains.
                    assert [(ev.kind, ev.message) for ev in events] == [
                        ("terminated", "purged: purged after being stopped")]
                assert count(Instance) == 0
                assert not workdir.exists()
    finally:
        for iid in backend.running_instance_ids():
            backend.stop(iid, 1.0)
        await env.shutdown()
