"""Instances as Docker containers on this host's engine.

Containers use host networking: many instances share one host, so each server listens on a
port Standby allocates and passes as PORT (and substitutes for `{port}` / `$PORT` in the
command), exactly as the process backend does. Labels, not names, identify an instance's
container, so a restarted worker finds what it started before.
"""
from __future__ import annotations

import math
import shlex
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import docker
from docker.errors import APIError, ImageNotFound, NotFound
from docker.types import DeviceRequest

from common.config import Settings
from workers.backends.base import LaunchSpec, Launched, Liveness
from workers.backends.process import PortAllocator, substitute_port
from workers.workdir import check_instance_id

LABEL_INSTANCE = "standby.instance"
LABEL_ENDPOINT = "standby.endpoint"
LABEL_PORT = "standby.port"
# Two Standby installations may share one engine: each only touches its own containers.
LABEL_DATA_DIR = "standby.data_dir"
WORKSPACE = "/workspace"


class DockerBackend:
    name = "docker"

    def __init__(self, settings: Settings, client: docker.DockerClient | None = None):
        self.settings = settings
        # from_env does not connect yet: a worker without an engine fails on first use,
        # with the engine's own error, not at import time.
        self.client = client or docker.from_env()
        self._guard = threading.Lock()
        self._instance_locks: dict[str, threading.Lock] = {}
        self._ports = PortAllocator()
        self._log_threads: dict[str, threading.Thread] = {}

    # -- the Backend protocol -------------------------------------------------------------

    def launch(self, spec: LaunchSpec) -> Launched:
        instance_id = check_instance_id(spec.instance_id)
        if not spec.image:
            raise ValueError("image is empty: the docker backend needs a container image to run")
        workdir = Path(spec.workdir)
        if not workdir.is_dir():
            raise ValueError(f"workdir {str(workdir)!r} does not exist; prepare it before launching")
        self._ensure_image(spec.image)
        with self._lock_for(instance_id):
            self._remove_containers(instance_id, self.settings.stop_grace_seconds)
            port = self._ports.allocate(self._ports_in_use())
            env = {str(k): str(v) for k, v in (spec.env or {}).items()}
            env.update(PORT=str(port), STANDBY_INSTANCE_ID=instance_id)
            command = None
            if spec.start_command and spec.start_command.strip():
                # Exec form: images without a shell (distroless) work; wrap in `sh -c '...'`
                # yourself when you need shell features.
                command = shlex.split(substitute_port(spec.start_command, port))
            device_requests = None
            if spec.gpus:
                device_requests = [DeviceRequest(device_ids=[str(i) for i in spec.gpus],
                                                 capabilities=[["gpu"]])]
            container = self.client.containers.run(
                spec.image,
                command=command,
                detach=True,
                network_mode="host",
                environment=env,
                labels={
                    LABEL_INSTANCE: instance_id,
                    LABEL_ENDPOINT: spec.endpoint_name,
                    LABEL_PORT: str(port),
                    LABEL_DATA_DIR: str(self.settings.data_dir),
                },
                volumes={str(workdir.resolve()): {"bind": WORKSPACE, "mode": "rw"}},
                working_dir=WORKSPACE,
                device_requests=device_requests,
                nano_cpus=int(spec.cpu_cores * 1e9) if spec.cpu_cores else None,
                mem_limit=f"{max(4, int(spec.memory_gb * 1024))}m" if spec.memory_gb else None,
            )
            self._follow_logs(instance_id, container, Path(spec.log_path),
                              f"[standby] starting instance {instance_id} from image {spec.image} "
                              f"on port {port}: container {container.short_id}\n")
            container.reload()
            pid = container.attrs.get("State", {}).get("Pid") or None
            return Launched(host=self.settings.host, address=f"127.0.0.1:{port}", port=port,
                            pid=pid, container_id=container.id)

    def liveness(self, instance_id: str) -> Liveness:
        containers = self._containers(check_instance_id(instance_id))
        if not containers:
            return Liveness(False, None, f"no container for instance {instance_id} on {self.settings.host}")
        container = containers[0]
        state = container.attrs.get("State", {})
        if container.status == "running":
            return Liveness(True, None, f"container {container.short_id} running")
        exit_code = state.get("ExitCode")
        detail = f"container {container.short_id} {container.status}, exit code {exit_code}"
        if state.get("OOMKilled"):
            detail += " (killed: out of memory; raise memory_gb)"
        if state.get("Error"):
            detail += f": {state['Error']}"
        return Liveness(False, exit_code, detail)

    def stop(self, instance_id: str, grace_seconds: float) -> None:
        instance_id = check_instance_id(instance_id)
        with self._lock_for(instance_id):
            self._remove_containers(instance_id, grace_seconds)

    def running_instance_ids(self) -> list[str]:
        containers = self.client.containers.list(filters={
            "label": [f"{LABEL_DATA_DIR}={self.settings.data_dir}"], "status": "running"})
        return sorted({c.labels[LABEL_INSTANCE] for c in containers if LABEL_INSTANCE in c.labels})

    def stop_all(self, grace_seconds: float) -> None:
        ids = self.running_instance_ids()
        if ids:
            with ThreadPoolExecutor(max_workers=min(16, len(ids))) as pool:
                list(pool.map(lambda i: self.stop(i, grace_seconds), ids))

    # -- internals ------------------------------------------------------------------------

    def _lock_for(self, instance_id: str) -> threading.Lock:
        with self._guard:
            return self._instance_locks.setdefault(instance_id, threading.Lock())

    def _ensure_image(self, image: str) -> None:
        try:
            self.client.images.get(image)
            return
        except ImageNotFound:
            pass
        try:
            self.client.images.pull(image)
        except (ImageNotFound, APIError) as exc:
            raise ValueError(f"image {image!r} was not found on host {self.settings.host} and could "
                             f"not be pulled: check the name and tag, or load it there first "
                             f"({getattr(exc, 'explanation', None) or exc})") from exc

    def _containers(self, instance_id: str) -> list:
        return self.client.containers.list(all=True, filters={"label": [
            f"{LABEL_INSTANCE}={instance_id}", f"{LABEL_DATA_DIR}={self.settings.data_dir}"]})

    def _ports_in_use(self) -> set[int]:
        containers = self.client.containers.list(filters={"label": [LABEL_PORT]})
        return {int(c.labels[LABEL_PORT]) for c in containers if c.labels.get(LABEL_PORT, "").isdigit()}

    def _remove_containers(self, instance_id: str, grace_seconds: float) -> None:
        for container in self._containers(instance_id):
            try:
                if container.status in ("running", "restarting", "paused"):
                    # docker stop: SIGTERM, then SIGKILL after the timeout (whole seconds).
                    container.stop(timeout=max(0, math.ceil(grace_seconds)))
                container.remove(force=True)
            except NotFound:
                pass  # removed concurrently: the goal is reached
            except APIError as exc:
                if "already in progress" not in str(exc):
                    raise
        thread = self._log_threads.pop(instance_id, None)
        if thread is not None:
            thread.join(timeout=2.0)

    def _follow_logs(self, instance_id: str, container, log_path: Path, header: str) -> None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "a") as log:
            log.write(header)

        def copy() -> None:
            try:
                with open(log_path, "ab") as log:
                    for chunk in container.logs(stream=True, follow=True):
                        log.write(chunk)
                        log.flush()
            except (NotFound, APIError, OSError):
                pass  # the container went away; what was copied stays

        thread = threading.Thread(target=copy, name=f"logs-{instance_id}", daemon=True)
        thread.start()
        self._log_threads[instance_id] = thread
