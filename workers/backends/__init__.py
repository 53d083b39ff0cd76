"""Instance backends: where and how an instance's server runs on a worker host."""
from __future__ import annotations

from common.config import Settings
from workers.backends.base import Backend, LaunchSpec, Launched, Liveness

BACKEND_NAMES = ("process", "docker")


def make_backend(settings: Settings) -> Backend:
    """The backend named by STANDBY_BACKEND. Docker is imported only when chosen, so the
    process backend works on machines without the docker SDK's engine."""
    if settings.backend == "process":
        from workers.backends.process import ProcessBackend

        return ProcessBackend(settings)
    if settings.backend == "docker":
        from workers.backends.docker import DockerBackend

        return DockerBackend(settings)
    raise ValueError(
        f"STANDBY_BACKEND={settings.backend!r} is not a backend; use one of: {', '.join(BACKEND_NAMES)}"
    )


__all__ = ["Backend", "LaunchSpec", "Launched", "Liveness", "make_backend", "BACKEND_NAMES"]
