"""What an instance costs: a price per GPU type per hour (and one for CPU-only instances), times
the time it was billed (README.md "Cost").

Billed time is ready -> stopped, read from the instance's own `ready_at` and `stopped_at`, the
timestamps the detail page and the API show; while the instance runs, `stopped_at` is now, so its
cost grows as it runs instead of appearing when it stops. Queued, provisioning and starting time
is never billed: an instance that never became ready costs nothing.

An instance is billed at the price of the hour when it became ready (`Instance.price_per_hour`,
written by the worker with `ready_at`): changing STANDBY_PRICES later changes what new instances
cost, never what a past one did, so the totals on the screen do not move under the user's feet.

Pure functions: the web app (list, detail page, API, /metrics) and the worker share them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime, timezone

CPU_KEY = "cpu"


@dataclass(frozen=True)
class PriceList:
    """Prices per hour: per GPU of a type (matched in any case), and per CPU-only instance."""

    gpu_per_hour: dict[str, float] = field(default_factory=dict)
    cpu_instance_per_hour: float = 0.0
    currency: str = "USD"

    def per_hour(self, gpu_type: str, gpu_count: int) -> float:
        """An instance's price per hour: its GPUs at their type's price, or the CPU-only price."""
        if gpu_count > 0:
            wanted = (gpu_type or "").lower()
            for name, price in self.gpu_per_hour.items():
                if name.lower() == wanted:
                    return price * gpu_count
            return 0.0
        return self.cpu_instance_per_hour

    @property
    def configured(self) -> bool:
        return bool(self.gpu_per_hour) or self.cpu_instance_per_hour > 0


def parse_prices(text: str, currency: str = "USD") -> PriceList:
    """`STANDBY_PRICES`, e.g. "T4=0.35,A100=2.93,cpu=0.05": per GPU-hour of each type, and `cpu`
    per hour of an instance without GPUs. Raises ValueError saying what to fix."""
    gpus: dict[str, float] = {}
    cpu = 0.0
    for part in (text or "").split(","):
        part = part.strip()
        if not part:
            continue
        name, sep, raw = part.partition("=")
        name = name.strip()
        try:
            price = float(raw)
        except ValueError:
            price = math.nan
        if not sep or not name or not math.isfinite(price) or price < 0:
            raise ValueError(f"STANDBY_PRICES: write TYPE=price per hour, e.g. T4=0.35,cpu=0.05; got {part!r}")
        if name.lower() == CPU_KEY:
            cpu = price
        else:
            gpus[name] = price
    return PriceList(gpus, cpu, currency or "USD")


def _utc(value: datetime | None) -> datetime | None:
    # SQLite hands back naive datetimes even for timezone-aware columns; every stored time is UTC.
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    return value


def billed_seconds(ready_at: datetime | None, stopped_at: datetime | None, now: datetime,
                   since: datetime | None = None) -> float:
    """Seconds billed from ready to stopped (or now, while it runs), counted from `since` when
    given (this month's share)."""
    ready, stopped, now, since = _utc(ready_at), _utc(stopped_at), _utc(now), _utc(since)
    if ready is None:
        return 0.0
    start = max(ready, since) if since is not None else ready
    end = stopped if stopped is not None else now
    return max(0.0, (end - start).total_seconds())


def cost_of(price_per_hour: float | None, seconds: float) -> float:
    return (price_per_hour or 0.0) * seconds / 3600.0


def month_start(now: datetime) -> datetime:
    """The first instant of `now`'s calendar month, UTC (what "this month" means)."""
    now = _utc(now)
    return now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)


@dataclass
class Usage:
    """An endpoint's (or an instance's) billed time and cost: in all, and this month."""

    billed_seconds: float = 0.0
    cost: float = 0.0
    month_billed_seconds: float = 0.0
    month_cost: float = 0.0
    gpu_seconds: float = 0.0
    running: bool = False  # something in it is still billed (its cost grows)

    def add(self, other: "Usage") -> None:
        self.billed_seconds += other.billed_seconds
        self.cost += other.cost
        self.month_billed_seconds += other.month_billed_seconds
        self.month_cost += other.month_cost
        self.gpu_seconds += other.gpu_seconds
        self.running = self.running or other.running


def price_of(instance, prices: PriceList | None = None) -> float | None:
    """The instance's price per hour: as recorded when it became ready; for one that became ready
    before prices were recorded (an upgrade), today's price of its GPUs."""
    if instance.price_per_hour is not None or instance.ready_at is None or prices is None:
        return instance.price_per_hour
    return prices.per_hour(instance.gpu_type, len(instance.gpus or []))


def instance_usage(instance, now: datetime, prices: PriceList | None = None) -> Usage:
    """An instance row's usage at `now` (its `ready_at`, `stopped_at`, `price_per_hour`, GPUs)."""
    price = price_of(instance, prices)
    seconds = billed_seconds(instance.ready_at, instance.stopped_at, now)
    month = billed_seconds(instance.ready_at, instance.stopped_at, now, since=month_start(now))
    gpus = len(instance.gpus or [])
    running = instance.ready_at is not None and instance.stopped_at is None
    return Usage(seconds, cost_of(price, seconds), month, cost_of(price, month),
                 instance.gpu_seconds if not running else gpus * seconds, running)


def endpoint_usage(instances, now: datetime, prices: PriceList | None = None) -> Usage:
    total = Usage()
    for instance in instances:
        total.add(instance_usage(instance, now, prices))
    return total
