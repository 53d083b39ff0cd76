"""The narrow interface the worker's activities need from an instance backend."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


class LaunchRefused(ValueError):
    """The spec cannot run on this host as written; the message says what to change. Never
    retried: the instance fails with this message."""


@dataclass
class LaunchSpec:
    instance_id: str
    endpoint_name: str
    # A shell command. With `{port}` / `$PORT` in it a free port is substituted; without, the
    # server listens on `port` as written (workers/ports.py).
    start_command: str
    # Docker backend: the image to run (start_command, when set, overrides its command).
    image: str
    # The port the server listens on, as the user wrote it (unless the command says $PORT).
    port: int
    # A fresh directory already populated with the instance's source (may be empty).
    workdir: str
    log_path: str
    env: dict[str, str] = field(default_factory=dict)
    gpus: list[int] = field(default_factory=list)
    cpu_cores: float = 1.0
    memory_gb: float = 1.0
    disk_gb: int = 10


@dataclass
class Launched:
    host: str
    address: str  # "127.0.0.1:43121": where the proxy and the health checks reach it
    port: int
    pid: int | None = None
    container_id: str = ""
    # Filled by `adopt`: what the launch recorded, for a retry that takes the instance over.
    started_at: float = 0.0
    log_path: str = ""
    workdir: str = ""


@dataclass
class Liveness:
    alive: bool
    exit_code: int | None = None
    detail: str = ""


class Backend(Protocol):
    name: str

    def launch(self, spec: LaunchSpec) -> Launched:
        """Start the instance. Idempotent per instance id: anything left of an earlier attempt
        for the same id (a worker crashed mid-provision) is stopped first, so there is never
        more than one process per instance."""

    def adopt(self, instance_id: str) -> Launched | None:
        """What a launch of this instance left running on this host, from the backend's own
        durable record (written as the process or container is created, before the launch
        returns): a retried start after a worker crash takes it over instead of starting a
        second one. None when nothing of it runs."""

    def liveness(self, instance_id: str) -> Liveness:
        """Is the instance's process (or container) still running?"""

    def stop(self, instance_id: str, grace_seconds: float) -> None:
        """SIGTERM (docker stop), then SIGKILL after the grace period. Idempotent."""

    def running_instance_ids(self) -> list[str]:
        """Instances this host is running now, for reaping after a worker crash."""

    def running_endpoints(self) -> dict[str, str]:
        """Instances running on this host now, as {instance id: endpoint name}."""

    def exited_instances(self) -> dict[str, str]:
        """Instances that exited without Standby stopping them, as {instance id: endpoint name}
        (the worker's exit watcher tells their workflows at once, workers/exit_watch.py)."""
