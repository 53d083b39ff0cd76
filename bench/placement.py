"""Placement at scale: how long a pool takes to place a burst of wakes, and how that grows with hosts.

    .venv/bin/python bench/placement.py [--hosts 5,10,25,50] [--wakes 200] [--endpoints 500]

For each pool size it starts a Temporal dev server, runs the real PoolWorkflow in a worker in this
process (with the real local activities over a temporary SQLite database), registers N simulated
hosts of 8 GPUs each (their heartbeats written to the database, as workers write them — no real
worker per host: one per host would measure Python start-up, not placement), and starts `--wakes`
small requester workflows at once, each asking the pool for one GPU for one of `--endpoints`
endpoints and waiting for its answer. It reports:

- the time from the burst to the last placement (every requester answered), and per placement;
- queue order: with more wakes than GPUs, the ones that wait are placed in the order they asked,
  once the first ones are released;
- the cost of the decision alone (workflows/placement.py's `grantable` on the same state, timed
  in this process), to separate the algorithm from Temporal's round trips;
- CPU seconds and peak memory of the Temporal server and of this worker process.

Numbers are for this machine in this run; compare sizes with each other, not with other runs.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402
from temporalio import workflow  # noqa: E402
from temporalio.client import Client  # noqa: E402
from temporalio.worker import UnsandboxedWorkflowRunner, Worker  # noqa: E402

from common.config import load_settings  # noqa: E402
from common.db import Database  # noqa: E402
from common.models import Host  # noqa: E402
from common.schema import upgrade  # noqa: E402
from tests.conftest import _port_open, free_port, temporal_bin  # noqa: E402
from workers.activities import StandbyActivities  # noqa: E402
from workers.backends.process import ProcessBackend  # noqa: E402
from workflows import placement as pl  # noqa: E402
from workflows.placement import HostInfo, Placement, PlacementRequest  # noqa: E402
from workflows.pool import (  # noqa: E402
    SIGNAL_HOST_UP,
    SIGNAL_PLACED,
    SIGNAL_RELEASE,
    SIGNAL_REQUEST,
    PoolInput,
    PoolView,
    PoolWorkflow,
    ReleaseRequest,
    pool_workflow_id,
)

GPUS_PER_HOST = 8
# How many of the waiting wakes the FIFO check frees one GPU at a time for.
ORDER_CHECKS = 20


@dataclass
class WakeInput:
    pool: str
    endpoint: str
    instance_id: str


@dataclass
class WakeResult:
    host: str
    placed_at: float


@workflow.defn(name="BenchRequester")
class BenchRequester:
    """What an instance workflow does before it provisions: ask the pool, wait for the answer."""

    def __init__(self) -> None:
        self.placement: Placement | None = None

    @workflow.signal(name=SIGNAL_PLACED)
    def placed(self, placement: Placement) -> None:
        self.placement = placement

    @workflow.run
    async def run(self, inp: WakeInput) -> WakeResult:
        await workflow.get_external_workflow_handle(pool_workflow_id(inp.pool)).signal(
            SIGNAL_REQUEST, PlacementRequest(workflow.info().workflow_id, inp.endpoint, inp.instance_id, "T4", 1,
                                             1.0, 1.0, 10.0, False, workflow.now().timestamp()))
        await workflow.wait_condition(lambda: self.placement is not None)
        return WakeResult(self.placement.host, workflow.now().timestamp())


def simulated_hosts(count: int, pool: str) -> list[HostInfo]:
    return [HostInfo(name=f"sim-{i:03d}", pool=pool, task_queue=f"sim-{i:03d}", address=f"127.0.0.{i % 250 + 2}",
                     gpus={"T4": list(range(GPUS_PER_HOST))}, cpu_cores=64, memory_gb=512, disk_gb=4000,
                     netns="net", started_at=time.time()) for i in range(count)]


def decision_cost(hosts: list[HostInfo], wakes: int, endpoints: int) -> float:
    """Seconds for one `grantable` over the whole burst (the pure decision)."""
    state = pl.PoolState(pool="p", hosts={h.name: pl.HostState(h) for h in hosts})
    state.queue = [PlacementRequest(f"w{i}", f"ep{i % endpoints}", f"i{i}", "T4", 1, 1.0, 1.0, 10.0)
                   for i in range(wakes)]
    started = time.perf_counter()
    pl.grantable(state)
    return time.perf_counter() - started


async def one_size(host_count: int, wakes: int, endpoints: int, tmp: Path) -> dict:
    port = free_port()
    temporal = subprocess.Popen([temporal_bin(), "server", "start-dev", "--headless", "--ip", "127.0.0.1", "--port",
                                 str(port), "--db-filename", str(tmp / f"temporal-{host_count}.db"),
                                 "--log-level", "error"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    server = psutil.Process(temporal.pid)
    me = psutil.Process()
    try:
        deadline = time.monotonic() + 60
        while not _port_open(port):
            if time.monotonic() > deadline:
                raise RuntimeError("temporal did not start")
            await asyncio.sleep(0.1)
        uid = uuid.uuid4().hex[:6]
        settings = load_settings({"STANDBY_DATA_DIR": str(tmp / f"data-{host_count}"),
                                  "STANDBY_TASK_QUEUE": f"bench-{uid}", "STANDBY_POOL": f"bench-{uid}"})
        upgrade(settings.database_url)
        db = Database(settings.database_url)
        hosts = simulated_hosts(host_count, settings.pool)
        now = datetime.now(timezone.utc)
        with db.session() as session:
            for h in hosts:
                session.add(Host(name=h.name, pool=h.pool, task_queue=h.task_queue, advertise_address=h.address,
                                 gpus=[{"type": "T4", "index": i, "memory_mb": None} for i in h.gpus["T4"]],
                                 cpu_cores=h.cpu_cores, memory_gb=h.memory_gb, disk_gb=h.disk_gb,
                                 started_at=now, last_heartbeat_at=now))
        client = await Client.connect(f"127.0.0.1:{port}")
        acts = StandbyActivities(settings, db, ProcessBackend(settings), client)
        stop_beats = asyncio.Event()

        async def beat() -> None:  # the simulated hosts' heartbeats, as their workers write them
            from sqlalchemy import update

            while not stop_beats.is_set():
                with db.session() as session:
                    session.execute(update(Host).values(last_heartbeat_at=datetime.now(timezone.utc)))
                try:
                    await asyncio.wait_for(stop_beats.wait(), 2.0)
                except asyncio.TimeoutError:
                    pass

        beats = asyncio.create_task(beat())
        cpu_before = (server.cpu_times(), me.cpu_times())
        with ThreadPoolExecutor(16) as pool_threads:
            worker = Worker(client, task_queue=settings.task_queue, workflows=[PoolWorkflow, BenchRequester],
                            activities=acts.all(), activity_executor=pool_threads,
                            workflow_runner=UnsandboxedWorkflowRunner(), max_concurrent_workflow_tasks=100)
            async with worker:
                pool = await client.start_workflow(PoolWorkflow.run, PoolInput(settings.pool, 3600.0, 2.0),
                                                   id=pool_workflow_id(settings.pool), task_queue=settings.task_queue)
                for h in hosts:
                    await pool.signal(SIGNAL_HOST_UP, h)
                capacity = host_count * GPUS_PER_HOST
                burst = time.time()
                handles = await asyncio.gather(*[
                    client.start_workflow(BenchRequester.run, WakeInput(settings.pool, f"ep{i % endpoints}", f"i{i}"),
                                          id=f"wake-{uid}-{i}", task_queue=settings.task_queue)
                    for i in range(wakes)])
                pending = {asyncio.ensure_future(h.result()): i for i, h in enumerate(handles)}
                results, placed_ids = [], []
                while len(results) < min(capacity, wakes):  # the ones that got a GPU at once
                    done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                    for future in done:
                        results.append(future.result())
                        placed_ids.append(pending.pop(future))
                placed_in = max(r.placed_at for r in results) - burst
                order_kept = None
                if pending:
                    # The rest wait. Freed one at a time, each GPU goes to the head of the queue.
                    view = await pool.query("queue", result_type=PoolView)
                    queued_order = [int(entry.instance_id[1:]) for entry in view.queue][:ORDER_CHECKS]
                    by_index = {i: f for f, i in pending.items()}
                    placed_order = []
                    for i in placed_ids[:len(queued_order)]:
                        await pool.signal(SIGNAL_RELEASE, ReleaseRequest(f"i{i}"))
                        done, _ = await asyncio.wait([by_index[j] for j in queued_order if j not in placed_order],
                                                     return_when=asyncio.FIRST_COMPLETED)
                        placed_order += sorted(pending[f] for f in done)
                    order_kept = placed_order == queued_order
                    for future in pending:
                        future.cancel()
                per_host = {}
                for r in results:
                    per_host[r.host] = per_host.get(r.host, 0) + 1
        stop_beats.set()
        await beats
        server_cpu = sum(server.cpu_times()[:2]) - sum(cpu_before[0][:2])
        worker_cpu = sum(me.cpu_times()[:2]) - sum(cpu_before[1][:2])
        return {
            "hosts": host_count, "gpus": capacity, "wakes": wakes, "placed": len(results),
            "seconds": placed_in, "ms_per_placement": placed_in / len(results) * 1000,
            "hosts_used": len(per_host), "order_kept": order_kept,
            "decision_ms": statistics.median(decision_cost(hosts, wakes, endpoints) for _ in range(5)) * 1000,
            "temporal_cpu_s": server_cpu, "worker_cpu_s": worker_cpu,
            "temporal_rss_mb": server.memory_info().rss / 2**20, "worker_rss_mb": me.memory_info().rss / 2**20,
        }
    finally:
        temporal.terminate()
        try:
            temporal.wait(10)
        except subprocess.TimeoutExpired:
            temporal.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hosts", default="5,10,25,50")
    parser.add_argument("--wakes", type=int, default=200)
    parser.add_argument("--endpoints", type=int, default=500)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="standby-bench-placement-"))
    rows = []
    try:
        for count in (int(n) for n in args.hosts.split(",")):
            rows.append(asyncio.run(one_size(count, args.wakes, args.endpoints, tmp)))
            row = rows[-1]
            print(f"{row['hosts']:>3} hosts ({row['gpus']:>3} GPUs): {row['placed']} placed in {row['seconds']:.2f}s "
                  f"({row['ms_per_placement']:.1f} ms each) on {row['hosts_used']} hosts; queue order kept: "
                  f"{row['order_kept']}; decision alone {row['decision_ms']:.1f} ms; CPU temporal "
                  f"{row['temporal_cpu_s']:.1f}s worker {row['worker_cpu_s']:.1f}s; RSS temporal "
                  f"{row['temporal_rss_mb']:.0f} MB worker {row['worker_rss_mb']:.0f} MB", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if len(rows) > 1:
        base = rows[0]
        print(f"\nfrom {base['hosts']} to {rows[-1]['hosts']} hosts: burst time x{rows[-1]['seconds'] / base['seconds']:.2f}, "
              f"decision x{rows[-1]['decision_ms'] / base['decision_ms']:.2f} "
              f"({os.cpu_count()} CPUs)")


if __name__ == "__main__":
    main()
