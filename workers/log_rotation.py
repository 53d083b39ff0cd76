"""Instance logs are rotated so a chatty instance cannot fill the disk (README.md "Logs").

An instance writes its output straight into `<data dir>/logs/<instance id>.log`, through a file
descriptor the worker handed it at launch (opened for appending) and that outlives the worker.
The file cannot be renamed under it (its writes would follow the renamed file), so it is rotated
as logrotate's `copytruncate` does: once a second the worker looks at every log of its host; one
past `STANDBY_LOG_MAX_BYTES` (64 MiB) is copied to `.1` (older copies shift to `.2`, ... and the
one past `STANDBY_LOG_KEEP`, 3, is deleted), then truncated to zero in place. Appending writers go
on at the new end. An instance's logs thus take at most max × (keep + 1) bytes, plus what it
writes in the second between two looks; lines written between the copy and the truncation (a
moment) are lost. Downloads (webapp/logs_export.py) join the parts, oldest first.
"""
from __future__ import annotations

import asyncio
import logging
import os
import shutil
from pathlib import Path

log = logging.getLogger(__name__)
CHECK_SECONDS = 1.0


def rotated_path(path: Path, number: int) -> Path:
    return path.with_name(f"{path.name}.{number}")


def log_parts(path: Path, keep: int = 99) -> list[Path]:
    """A log's files, oldest first: `.N`, ..., `.1`, then the live file (those that exist)."""
    parts = [rotated_path(path, n) for n in range(keep, 0, -1)]
    return [p for p in parts + [path] if p.is_file()]


def rotate_if_large(path: Path, max_bytes: int, keep: int) -> bool:
    """Copy-and-truncate `path` when it is larger than `max_bytes`; True when it was rotated."""
    try:
        if path.stat().st_size <= max_bytes:
            return False
    except FileNotFoundError:
        return False
    keep = max(1, keep)
    rotated_path(path, keep).unlink(missing_ok=True)
    for number in range(keep - 1, 0, -1):
        older = rotated_path(path, number)
        if older.exists():
            os.replace(older, rotated_path(path, number + 1))
    shutil.copyfile(path, rotated_path(path, 1))
    with open(path, "r+b") as handle:
        handle.truncate(0)
    return True


def rotate_logs(logs_dir: Path, max_bytes: int, keep: int) -> list[str]:
    """Rotate every instance log of this host that grew past `max_bytes`; the names rotated."""
    rotated = []
    try:
        entries = list(os.scandir(logs_dir))
    except FileNotFoundError:
        return rotated
    for entry in entries:
        if entry.name.endswith(".log") and entry.is_file(follow_symlinks=False):
            try:
                if entry.stat().st_size > max_bytes and rotate_if_large(Path(entry.path), max_bytes, keep):
                    rotated.append(entry.name)
            except OSError as err:  # one unreadable log must not stop the others
                log.warning("could not rotate %s: %s", entry.path, err)
    return rotated


async def rotate_forever(logs_dir: Path, max_bytes: int, keep: int, stop: asyncio.Event,
                         every: float = CHECK_SECONDS) -> None:
    if max_bytes <= 0:
        return  # rotation turned off
    while not stop.is_set():
        try:
            rotated = await asyncio.to_thread(rotate_logs, logs_dir, max_bytes, keep)
            for name in rotated:
                log.info("rotated instance log %s (over %d bytes)", name, max_bytes)
        except Exception:  # noqa: BLE001 - a rotator that dies would let a log fill the disk
            log.exception("rotating instance logs failed")
        try:
            await asyncio.wait_for(stop.wait(), every)
        except asyncio.TimeoutError:
            pass
