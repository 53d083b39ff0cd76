"""The charts' store (common/metrics_store.py) on a real SQLite database, the proxy's in-memory
recorder, and the worker's readings of resource use (workers/usage.py)."""
from __future__ import annotations

import subprocess
import sys
import time

import pytest

from common.config import load_settings
from common.db import Database
from common.metrics_store import (
    BUCKETS,
    RANGES,
    ROLLUP_STEP,
    TRAFFIC,
    USAGE,
    MetricsWriter,
    Point,
    TrafficAgg,
    quantile,
    traffic_series,
    usage_json,
    usage_series,
)
from common.models import Endpoint, MetricPoint
from common.schema import upgrade
from proxy.metrics import Metrics
from workers.usage import docker_usage, gpu_figures, parse_nvidia_smi, process_tree_usage


@pytest.fixture
def db(tmp_path):
    settings = load_settings({"STANDBY_DATA_DIR": str(tmp_path / "data")})
    upgrade(settings.database_url)
    database = Database(settings.database_url)
    with database.session() as s:
        s.add(Endpoint(name="tts", start_command="x"))
    return database


def _endpoint_id(db) -> int:
    with db.session() as s:
        return s.query(Endpoint).filter_by(name="tts").one().id


@pytest.mark.parametrize("values, q, low, high", [
    ([0.003] * 100, 0.5, 0.0025, 0.005),
    ([0.003] * 90 + [2.0] * 10, 0.5, 0.0025, 0.005),
    ([0.003] * 90 + [2.0] * 10, 0.95, 1.0, 2.5),
    ([0.003] * 98 + [200.0] * 2, 0.99, 120.0, 300.0),
    ([1000.0], 0.5, BUCKETS[-1], BUCKETS[-1]),  # beyond the last bound: the last bound
])
def test_quantiles_from_histograms(values, q, low, high):
    agg = TrafficAgg()
    for v in values:
        agg.observe(200, v, 0.0, False)
    assert low <= quantile(q, agg.latency) <= high
    assert quantile(0.5, TrafficAgg().latency) is None


def test_histograms_add_up_so_percentiles_of_a_range_are_right():
    fast, slow = TrafficAgg(), TrafficAgg()
    for _ in range(50):
        fast.observe(200, 0.002, 0.0, False)
        slow.observe(503, 0.8, 0.5, True)
    fast.add(TrafficAgg.from_json(slow.to_json()))
    assert fast.requests == 100 and fast.errors == 50 and fast.cold_starts == 50
    assert 0.5 <= quantile(0.75, fast.latency) <= 1.0


def test_writers_keep_their_own_rows_and_readers_add_them_up(db):
    now = time.time()
    proxy_a = MetricsWriter(db, "proxy:a", 10, 7200, 8 * 86400)
    proxy_b = MetricsWriter(db, "proxy:b", 10, 7200, 8 * 86400)
    for writer, status in ((proxy_a, 200), (proxy_b, 500)):
        for seconds_ago in (30, 20):
            agg = TrafficAgg()
            for _ in range(10):
                agg.observe(status, 0.01, 0.0, False)
            writer.write(TRAFFIC, [Point("tts", "", now - seconds_ago, agg.to_json()),
                                   Point("tts", "abcdefgh", now - seconds_ago, agg.to_json()),
                                   Point("gone", "", now, agg.to_json())])  # unknown endpoint: skipped
    with db.session() as s:
        rows = s.query(MetricPoint).all()
        assert {r.source for r in rows} == {"proxy:a", "proxy:b"}
        assert {r.step for r in rows} == {10, ROLLUP_STEP}
        series = traffic_series(s, _endpoint_id(db), RANGES["1h"], now)
        day = traffic_series(s, _endpoint_id(db), RANGES["24h"], now)
    assert len(series) == 60 and len(day) == 288
    assert sum(agg.requests for _, agg, _ in series) == 40  # the endpoint's rows, not the instance's
    assert sum(agg.errors for _, agg, _ in series) == 20
    assert sum(agg.requests for _, agg, _ in day) == 40  # the 5-minute rows hold the same


def test_usage_means_per_instance(db):
    now = time.time()
    worker = MetricsWriter(db, "worker:h", 10, 7200, 8 * 86400)
    worker.write(USAGE, [Point("tts", "aaaaaaaa", now - 5, usage_json({"cpu": 40.0, "memory": 10.0, "gpu": None})),
                         Point("tts", "aaaaaaaa", now - 15, usage_json({"cpu": 60.0, "memory": 30.0}))])
    with db.session() as s:
        series = usage_series(s, _endpoint_id(db), RANGES["24h"], now)
    values = [p for p in series["aaaaaaaa"] if p["cpu"] is not None]
    assert len(values) in (1, 2)  # the two samples may straddle a 5-minute boundary
    if len(values) == 1:
        assert values[0]["cpu"] == pytest.approx(50.0) and values[0]["memory"] == pytest.approx(20.0)
    assert all(p["gpu"] is None for p in series["aaaaaaaa"])


def test_rows_past_their_retention_are_pruned(db):
    old = time.time() - 3 * 3600
    writer = MetricsWriter(db, "proxy:a", 10, 7200, 8 * 86400)
    writer._last_pruned = time.time()  # no prune on this write
    writer.write(TRAFFIC, [Point("tts", "", old, TrafficAgg().to_json())])
    writer._last_pruned = 0.0
    writer.write(TRAFFIC, [])
    with db.session() as s:
        assert {r.step for r in s.query(MetricPoint).all()} == {ROLLUP_STEP}  # raw row gone, 5-min row kept


def test_the_proxy_only_adds_to_memory_per_request():
    metrics = Metrics()
    metrics.observe("tts", 200, 0.01, "abcdefgh", 0.002, False)
    metrics.observe("tts", 503, 0.5, "", 0.0, False)  # an error answer: no instance
    taken = metrics.recorder.take()
    assert taken[("tts", "")].requests == 2 and taken[("tts", "abcdefgh")].requests == 1
    assert metrics.recorder.take() == {}


def test_nvidia_smi_output_and_an_instances_gpus():
    readings = parse_nvidia_smi("0, 87, 10240, 16384\n1, 13, 2048, 16384\n2, [N/A], [N/A], 16384\ngarbage\n")
    assert sorted(readings) == [0, 1]
    util, memory = gpu_figures([0, 1], readings)
    assert util == pytest.approx(50.0) and memory == pytest.approx((62.5 + 12.5) / 2)
    assert gpu_figures([3], readings) == (None, None)


def test_docker_stats():
    cpu, memory = docker_usage({"cpu_stats": {"cpu_usage": {"total_usage": 2_500_000_000}},
                                "memory_stats": {"usage": 300, "stats": {"inactive_file": 100}}})
    assert (cpu, memory) == (2.5, 200)


def test_a_busy_process_tree_uses_cpu():
    # A shell whose child burns CPU: the tree's CPU seconds grow about as fast as the clock.
    proc = subprocess.Popen(["/bin/sh", "-c", f"{sys.executable} -c 'while True: pass'"])
    try:
        time.sleep(0.3)
        first = process_tree_usage(proc.pid)
        time.sleep(1.0)
        second = process_tree_usage(proc.pid)
        assert second.cpu_seconds - first.cpu_seconds > 0.3  # two noisy shared cores: a loose bound
        assert second.memory_bytes > 1_000_000
    finally:
        import psutil

        for child in psutil.Process(proc.pid).children(recursive=True):  # by pid: only what it started
            child.kill()
        proc.kill()
        proc.wait()
