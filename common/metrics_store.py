"""The charts' metrics, kept in the app database (docs/architecture.md "Metrics").

Why the app database, not a Prometheus server or a file of our own: on one machine nothing else
must be installed or run (`./run up` is the whole system), the web app that draws the charts
already reads this database, SQLite and PostgreSQL both hold it, and the volume is small and
bounded: one row per endpoint (and per instance) per step and per writer, at two resolutions
with a retention each. Prometheus scrapes `/metrics` of every process for those who run one;
this store is only what the endpoint page draws.

- **Two resolutions.** Each writer writes a row per step (`STANDBY_METRICS_STEP_SECONDS`, 10 s)
  kept `STANDBY_METRICS_RAW_RETENTION_SECONDS` (2 h, for the 1 h range), and adds the same
  figures into its row of the 5-minute bucket, kept `STANDBY_METRICS_RETENTION_SECONDS` (8 days,
  for the 24 h and 7 d ranges). Ranges are drawn at 1 minute, 5 minutes and 1 hour per point.
- **One writer per row.** The proxy's processes write request figures, the workers write
  resource use, each under its own `source`: no two processes ever update the same row, and the
  reader adds the sources up.
- **Latency as histograms, not percentiles.** Percentiles of buckets cannot be combined;
  histograms can (counts add up), so p50/p95/p99 of any range come out right
  (`quantile`, as Prometheus's histogram_quantile computes them).

Nothing here runs on the proxy's hot path: requests only add to in-memory aggregates
(proxy/metrics.py), which a background greenlet writes once per step.
"""
from __future__ import annotations

import bisect
import math
import time
from dataclasses import dataclass, field
from typing import Iterable

from sqlalchemy import and_, delete, select

from common.models import Endpoint, MetricPoint

TRAFFIC, USAGE = "traffic", "usage"
ROLLUP_STEP = 300
# Request latency and queue wait (seconds): the proxy's Prometheus buckets, plus +Inf.
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
CODE_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")
USAGE_FIELDS = ("cpu", "memory", "memory_bytes", "gpu", "gpu_memory")
_CLASS_INDEX = {1: 0, 2: 1, 3: 2, 4: 3, 5: 4}
_bisect = bisect.bisect_left


# ---------------------------------------------------------------- aggregates


