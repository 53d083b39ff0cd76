"""What this host's instances use: CPU, memory, GPU (docs/architecture.md "Metrics").

Every `STANDBY_USAGE_SAMPLE_SECONDS` (10 s) the worker measures each instance it runs, as a share
of what its spec grants it (the autoscaler's targets are percentages of that, as Kubernetes'
requests are):

- **CPU %**: CPU seconds used per second over the last interval / `cpu_cores`, from the
  instance's process tree (psutil; the process backend) or its container (`docker stats`).
- **Memory %**: resident memory / `memory_gb`, from the same.
- **GPU % and GPU memory %**: the mean utilisation and memory use of its granted GPUs, from
  `nvidia-smi` where the host has one (declared GPUs, `STANDBY_GPUS`, have nothing to read).

Each sample goes three ways: the worker's Prometheus `/metrics` (gauges per instance), the
charts' store (common/metrics_store.py), and, for an endpoint that scales on a utilisation
target, its workflow (`usage` signal, workflows/autoscale.py).
"""
from __future__ import annotations

import asyncio
import logging
import shutil
import subprocess
import time
from dataclasses import dataclass

from sqlalchemy import select

from common.config import Settings
from common.db import Database
from common.metrics_store import USAGE, MetricsWriter, Point, usage_json
from common.models import I_DRAINING, I_READY, I_STARTING, Endpoint, Instance

log = logging.getLogger(__name__)
MEASURED_STATES = (I_STARTING, I_READY, I_DRAINING)


@dataclass
class RawUsage:
    """Counters read from an instance now: CPU seconds so far (all its processes), memory bytes."""

    cpu_seconds: float
    memory_bytes: int


@dataclass
class GpuReading:
    index: int
    utilisation: float  # percent
    memory_used_mb: float
    memory_total_mb: float


def process_tree_usage(pid: int) -> RawUsage | None:
    """CPU seconds and resident memory of a process and all its descendants (psutil)."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root] + root.children(recursive=True)
    except psutil.Error:
        return None
    cpu, memory = 0.0, 0
    for proc in procs:
        try:
            times = proc.cpu_times()
            cpu += times.user + times.system + getattr(times, "children_user", 0.0) + getattr(times, "children_system", 0.0)
            memory += proc.memory_info().rss
        except psutil.Error:  # it exited between the listing and the reading
            continue
    return RawUsage(cpu, memory)


def docker_usage(stats: dict) -> tuple[float, int]:
    """(CPU seconds so far, memory bytes) from the engine's stats of a container; memory without
    the page cache, as `docker stats` shows it."""
    cpu = float(((stats.get("cpu_stats") or {}).get("cpu_usage") or {}).get("total_usage") or 0) / 1e9
    memory_stats = stats.get("memory_stats") or {}
    cache = (memory_stats.get("stats") or {}).get("inactive_file") or (memory_stats.get("stats") or {}).get("cache") or 0
    return cpu, max(0, int(memory_stats.get("usage") or 0) - int(cache))


def parse_nvidia_smi(text: str) -> dict[int, GpuReading]:
    """`nvidia-smi --query-gpu=index,utilization.gpu,memory.used,memory.total
    --format=csv,noheader,nounits` output, by GPU index; lines it cannot read are skipped."""
    readings = {}
    for line in text.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 4:
            continue
        try:
            index, util, used, total = int(parts[0]), float(parts[1]), float(parts[2]), float(parts[3])
        except ValueError:  # "[N/A]" on GPUs that do not report it
            continue
        readings[index] = GpuReading(index, util, used, total)
    return readings


def read_gpus() -> dict[int, GpuReading]:
    if shutil.which("nvidia-smi") is None:
        return {}
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index,utilization.gpu,memory.used,memory.total",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    return parse_nvidia_smi(out.stdout) if out.returncode == 0 else {}


def gpu_figures(gpus: list[int], readings: dict[int, GpuReading]) -> tuple[float | None, float | None]:
    """(utilisation %, memory %) of an instance's GPUs: their mean; None when none was read."""
    mine = [readings[i] for i in gpus if i in readings]
    if not mine:
        return None, None
    util = sum(r.utilisation for r in mine) / len(mine)
    memory = sum(100.0 * r.memory_used_mb / r.memory_total_mb for r in mine if r.memory_total_mb > 0) / len(mine)
    return util, memory


@dataclass
class _Measured:
    instance_id: str
    endpoint: str
    autoscaled: bool
    figures: dict[str, float | None]


