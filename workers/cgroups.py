"""Resource limits for process-backend instances: CPU, memory and a process count, with cgroups
(docs/architecture.md "Hosts and pools": resources are enforced, not only recorded).

One cgroup per instance under `standby/<instance id>`, on cgroup v2 (the unified hierarchy with the
cpu, memory and pids controllers) or, where a host still mounts v1 hierarchies, on v1 (`cpu`,
`memory`, `pids`). The instance's first process joins it before it runs the user's command (the
launcher writes its own pid into each `cgroup.procs`, then execs), so everything the command
starts is inside from the start; the limits are written before that.

- CPU: a quota of `cpu_cores` CPUs per period (v2 `cpu.max`, v1 `cpu.cfs_quota_us`).
- Memory: `memory_gb` (v2 `memory.max`, no swap beyond it; v1 `memory.limit_in_bytes`). An
  instance killed for going over it is recognised by the cgroup's OOM-kill counter, so its
  death says "out of memory (OOM: 2 GB limit)" rather than "killed by SIGKILL".
- Processes: at most PIDS_MAX (a fork bomb stays inside).

Where neither is usable (no root, no delegation, a container without cgroup access), instances
run unlimited and the worker says so once in its log; `Cgroups.mode` is None then.
"""
from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path

log = logging.getLogger(__name__)
PIDS_MAX = 4096
PERIOD_US = 100_000
_V1 = ("cpu", "memory", "pids")


class Cgroups:
    def __init__(self, root: Path = Path("/sys/fs/cgroup"), name: str = "standby"):
        self.root, self.name = root, name
        self.mode = self._detect()

    # ---- detection ----
    def _detect(self) -> str | None:
        try:
            if self._v2_usable():
                return "v2"
            if self._v1_usable():
                return "v1"
        except OSError as exc:
            log.warning("cgroups unusable here (%s): instances run without CPU and memory limits", exc)
            return None
        log.warning("no usable cgroups (v2 with cpu, memory, pids, or v1 hierarchies): instances run without "
                    "CPU and memory limits")
        return None

    def _v2_usable(self) -> bool:
        controllers = self.root / "cgroup.controllers"
        if not controllers.exists() or not {"cpu", "memory", "pids"} <= set(controllers.read_text().split()):
            return False
        parent = self.root / self.name
        parent.mkdir(exist_ok=True)
        for level in (self.root, parent):  # delegate the controllers down to the instances
            (level / "cgroup.subtree_control").write_text("+cpu +memory +pids")
        return True

    def _v1_usable(self) -> bool:
        if not all((self.root / c / "cgroup.procs").exists() for c in _V1):
            return False
        for controller in _V1:
            (self.root / controller / self.name).mkdir(exist_ok=True)
        return True

    # ---- an instance's cgroup ----
    def _dirs(self, instance_id: str) -> list[Path]:
        if self.mode == "v2":
            return [self.root / self.name / instance_id]
        return [self.root / c / self.name / instance_id for c in _V1]

    def create(self, instance_id: str, cpu_cores: float, memory_gb: float) -> list[str]:
        """Make the instance's cgroup with its limits; returns the `cgroup.procs` files its first
        process writes its pid into. Empty when there are no usable cgroups."""
        if self.mode is None:
            return []
        memory = max(6 * 2**20, int(memory_gb * 2**30))
        quota = max(1000, int(cpu_cores * PERIOD_US))
        try:
            for path in self._dirs(instance_id):
                path.mkdir(exist_ok=True)
            if self.mode == "v2":
                path = self._dirs(instance_id)[0]
                _write(path / "cpu.max", f"{quota} {PERIOD_US}")
                _write(path / "memory.max", str(memory))
                _write(path / "memory.swap.max", "0", optional=True)
                _write(path / "pids.max", str(PIDS_MAX))
            else:
                cpu, mem, pids = self._dirs(instance_id)
                _write(cpu / "cpu.cfs_period_us", str(PERIOD_US))
                _write(cpu / "cpu.cfs_quota_us", str(quota))
                _write(mem / "memory.limit_in_bytes", str(memory))
                _write(mem / "memory.memsw.limit_in_bytes", str(memory), optional=True)
                _write(pids / "pids.max", str(PIDS_MAX))
        except OSError as exc:
            log.warning("could not limit instance %s with cgroups (%s): it runs unlimited", instance_id, exc)
            return []
        return [str(path / "cgroup.procs") for path in self._dirs(instance_id)]

    def oom_kills(self, instance_id: str) -> int:
        """How many of the instance's processes the kernel killed for going over its memory."""
        if self.mode is None:
            return 0
        memory_dir = self._dirs(instance_id)[0 if self.mode == "v2" else 1]
        source = memory_dir / ("memory.events" if self.mode == "v2" else "memory.oom_control")
        try:
            for line in source.read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        except (OSError, ValueError):
            pass
        return 0

    def memory_limit_gb(self, instance_id: str) -> float | None:
        if self.mode is None:
            return None
        memory_dir = self._dirs(instance_id)[0 if self.mode == "v2" else 1]
        try:
            raw = (memory_dir / ("memory.max" if self.mode == "v2" else "memory.limit_in_bytes")).read_text().strip()
            return int(raw) / 2**30
        except (OSError, ValueError):
            return None

    def kill_and_remove(self, instance_id: str) -> None:
        """Kill whatever still runs in the instance's cgroup (a process that left its process
        group with setsid still belongs here), then remove the cgroup."""
        if self.mode is None:
            return
        for path in self._dirs(instance_id):
            try:
                pids = [int(p) for p in (path / "cgroup.procs").read_text().split()]
            except (OSError, ValueError):
                continue
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        self.remove(instance_id)

    def remove(self, instance_id: str, wait_seconds: float = 2.0) -> None:
        """Remove the (empty) cgroup; it empties as the last process is reaped."""
        if self.mode is None:
            return
        deadline = time.monotonic() + wait_seconds
        for path in self._dirs(instance_id):
            while path.exists():
                try:
                    path.rmdir()
                except OSError:
                    if time.monotonic() > deadline:
                        log.info("cgroup %s still busy; left for the next stop", path)
                        break
                    time.sleep(0.05)


def join_command(procs_files: list[str]) -> str:
    """A shell prefix that puts the shell itself into the cgroups, before it execs the command:
    `<prefix> exec /bin/sh -c "$command"`."""
    return "".join(f"echo $$ > '{path}' && " for path in procs_files)


def _write(path: Path, value: str, optional: bool = False) -> None:
    try:
        path.write_text(value)
    except OSError:
        if not optional:
            raise


def describe_oom(limit_gb: float | None) -> str:
    if limit_gb is None:
        limit = "its memory limit"
    else:  # "2.0 GB", "1.5 GB", "0.25 GB"
        limit = f"{limit_gb:.1f} GB limit" if round(limit_gb, 1) == round(limit_gb, 6) else f"{limit_gb:.2f} GB limit"
    return f"out of memory (OOM: {limit}); raise memory_gb"


if __name__ == "__main__":  # a quick look at what this host offers: python -m workers.cgroups
    print(Cgroups().mode or "none", os.getpid())