@dataclass
class TrafficAgg:
    """Requests of one step: counts by status class, latency and queue-wait histograms."""

    requests: int = 0
    codes: list[int] = field(default_factory=lambda: [0] * len(CODE_CLASSES))
    latency: list[int] = field(default_factory=lambda: [0] * (len(BUCKETS) + 1))
    latency_sum: float = 0.0
    wait: list[int] = field(default_factory=lambda: [0] * (len(BUCKETS) + 1))
    wait_sum: float = 0.0
    cold_starts: int = 0

    def observe(self, status: int, seconds: float, wait: float, cold_start: bool) -> None:
        # On the proxy's request path: list increments and two bisections, nothing more.
        self.requests += 1
        self.codes[_CLASS_INDEX.get(status // 100, 4)] += 1
        self.latency[_bisect(BUCKETS, seconds)] += 1
        self.latency_sum += seconds
        self.wait[_bisect(BUCKETS, wait)] += 1
        self.wait_sum += wait
        if cold_start:
            self.cold_starts += 1

    def add(self, other: "TrafficAgg") -> None:
        self.requests += other.requests
        self.codes = [a + b for a, b in zip(self.codes, other.codes)]
        self.latency = [a + b for a, b in zip(self.latency, other.latency)]
        self.wait = [a + b for a, b in zip(self.wait, other.wait)]
        self.latency_sum += other.latency_sum
        self.wait_sum += other.wait_sum
        self.cold_starts += other.cold_starts

    def to_json(self) -> dict:
        return {"requests": self.requests, "codes": self.codes, "latency": self.latency,
                "latency_sum": round(self.latency_sum, 6), "wait": self.wait, "wait_sum": round(self.wait_sum, 6),
                "cold_starts": self.cold_starts}

    @classmethod
    def from_json(cls, data: dict) -> "TrafficAgg":
        agg = cls()
        agg.requests = int(data.get("requests", 0))
        for name in ("codes", "latency", "wait"):
            values = list(data.get(name) or [])
            target = getattr(agg, name)
            for i, v in enumerate(values[:len(target)]):
                target[i] = int(v)
        agg.latency_sum = float(data.get("latency_sum", 0.0))
        agg.wait_sum = float(data.get("wait_sum", 0.0))
        agg.cold_starts = int(data.get("cold_starts", 0))
        return agg

    @property
    def errors(self) -> int:
        return self.codes[4]


def quantile(q: float, counts: list[int]) -> float | None:
    """The q-quantile of a histogram over BUCKETS (linear within a bucket, as Prometheus's
    histogram_quantile); None without observations."""
    total = sum(counts)
    if total == 0:
        return None
    rank = q * total
    seen = 0
    for i, count in enumerate(counts):
        if seen + count >= rank and count > 0:
            if i >= len(BUCKETS):  # +Inf bucket: the highest finite bound is all we know
                return BUCKETS[-1]
            low = BUCKETS[i - 1] if i > 0 else 0.0
            high = BUCKETS[i]
            return low + (high - low) * (rank - seen) / count
        seen += count
    return BUCKETS[-1]


def usage_json(values: dict[str, float | None]) -> dict:
    """One resource sample as stored: sums and counts per figure, so buckets merge into means."""
    out: dict[str, float] = {}
    for name in USAGE_FIELDS:
        value = values.get(name)
        if value is not None and math.isfinite(value):
            out[name] = float(value)
            out[name + "_n"] = 1
    return out


def merge_json(kind: str, a: dict, b: dict) -> dict:
    if kind == TRAFFIC:
        agg = TrafficAgg.from_json(a)
        agg.add(TrafficAgg.from_json(b))
        return agg.to_json()
    out = dict(a)
    for key, value in b.items():
        out[key] = out.get(key, 0) + value
    return out


def usage_means(data: dict) -> dict[str, float | None]:
    return {name: (data[name] / data[name + "_n"]) if data.get(name + "_n") else None for name in USAGE_FIELDS}


# ---------------------------------------------------------------- writing


@dataclass
class Point:
    endpoint: str
    instance_id: str  # "" for the endpoint as a whole
    at: float  # any time within the step it belongs to
    data: dict


class MetricsWriter:
    """Writes one source's points: a raw row per step and its share of the 5-minute row."""

    def __init__(self, db, source: str, step: float, raw_retention: float, retention: float):
        self.db, self.source = db, source[:64]
        self.step = max(1, int(step))
        self.raw_retention, self.retention = raw_retention, retention
        self._last_pruned = 0.0

    def write(self, kind: str, points: Iterable[Point]) -> int:
        points = list(points)
        if not points:
            self._maybe_prune()
            return 0
        written = 0
        with self.db.session() as session:
            names = {p.endpoint for p in points}
            ids = dict(session.execute(select(Endpoint.name, Endpoint.id).where(Endpoint.name.in_(names))).all())
            for p in points:
                endpoint_id = ids.get(p.endpoint)
                if endpoint_id is None:
                    continue
                raw_at = int(p.at // self.step * self.step)
                self._upsert(session, kind, endpoint_id, p.instance_id, self.step, raw_at, p.data)
                self._upsert(session, kind, endpoint_id, p.instance_id, ROLLUP_STEP,
                             int(p.at // ROLLUP_STEP * ROLLUP_STEP), p.data)
                written += 1
        self._maybe_prune()
        return written

    def _upsert(self, session, kind: str, endpoint_id: int, instance_id: str, step: int, at: int, data: dict) -> None:
        row = session.scalar(select(MetricPoint).where(and_(
            MetricPoint.endpoint_id == endpoint_id, MetricPoint.instance_id == instance_id, MetricPoint.kind == kind,
            MetricPoint.step == step, MetricPoint.at == at, MetricPoint.source == self.source)))
        if row is None:
            session.add(MetricPoint(endpoint_id=endpoint_id, instance_id=instance_id, kind=kind, step=step, at=at,
                                    source=self.source, data=data))
        else:
            row.data = merge_json(kind, row.data or {}, data)

    def _maybe_prune(self) -> None:
        """Past its retention a row goes; any writer may prune (idempotent), at most once a minute."""
        now = time.time()
        if now - self._last_pruned < 60:
            return
        self._last_pruned = now
        with self.db.session() as session:
            session.execute(delete(MetricPoint).where(MetricPoint.step != ROLLUP_STEP,
                                                      MetricPoint.at < now - self.raw_retention))
            session.execute(delete(MetricPoint).where(MetricPoint.step == ROLLUP_STEP,
                                                      MetricPoint.at < now - self.retention))


# ---------------------------------------------------------------- reading


@dataclass(frozen=True)
class Range:
    name: str
    seconds: int
    step: int  # seconds per point drawn
    rollup: bool  # read the 5-minute rows (else the raw ones)


RANGES = {
    "1h": Range("1h", 3600, 60, False),
    "24h": Range("24h", 86400, 300, True),
    "7d": Range("7d", 7 * 86400, 3600, True),
}


def _rows(session, endpoint_id: int, kind: str, start: float, end: float, rollup: bool,
          instances: bool) -> list[MetricPoint]:
    step_filter = MetricPoint.step == ROLLUP_STEP if rollup else MetricPoint.step != ROLLUP_STEP
    instance_filter = MetricPoint.instance_id != "" if instances else MetricPoint.instance_id == ""
    return list(session.scalars(select(MetricPoint).where(
        MetricPoint.endpoint_id == endpoint_id, MetricPoint.kind == kind, step_filter, instance_filter,
        MetricPoint.at >= start - ROLLUP_STEP, MetricPoint.at < end).order_by(MetricPoint.at)))


def times(rng: Range, now: float) -> list[int]:
    """The start of every point of a range ending now, oldest first."""
    last = int(now // rng.step * rng.step)
    count = rng.seconds // rng.step
    return [last - rng.step * i for i in range(count - 1, -1, -1)]


def traffic_series(session, endpoint_id: int, rng: Range, now: float) -> list[tuple[int, TrafficAgg, float]]:
    """(point start, the requests of that point, the seconds it covers) for each point."""
    points = times(rng, now)
    start = points[0]
    buckets = {t: TrafficAgg() for t in points}
    for row in _rows(session, endpoint_id, TRAFFIC, start, now + 1, rng.rollup, instances=False):
        t = int(row.at // rng.step * rng.step)
        if t in buckets:
            buckets[t].add(TrafficAgg.from_json(row.data or {}))
    # The newest point is still filling: its rate is over the seconds it has had so far.
    return [(t, buckets[t], max(1.0, min(rng.step, now - t))) for t in points]


def usage_series(session, endpoint_id: int, rng: Range, now: float) -> dict[str, list[dict[str, float | None]]]:
    """Instance id -> one mean of its resource figures per point (None where nothing was measured)."""
    points = times(rng, now)
    index = {t: i for i, t in enumerate(points)}
    sums: dict[str, list[dict]] = {}
    for row in _rows(session, endpoint_id, USAGE, points[0], now + 1, rng.rollup, instances=True):
        i = index.get(int(row.at // rng.step * rng.step))
        if i is None:
            continue
        series = sums.setdefault(row.instance_id, [{} for _ in points])
        series[i] = merge_json(USAGE, series[i], row.data or {})
    return {iid: [usage_means(d) for d in series] for iid, series in sums.items()}