class UsageSampler:
    def __init__(self, settings: Settings, db: Database, backend, client=None):
        self.settings, self.db, self.backend, self.client = settings, db, backend, client
        self.writer = MetricsWriter(db, f"worker:{settings.host}", settings.metrics_step_seconds,
                                    settings.metrics_raw_retention_seconds, settings.metrics_retention_seconds)
        self._last: dict[str, tuple[float, float]] = {}  # instance id -> (monotonic, cpu seconds)
        self._gauges = _Gauges()

    def sample(self) -> list[_Measured]:
        """Measure every instance of this host once (blocking: run it in a thread)."""
        with self.db.session() as session:
            rows = session.execute(
                select(Instance.id, Instance.pid, Instance.gpus, Endpoint.name, Endpoint.cpu_cores, Endpoint.memory_gb,
                       Endpoint.autoscaling, Endpoint.target_cpu_percent, Endpoint.target_memory_percent,
                       Endpoint.target_gpu_percent)
                .join(Endpoint, Instance.endpoint_id == Endpoint.id)
                .where(Instance.host == self.settings.host, Instance.status.in_(MEASURED_STATES))).all()
        readings = read_gpus() if any(row.gpus for row in rows) else {}
        now = time.monotonic()
        measured = []
        for row in rows:
            raw = self._raw(row.id, row.pid)
            if raw is None:
                continue
            cpu_percent = None
            previous = self._last.get(row.id)
            self._last[row.id] = (now, raw.cpu_seconds)
            if previous is not None and now > previous[0]:
                used = max(0.0, raw.cpu_seconds - previous[1]) / (now - previous[0])
                cpu_percent = 100.0 * used / max(row.cpu_cores or 1.0, 1e-6)
            gpu, gpu_memory = gpu_figures(list(row.gpus or []), readings)
            figures = {"cpu": cpu_percent, "memory": 100.0 * raw.memory_bytes / max(1.0, (row.memory_gb or 1.0) * 2**30),
                       "memory_bytes": float(raw.memory_bytes), "gpu": gpu, "gpu_memory": gpu_memory}
            autoscaled = bool(row.autoscaling and (row.target_cpu_percent or row.target_memory_percent
                                                   or row.target_gpu_percent))
            measured.append(_Measured(row.id, row.name, autoscaled, figures))
        gone = set(self._last) - {row.id for row in rows}
        for iid in gone:
            del self._last[iid]
        self._gauges.set(measured)
        at = time.time()
        self.writer.write(USAGE, [Point(m.endpoint, m.instance_id, at, usage_json(m.figures))
                                  for m in measured if m.figures["cpu"] is not None])
        return measured

    def _raw(self, instance_id: str, pid: int | None) -> RawUsage | None:
        reader = getattr(self.backend, "resource_usage", None)
        if reader is not None:
            try:
                return reader(instance_id)
            except Exception as err:  # noqa: BLE001 - one unreadable instance must not stop the others
                log.info("could not read the usage of %s: %s", instance_id, err)
                return None
        return process_tree_usage(pid) if pid else None

    async def tell_workflows(self, measured: list[_Measured]) -> None:
        """The `usage` signal to each endpoint that scales on a utilisation target."""
        from workflows.autoscale import InstanceUsage, UsageReport
        from workflows.contracts import SIGNAL_USAGE, endpoint_workflow_id

        if self.client is None:
            return
        now = time.time()
        by_endpoint: dict[str, list[InstanceUsage]] = {}
        for m in measured:
            if m.autoscaled and m.figures["cpu"] is not None:
                f = m.figures
                by_endpoint.setdefault(m.endpoint, []).append(InstanceUsage(
                    m.instance_id, _rounded(f["cpu"]), _rounded(f["memory"]), _rounded(f["gpu"]), now))
        for endpoint, items in by_endpoint.items():
            try:
                await self.client.get_workflow_handle(endpoint_workflow_id(endpoint)).signal(
                    SIGNAL_USAGE, UsageReport(self.settings.host, now, items))
            except Exception as err:  # noqa: BLE001 - its workflow may be gone; the next sample retries
                log.info("could not send usage to %s: %s", endpoint, err)

    async def run_forever(self, stop: asyncio.Event) -> None:
        every = max(0.2, self.settings.usage_sample_seconds)
        while not stop.is_set():
            try:
                measured = await asyncio.to_thread(self.sample)
                await self.tell_workflows(measured)
            except Exception:  # noqa: BLE001 - a sampler that dies would be worse than a missed sample
                log.exception("sampling instance usage failed")
            try:
                await asyncio.wait_for(stop.wait(), every)
            except asyncio.TimeoutError:
                pass


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


class _Gauges:
    """The worker's Prometheus gauges per instance; an instance that is no longer measured is
    removed, so series do not pile up as instances come and go."""

    def __init__(self) -> None:
        from prometheus_client import Gauge

        labels = ["endpoint", "instance"]
        self.gauges = {
            "cpu": Gauge("standby_instance_cpu_percent", "CPU used, % of the instance's cpu_cores", labels),
            "memory": Gauge("standby_instance_memory_percent", "Resident memory, % of the instance's memory_gb",
                            labels),
            "memory_bytes": Gauge("standby_instance_memory_bytes", "Resident memory of the instance", labels),
            "gpu": Gauge("standby_instance_gpu_percent", "Mean utilisation of the instance's GPUs", labels),
            "gpu_memory": Gauge("standby_instance_gpu_memory_percent", "Mean memory use of the instance's GPUs",
                                labels),
        }
        self.shown: set[tuple[str, str, str]] = set()

    def set(self, measured: list[_Measured]) -> None:
        now_shown = set()
        for m in measured:
            for name, value in m.figures.items():
                if value is not None:
                    self.gauges[name].labels(m.endpoint, m.instance_id).set(value)
                    now_shown.add((name, m.endpoint, m.instance_id))
        for name, endpoint, instance_id in self.shown - now_shown:
            try:
                self.gauges[name].remove(endpoint, instance_id)
            except KeyError:
                pass
        self.shown = now_shown
