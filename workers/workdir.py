"""Where an instance's files live on a worker host.

Layout under settings.instances_dir:
    <id>/work    the instance's working directory, recreated fresh on every launch
    <id>.json    backend state (pid, port, ...), kept outside the workdir so a restart that
                 wipes the workdir never forgets a process that is still running
    stopped/<id>.json  the same, once the instance is stopped
Logs live in settings.logs_dir/<id>.log so they survive restarts of the instance.
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path

from common.config import Settings

# Instance ids become path components: refuse anything that could climb out of the data dir.
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def check_instance_id(instance_id: str) -> str:
    if not isinstance(instance_id, str) or not _SAFE_ID.match(instance_id) or ".." in instance_id:
        raise ValueError(
            f"instance id {instance_id!r} must be 1-128 letters, digits, '_', '.' or '-' "
            "and start with a letter or digit"
        )
    return instance_id


def instance_dir_for(settings: Settings, instance_id: str) -> Path:
    return settings.instances_dir / check_instance_id(instance_id)


def workdir_for(settings: Settings, instance_id: str) -> Path:
    return instance_dir_for(settings, instance_id) / "work"


def state_path_for(settings: Settings, instance_id: str) -> Path:
    return settings.instances_dir / f"{check_instance_id(instance_id)}.json"


def stopped_state_path_for(settings: Settings, instance_id: str) -> Path:
    """Where the state of a stopped instance goes: out of the directory every launch, liveness
    sweep and exit watch reads, which would otherwise grow by one file per wake."""
    return settings.instances_dir / "stopped" / f"{check_instance_id(instance_id)}.json"


def log_path_for(settings: Settings, instance_id: str) -> Path:
    return settings.logs_dir / f"{check_instance_id(instance_id)}.log"


def prepare_workdir(settings: Settings, instance_id: str, source_dir: str | Path | None = None) -> Path:
    """A fresh, empty workdir for the instance, with source_dir's contents copied in if given.

    Anything an earlier run left behind is removed first: a restarted instance starts from
    its source, never from files the previous process wrote.
    """
    source = None
    if source_dir not in (None, ""):
        source = Path(source_dir).expanduser()
        if not source.exists():
            raise ValueError(f"source_dir {str(source)!r} does not exist on host {settings.host}")
        if not source.is_dir():
            raise ValueError(f"source_dir {str(source)!r} is not a directory")
    workdir = workdir_for(settings, instance_id)
    _remove_tree(workdir)
    workdir.parent.mkdir(parents=True, exist_ok=True)
    if source is None:
        workdir.mkdir()
    else:
        # Links are copied as links: following them could pull in (or loop over) files far
        # outside the source tree.
        shutil.copytree(source, workdir, symlinks=True)
    return workdir


def remove_instance_files(settings: Settings, instance_id: str) -> None:
    """Purge: the workdir, the backend state and the log. Missing files are fine."""
    _remove_tree(instance_dir_for(settings, instance_id))
    from workers.log_rotation import log_parts

    for path in (state_path_for(settings, instance_id), stopped_state_path_for(settings, instance_id),
                 *log_parts(log_path_for(settings, instance_id))):
        path.unlink(missing_ok=True)


def _remove_tree(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)
