"""The endpoint page's metrics: one answer for the charts (drawn by webapp/static/charts.js with
the vendored uPlot) and for the tables that stand in for them without JavaScript, and for
`GET /api/v1/endpoints/<name>/metrics` (README.md "Metrics").

Request figures and resource use come from the charts' store (common/metrics_store.py);
instances over time and cold starts from the instances' own rows (created, ready, stopped), the
same timestamps the instance table and the bill use.
"""
from __future__ import annotations

from datetime import datetime, timezone

from common.metrics_store import RANGES, quantile, traffic_series, usage_series
from common.models import Endpoint

DEFAULT_RANGE = "1h"


def _ts(value: datetime | None) -> float | None:
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return value.timestamp()


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 3)


def endpoint_metrics(session, endpoint: Endpoint, range_name: str, now: float) -> dict:
    rng = RANGES[range_name]
    traffic = traffic_series(session, endpoint.id, rng, now)
    times = [t for t, _, _ in traffic]
    rate, errors, p50, p95, p99, wait95, requests, cold = [], [], [], [], [], [], [], []
    for _, agg, seconds in traffic:
        requests.append(agg.requests)
        rate.append(round(agg.requests / seconds, 4) if agg.requests else 0.0)
        errors.append(round(100.0 * agg.errors / agg.requests, 3) if agg.requests else None)
        p50.append(_ms(quantile(0.5, agg.latency)))
        p95.append(_ms(quantile(0.95, agg.latency)))
        p99.append(_ms(quantile(0.99, agg.latency)))
        wait95.append(_ms(quantile(0.95, agg.wait)))
        cold.append(agg.cold_starts)
    rows = [(i.id, _ts(i.created_at), _ts(i.ready_at), _ts(i.stopped_at)) for i in endpoint.instances]
    instances = [sum(1 for _, _, ready, stopped in rows
                     if ready is not None and ready < t + rng.step and (stopped is None or stopped > t))
                 for t in times]
    start = times[0]
    starts = sorted(({"at": ready, "instance_id": iid, "seconds": round(ready - created, 3) if created else None}
                     for iid, created, ready, _ in rows if ready is not None and start <= ready <= now + 1),
                    key=lambda c: c["at"])
    usage = {iid: {name: [point[name] if point[name] is None else round(point[name], 2) for point in series]
                   for name in ("cpu", "memory", "gpu", "gpu_memory")}
             for iid, series in usage_series(session, endpoint.id, rng, now).items()}
    return {
        "range": rng.name, "step_seconds": rng.step, "ranges": list(RANGES), "t": times,
        "requests": requests, "requests_per_second": rate, "error_rate_percent": errors,
        "latency_ms": {"p50": p50, "p95": p95, "p99": p99}, "queue_wait_ms": {"p95": wait95},
        "cold_start_requests": cold, "instances": instances, "cold_starts": starts, "usage": usage,
    }


def table_rows(metrics: dict) -> list[dict]:
    """The request chart's points as table rows, newest first; points with no request and no
    instance are left out (a quiet hour is one line: "no requests")."""
    out = []
    for i, t in enumerate(metrics["t"]):
        if not metrics["requests"][i] and not metrics["instances"][i]:
            continue
        out.append({"t": t, "requests": metrics["requests"][i], "rate": metrics["requests_per_second"][i],
                    "errors": metrics["error_rate_percent"][i], "p50": metrics["latency_ms"]["p50"][i],
                    "p95": metrics["latency_ms"]["p95"][i], "p99": metrics["latency_ms"]["p99"][i],
                    "instances": metrics["instances"][i], "cold": metrics["cold_start_requests"][i]})
    return list(reversed(out))


def usage_rows(metrics: dict) -> list[dict]:
    out = []
    for iid, series in sorted(metrics["usage"].items()):
        for i, t in enumerate(metrics["t"]):
            if series["cpu"][i] is None and series["memory"][i] is None:
                continue
            out.append({"t": t, "instance_id": iid, **{k: series[k][i] for k in series}})
    return sorted(out, key=lambda r: (-r["t"], r["instance_id"]))
