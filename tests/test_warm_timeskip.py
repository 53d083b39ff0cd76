"""A warm window, "weekdays 09:00-18:00 Europe/Paris: 2", opening and closing for real on Temporal's
time-skipping test server: the real workflows and activities run in-process (SQLite database,
process backend, real instance processes); only the clock skips to the window's start and end.
"""
from __future__ import annotations

import asyncio
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from common.config import load_settings
from common.db import Database
from common.models import Endpoint, Event, Instance
from common.schema import upgrade
from tests.test_purge_timeskip import poll, test_server_path
from workers.activities import StandbyActivities
from workers.backends import make_backend
from workers.host import host_info, record_host
from workflows.contracts import ENDPOINT_WORKFLOW, EndpointInput, endpoint_workflow_id
from workflows.endpoint import EndpointWorkflow
from workflows.gpu_pool import GpuPoolWorkflow
from workflows.instance import InstanceWorkflow
from workflows.pool import SIGNAL_HOST_UP, PoolInput, PoolWorkflow, pool_workflow_id
from workflows.warm_windows import parse, warm_now

pytestmark = pytest.mark.timeout(180)
WINDOW = "weekdays 09:00-18:00 Europe/Paris: 2"


def test_a_warm_window_starts_and_ends(tmp_path):
    asyncio.run(_scenario(tmp_path))


async def _scenario(tmp_path: Path) -> None:
    uid = uuid.uuid4().hex[:8]
    settings = load_settings({
        "STANDBY_DATA_DIR": str(tmp_path / "data"), "STANDBY_TASK_QUEUE": f"warm-{uid}",
        "STANDBY_HOST": f"warmhost-{uid}", "STANDBY_POOL": f"warmpool-{uid}", "STANDBY_GPUS": "",
        "STANDBY_STOP_GRACE_SECONDS": "2",
    })
    upgrade(settings.database_url)
    db = Database(settings.database_url)
    backend = make_backend(settings)
    name = "warm"
    with db.session() as s:
        # Health checked once a day: hours skip by without thousands of probes.
        s.add(Endpoint(name=name, start_command=f"{sys.executable} -m http.server $PORT --bind 127.0.0.1",
                       max_instances=2, idle_retention_seconds=600, startup_timeout_seconds=30,
                       health_interval_seconds=86400, warm_windows=WINDOW, pools=[settings.pool]))

    def endpoint() -> Endpoint:
        with db.session() as s:
            e = s.scalar(select(Endpoint).where(Endpoint.name == name))
            s.expunge(e)
            return e

    def ready() -> int:
        with db.session() as s:
            return len(s.scalars(select(Instance).where(Instance.endpoint_id == endpoint().id,
                                                        Instance.status == "ready")).all())

    def events() -> list[str]:
        with db.session() as s:
            return [ev.message for ev in s.scalars(select(Event).where(Event.endpoint_id == endpoint().id,
                                                                        Event.kind == "warm_window"))]

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
                # The host joins its pool, which looks at heartbeats once a day here: the clock
                # skips hours, and this test has no heartbeat to give in skipped time.
                info, gpus = host_info(settings)
                record_host(db, info, gpus)
                await env.client.start_workflow(
                    "PoolWorkflow", PoolInput(pool=info.pool, down_after_seconds=30 * 86400.0, check_seconds=86400.0),
                    id=pool_workflow_id(info.pool), task_queue=settings.task_queue,
                    start_signal=SIGNAL_HOST_UP, start_signal_args=[info])
                await env.client.start_workflow(ENDPOINT_WORKFLOW, EndpointInput(name=name),
                                                id=endpoint_workflow_id(name), task_queue=settings.task_queue)
                windows = parse(WINDOW)
                now = await env.get_current_time()
                if warm_now(windows, now)[0] == 0:
                    await poll(lambda: endpoint().status == "standby", 30, "standby before the window")
                    assert ready() == 0
                    opening = warm_now(windows, now)[2]
                    # To a minute past the next opening (a weekday, 09:00 in Paris).
                    await env.sleep(opening - now + timedelta(minutes=1))

                # The window is open: two instances start and stay, though nothing calls them.
                await poll(lambda: ready() == 2, 60, "two warm instances")
                assert endpoint().status == "running"
                assert events() == [f"warm window open: {WINDOW} (keeping 2 warm)"]

                now = await env.get_current_time()
                closing = warm_now(windows, now)[2]
                assert closing.astimezone(windows[0].tz()).strftime("%H:%M") == "18:00"
                # Just short of 18:00 in Paris: still two.
                await env.sleep(closing - now - timedelta(minutes=5))
                await asyncio.sleep(1.0)  # any (wrongly) due workflow task runs in real time
                assert ready() == 2
                # Past it: idle for hours, both go; the endpoint sleeps until a request comes.
                await env.sleep(timedelta(minutes=6))
                await poll(lambda: endpoint().status == "standby", 60, "standby after the window")
                assert ready() == 0
                assert events()[-1].startswith(f"warm window closed: {WINDOW}")
    finally:
        for iid in backend.running_instance_ids():
            backend.stop(iid, 1.0)
        await env.shutdown()
