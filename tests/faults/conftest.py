"""The fault suite's shared `app.py up` and its report.

One `up` for the module, with its own embedded Temporal dev server (so that Temporal itself can
be killed) and one GPU declared (for the queue scenario). Each scenario records what clients saw
(requests served and failed) and how long recovery took; the table is printed at the end of the
run, so CI logs carry the figures.
"""
from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import pytest

from tests.user_world import UpProcess

RESULTS: list[dict] = []


@pytest.fixture(scope="module")
def up(tmp_path_factory):
    world = UpProcess(tmp_path_factory.mktemp("faults"), extra_env={"STANDBY_GPUS": "T4:1"}).start(timeout=180)
    yield world
    status = world.stop()
    assert status == 0, world.log()[-4000:]
    # 0 orphans: Ctrl-C left no instance process of this installation running.
    assert instance_groups(world) == {}, world.log()[-2000:]


def record(scenario: str, served: int, failed: int, recovery_seconds: float | None, note: str = "") -> None:
    RESULTS.append({"scenario": scenario, "served": served, "failed": failed,
                    "recovery_seconds": None if recovery_seconds is None else round(recovery_seconds, 2),
                    "note": note})


def pytest_terminal_summary(terminalreporter):
    if not RESULTS:
        return
    terminalreporter.write_sep("-", "fault suite: what clients saw")
    for row in RESULTS:
        recovery = "-" if row["recovery_seconds"] is None else f"{row['recovery_seconds']:.2f}s"
        terminalreporter.write_line(f"{row['scenario']:<44} served {row['served']:>3}  failed {row['failed']:>3}  "
                                    f"recovered in {recovery:>7}  {row['note']}")


# ---- the parts of `up`, by pid ----
def part_pid(world: UpProcess, part: str) -> int:
    found = re.findall(rf"started {part} \(pid (\d+)\)", world.log())
    assert found, f"no {part} in the up log:\n{world.log()[-2000:]}"
    return int(found[-1])


def kill_part(world: UpProcess, part: str) -> int:
    """SIGKILL a whole part (its process group); returns the pid that was killed."""
    pid = part_pid(world, part)
    os.killpg(pid, signal.SIGKILL)
    return pid


def wait_restarted(world: UpProcess, part: str, old_pid: int, timeout: float = 60) -> float:
    """Seconds until `up` has started the part again."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if part_pid(world, part) != old_pid:
            return time.monotonic() - started
        time.sleep(0.05)
    raise AssertionError(f"{part} was not restarted within {timeout}s:\n{world.log()[-3000:]}")


def children(pid: int) -> list[int]:
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{name}/stat").read_text()
        except OSError:
            continue
        if int(stat[stat.rindex(")") + 2:].split()[1]) == pid:
            out.append(int(name))
    return out


def instance_groups(world: UpProcess) -> dict[str, set[int]]:
    """{instance id: process groups alive with its marker}; two groups for one id = two copies."""
    prefix = f"STANDBY_INSTANCE_STATE={world.tmp_path / 'data' / 'instances'}/".encode()
    groups: dict[str, set[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            environ = Path(f"/proc/{name}/environ").read_bytes().split(b"\0")
            stat = Path(f"/proc/{name}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if fields[0] in ("Z", "X"):
            continue
        for item in environ:
            if item.startswith(prefix):
                instance_id = item[len(prefix):].decode().removesuffix(".json")
                groups.setdefault(instance_id, set()).add(int(fields[2]))
    return groups
