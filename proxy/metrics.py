"""Prometheus metrics of the proxy, safe under several gunicorn workers.

`PROMETHEUS_MULTIPROC_DIR` must be set before `prometheus_client` is first imported (the
gunicorn config does it in the master, wiping the directory at start); each worker then
writes its own files and `/metrics` merges them. Without the variable (a single process, a
unit test) the same metrics live in memory.

Off the request path: a request's count, latency and in-flight changes are added to plain
per-endpoint tallies here, and handed to prometheus_client by `flush()` (the app's background
greenlet, once a second, and before every `/metrics` answer). Each multiprocess value costs a
lock, a pid check and an mmap write, and a request touched five of them (bench/README.md, "The
proxy's hot path"); a second's worth of requests now costs one of each per endpoint.
"""
from __future__ import annotations

import os
from bisect import bisect_left

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST

REQUESTS = Counter(
    "standby_proxy_requests_total", "Requests answered by the proxy", ["endpoint", "code_class"]
)
LATENCY = Histogram(
    "standby_proxy_response_seconds",
    "Time from request arrival to the response headers (holding for a cold start included)",
    ["endpoint"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)
COLD_STARTS = Counter("standby_proxy_cold_starts_total", "Wake calls that started an instance", ["endpoint"])
HELD = Gauge(
    "standby_proxy_held_requests", "Requests held waiting for an instance", ["endpoint"], multiprocess_mode="livesum"
)
IN_FLIGHT = Gauge(
    "standby_proxy_in_flight_requests", "Requests being forwarded to an instance (claimed, not yet released)",
    ["endpoint"], multiprocess_mode="livesum",
)
REJECTED = Counter(
    "standby_proxy_rejected_total", "503 answers (overload, hold timeout, not serving)", ["endpoint", "reason"]
)
# A request that waited at least this long for an instance was held (a cold start, or every
# instance at max concurrency); a warm request waits microseconds. Only held requests go into the
# Prometheus queue-wait histogram (an observation costs about a microsecond, on every request
# otherwise); the charts' store counts every request's wait.
HELD_SECONDS = 0.001
QUEUE_WAIT = Histogram(
    "standby_proxy_queue_wait_seconds",
    "Of requests that were held (a cold start, or all instances busy): arrival until an instance was chosen",
    ["endpoint"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)
COLD_START_REQUESTS = Counter(
    "standby_proxy_cold_start_requests_total", "Requests that waited for an instance to start", ["endpoint"]
)


class TrafficRecorder:
    """The charts' request figures (common/metrics_store.py), aggregated in memory per endpoint and
    instance; a background greenlet takes them once per step, adds the endpoint's totals up and
    writes them. A request adds to one aggregate here: no I/O, no lock (one gevent process)."""

    def __init__(self) -> None:
        from common.metrics_store import TrafficAgg

        self._new = TrafficAgg
        self.open: dict[tuple[str, str], object] = {}

    def observe(self, endpoint: str, instance_id: str, status: int, seconds: float, wait: float,
                cold_start: bool) -> None:
        key = (endpoint, instance_id)
        agg = self.open.get(key)
        if agg is None:
            agg = self.open[key] = self._new()
        agg.observe(status, seconds, wait, cold_start)

    def take(self) -> dict:
        """The step's aggregates by (endpoint, instance id), with each endpoint's total under
        (endpoint, "") (requests answered without an instance, errors, are only there)."""
        taken, self.open = self.open, {}
        out: dict[tuple[str, str], object] = {}
        for (endpoint, instance_id), agg in taken.items():
            total = out.get((endpoint, ""))
            if total is None:
                total = out[(endpoint, "")] = self._new()
            total.add(agg)
            if instance_id:
                out[(endpoint, instance_id)] = agg
        return out


# The histogram's bounds, +Inf included: an observation counts in the first bound it is under.
_BOUNDS = (*LATENCY._upper_bounds,)


class _Tally:
    """One endpoint's requests since the last flush."""

    __slots__ = ("classes", "buckets", "total", "in_flight", "waits", "cold_starts")

    def __init__(self) -> None:
        self.classes = [0] * 6  # by status // 100
        self.buckets = [0] * len(_BOUNDS)
        self.total = 0.0
        self.in_flight = 0  # change of the in-flight gauge
        self.waits: list[float] = []  # of held requests only (HELD_SECONDS or more)
        self.cold_starts = 0  # held requests that waited for an instance to start


class Metrics:
    """Tallies per endpoint on the request path; `flush()` hands them to prometheus_client. The
    charts' figures go to the TrafficRecorder, written by its own greenlet."""

    def __init__(self) -> None:
        self._tallies: dict[str, _Tally] = {}
        self.recorder = TrafficRecorder()

    def _tally(self, endpoint: str) -> _Tally:
        tally = self._tallies.get(endpoint)
        if tally is None:
            tally = self._tallies[endpoint] = _Tally()
        return tally

    def observe(self, endpoint: str, status: int, seconds: float, instance_id: str = "", wait: float = 0.0,
                cold_start: bool = False) -> None:
        """One answered request: `seconds` from arrival to the response headers, `wait` of them
        spent before an instance was chosen (forwarded requests only)."""
        tally = self._tallies.get(endpoint) or self._tally(endpoint)
        tally.classes[min(status // 100, 5)] += 1
        tally.buckets[bisect_left(_BOUNDS, seconds)] += 1
        tally.total += seconds
        if wait >= HELD_SECONDS:  # a request that queued (a cold start, or all instances busy)
            tally.waits.append(wait)
            if cold_start:
                tally.cold_starts += 1
        self.recorder.observe(endpoint, instance_id, status, seconds, wait, cold_start)

    def in_flight(self, endpoint: str, delta: int) -> None:
        tally = self._tallies.get(endpoint) or self._tally(endpoint)
        tally.in_flight += delta

    def flush(self) -> None:
        tallies, self._tallies = self._tallies, {}
        for endpoint, tally in tallies.items():
            for code_class, count in enumerate(tally.classes):
                if count:
                    REQUESTS.labels(endpoint, f"{code_class}xx").inc(count)
            if any(tally.buckets):
                # Histogram.observe, a bucket's worth at a time (its per-bound values and sum).
                hist = LATENCY.labels(endpoint)
                for index, count in enumerate(tally.buckets):
                    if count:
                        hist._buckets[index].inc(count)
                hist._sum.inc(tally.total)
            if tally.in_flight:
                IN_FLIGHT.labels(endpoint).inc(tally.in_flight)
            if tally.waits:
                waited = QUEUE_WAIT.labels(endpoint)
                for wait in tally.waits:
                    waited.observe(wait)
            if tally.cold_starts:
                COLD_START_REQUESTS.labels(endpoint).inc(tally.cold_starts)

    def cold_start(self, endpoint: str) -> None:
        COLD_STARTS.labels(endpoint).inc()

    def held(self, endpoint: str, delta: int) -> None:
        HELD.labels(endpoint).inc(delta)

    def rejected(self, endpoint: str, reason: str) -> None:
        REJECTED.labels(endpoint, reason).inc()


def render(metrics: Metrics | None = None) -> tuple[bytes, str]:
    """The exposition text: merged across workers when running multiprocess. `metrics`: this
    process's tallies, flushed first."""
    if metrics is not None:
        metrics.flush()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    from prometheus_client import REGISTRY

    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
