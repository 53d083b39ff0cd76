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


# The histogram's bounds, +Inf included: an observation counts in the first bound it is under.
_BOUNDS = (*LATENCY._upper_bounds,)


class _Tally:
    """One endpoint's requests since the last flush."""

    __slots__ = ("classes", "buckets", "total", "in_flight")

    def __init__(self) -> None:
        self.classes = [0] * 6  # by status // 100
        self.buckets = [0] * len(_BOUNDS)
        self.total = 0.0
        self.in_flight = 0  # change of the in-flight gauge


class Metrics:
    """Tallies per endpoint on the request path; `flush()` hands them to prometheus_client."""

    def __init__(self) -> None:
        self._tallies: dict[str, _Tally] = {}

    def _tally(self, endpoint: str) -> _Tally:
        tally = self._tallies.get(endpoint)
        if tally is None:
            tally = self._tallies[endpoint] = _Tally()
        return tally

    def observe(self, endpoint: str, status: int, seconds: float) -> None:
        tally = self._tallies.get(endpoint) or self._tally(endpoint)
        tally.classes[min(status // 100, 5)] += 1
        tally.buckets[bisect_left(_BOUNDS, seconds)] += 1
        tally.total += seconds

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
