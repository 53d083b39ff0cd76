"""Instances as Docker containers on this host's engine.

Each container joins a bridge network (its own network namespace): the server listens on the
port the user declared (PORT, and `{port}` / `$PORT` in the command, are that port), and Docker
publishes it on a free host port bound to STANDBY_INSTANCE_BIND. The proxy and the health probes
reach the instance at STANDBY_ADVERTISE_ADDRESS:<published port>, so several instances of one
fixed-port image share a host. On an engine without bridge networking, containers use the
host's network instead (docker_network.py): a command with `$PORT` gets a port Standby
allocates, and a fixed-port server runs once per port on the host.

Labels, not names, identify an instance's container, so a restarted worker finds what it
started before.
"""
from __future__ import annotations

import errno
import math
import os
import re
import shlex
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import docker
from docker.errors import APIError, ImageNotFound, NotFound
from docker.types import DeviceRequest

from common.config import Settings
from workers.backends.base import LaunchRefused, LaunchSpec, Launched, Liveness
from workers.backends.docker_network import (HOST, Networking, detect_networking, explain_api_error as _explain,
                                             join_host_port, resolve_bind)
from workers.backends.process import PortAllocator
from workers.ports import substitute_port, uses_port_placeholder
from workers.workdir import check_instance_id, log_path_for, workdir_for

LABEL_INSTANCE = "standby.instance"
LABEL_ENDPOINT = "standby.endpoint"
# The port the server listens on: inside its container, or on the host with host networking.
LABEL_PORT = "standby.port"
# Two Standby installations may share one engine: each only touches its own containers.
LABEL_DATA_DIR = "standby.data_dir"
WORKSPACE = "/workspace"
# How the engine says a storage size limit is impossible with its storage driver (overlay2 off
# xfs+pquota, vfs off xfs/quota-enabled filesystems, ...).
_STORAGE_OPT_REFUSED = re.compile(r"quota|storage.?opt|not supported", re.IGNORECASE)
# A host port Docker picked was taken between its choice and the bind: choosing again fixes it.
_PORT_CLASH = re.compile(r"address already in use|port is already allocated", re.IGNORECASE)
_PUBLISH_ATTEMPTS = 3
# The engine refuses a smaller memory limit ("Minimum memory limit allowed is 6MB").
_MIN_MEMORY_MB = 6


class DockerBackend:
    name = "docker"

    def __init__(self, settings: Settings, client: docker.DockerClient | None = None,
                 network: str | None = None):
        """`network`: None finds the best the engine offers (docker_network.py); a network name
        uses that network; "host" uses host networking."""
        self.settings = settings
        # from_env does not connect yet: a worker without an engine fails on first use,
        # with the engine's own error, not at import time.
        self.client = client or docker.from_env()
        self._guard = threading.Lock()
        self._instance_locks: dict[str, threading.Lock] = {}
        self._forced_network = network
        self._networking: Networking | None = None
        # With host networking, "is this host port free?" and starting the container that takes
        # it must not interleave between two launches.
        self._host_ports_guard = threading.Lock()
        self._ports = PortAllocator()
        # None until the first launch that asks for a size limit; then the engine's answer.
        self._storage_size_refused: str | None = None
        self._log_threads: dict[str, threading.Thread] = {}

    # -- the Backend protocol -------------------------------------------------------------

    def launch(self, spec: LaunchSpec) -> Launched:
        instance_id = check_instance_id(spec.instance_id)
        if not spec.image:
            raise LaunchRefused("image is empty: the docker backend needs a container image to run")
        if not isinstance(spec.port, int) or not 1 <= spec.port <= 65535:
            raise LaunchRefused(f"port must be the port the server listens on (1-65535), got {spec.port!r}")
        workdir = Path(spec.workdir)
        if not workdir.is_dir():
            raise ValueError(f"workdir {str(workdir)!r} does not exist; prepare it before launching")
        _readable_by_any_user(workdir)
        self._ensure_image(spec.image)
        networking = self.networking()
        with self._lock_for(instance_id):
            self._remove_containers(instance_id, self.settings.stop_grace_seconds)
            if networking.publishes_ports:
                return self._launch_published(spec, instance_id, networking)
            with self._host_ports_guard:
                return self._launch_on_host(spec, instance_id, networking)

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
        elif exit_code == 137:
            # The engine misses an out-of-memory kill that comes within milliseconds of the start.
            detail += " (SIGKILL: out of memory, if nothing else killed it; raise memory_gb)"
        if state.get("Error"):
            detail += f": {state['Error']}"
        return Liveness(False, exit_code, detail)

    def stop(self, instance_id: str, grace_seconds: float) -> None:
        instance_id = check_instance_id(instance_id)
        with self._lock_for(instance_id):
            self._remove_containers(instance_id, grace_seconds)

    def adopt(self, instance_id: str) -> Launched | None:
        """The instance's running container, found by its labels (the engine is the durable
        record); its log is followed again from now on."""
        instance_id = check_instance_id(instance_id)
        running = [c for c in self._containers(instance_id) if c.status == "running"]
        if not running:
            return None
        container = running[0]
        inner = int(container.labels.get(LABEL_PORT, "0") or 0)
        host_port = _published_port(container, inner) or inner
        log_path = log_path_for(self.settings, instance_id)
        if instance_id not in self._log_threads:
            self._follow_logs(instance_id, container, log_path, [
                f"worker restarted: following container {container.short_id} again"], since_now=True)
        return Launched(host=self.settings.host, address=join_host_port(self.settings.advertise_address, host_port),
                        port=host_port, pid=_pid(container), container_id=container.id,
                        started_at=_started_at(container), log_path=str(log_path),
                        workdir=str(workdir_for(self.settings, instance_id)))

    def resource_usage(self, instance_id: str):
        """CPU seconds and memory of the instance's container, from the engine (`docker stats`),
        for the worker's usage sampler (workers/usage.py). None when it does not run."""
        from workers.usage import RawUsage, docker_usage

        running = [c for c in self._containers(check_instance_id(instance_id)) if c.status == "running"]
        if not running:
            return None
        cpu, memory = docker_usage(running[0].stats(stream=False))
        return RawUsage(cpu, memory)

    def running_endpoints(self) -> dict[str, str]:
        containers = self.client.containers.list(filters={
            "label": [f"{LABEL_DATA_DIR}={self.settings.data_dir}"], "status": "running"})
        return {c.labels[LABEL_INSTANCE]: c.labels.get(LABEL_ENDPOINT, "")
                for c in containers if LABEL_INSTANCE in c.labels}

    def exited_instances(self) -> dict[str, str]:
        # Stopping removes a container, so one that is still here but exited stopped on its own.
        containers = self.client.containers.list(all=True, filters={
            "label": [f"{LABEL_DATA_DIR}={self.settings.data_dir}"], "status": "exited"})
        return {c.labels[LABEL_INSTANCE]: c.labels.get(LABEL_ENDPOINT, "")
                for c in containers if LABEL_INSTANCE in c.labels}

    def running_instance_ids(self) -> list[str]:
        containers = self.client.containers.list(filters={
            "label": [f"{LABEL_DATA_DIR}={self.settings.data_dir}"], "status": "running"})
        return sorted({c.labels[LABEL_INSTANCE] for c in containers if LABEL_INSTANCE in c.labels})

    def stop_all(self, grace_seconds: float) -> None:
        ids = self.running_instance_ids()
        if ids:
            with ThreadPoolExecutor(max_workers=min(16, len(ids))) as pool:
                list(pool.map(lambda i: self.stop(i, grace_seconds), ids))

    def networking(self) -> Networking:
        """What instance containers join on this engine: found on first use, then kept."""
        with self._guard:
            if self._networking is None:
                self._networking = detect_networking(self.client, self._forced_network)
            return self._networking

    # -- the two ways to start ------------------------------------------------------------

    def _launch_published(self, spec: LaunchSpec, instance_id: str, networking: Networking) -> Launched:
        # Its own network namespace: the declared port is free inside whatever else runs here.
        port = spec.port
        bind = resolve_bind(self.settings.instance_bind)
        for attempt in range(1, _PUBLISH_ATTEMPTS + 1):
            try:
                # Host port None: Docker picks a free one and binds it in the same step, so two
                # launches can never be handed the same port.
                container, notes = self._run(spec, instance_id, port, networking,
                                             ports={f"{port}/tcp": (bind, None)})
                break
            except APIError as exc:
                explanation = _explain(exc)
                if _PORT_CLASH.search(explanation) and attempt < _PUBLISH_ATTEMPTS:
                    continue
                if "cannot assign requested address" in explanation:
                    raise LaunchRefused(
                        f"Docker could not publish port {port} on {bind} (STANDBY_INSTANCE_BIND="
                        f"{self.settings.instance_bind}): that is not an address of host {self.settings.host}. "
                        f"Use 127.0.0.1 when the proxy runs on this host's network, or the docker0 bridge "
                        f"address (host.docker.internal with extra_hosts host-gateway) when it runs in a "
                        f"container ({explanation})") from exc
                if isinstance(exc, NotFound) and "network" in explanation:
                    with self._guard:  # removed since it was found: the next attempt finds another
                        self._networking = None
                raise
        host_port = _published_port(container, port)
        address = join_host_port(self.settings.advertise_address, host_port)
        where = (f"published at {bind}:{host_port}, reached at {address}" if host_port else
                 "not published: the container stopped before Docker published its port")
        self._follow_logs(instance_id, container, Path(spec.log_path), [
            f"networking on this engine: {networking.description}", *notes,
            f"starting instance {instance_id} from image {spec.image}: container {container.short_id}, "
            f"listening on port {port} inside, {where}"])
        return Launched(host=self.settings.host, address=address, port=host_port,
                        pid=_pid(container), container_id=container.id)

    def _launch_on_host(self, spec: LaunchSpec, instance_id: str, networking: Networking) -> Launched:
        if _uses_port_placeholder(spec.start_command):
            port = self._ports.allocate(self._host_ports_in_use())
        else:
            # The image's own command, or one with a fixed port: it listens on the declared port.
            port = spec.port
            self._check_host_port_free(port, instance_id, networking)
        container, notes = self._run(spec, instance_id, port, networking, ports=None)
        container.reload()
        address = join_host_port(self.settings.advertise_address, port)
        self._follow_logs(instance_id, container, Path(spec.log_path), [
            f"networking on this engine: {networking.description}", *notes,
            f"starting instance {instance_id} from image {spec.image}: container {container.short_id}, "
            f"on the host's network, port {port}, reached at {address}"])
        return Launched(host=self.settings.host, address=address, port=port,
                        pid=_pid(container), container_id=container.id)

    def _check_host_port_free(self, port: int, instance_id: str, networking: Networking) -> None:
        change = (f"Put $PORT in the start command so Standby passes each instance a free port, or give "
                  f"the engine a bridge network (dockerd without --bridge=none) so each container listens "
                  f"on port {port} in its own network namespace. This engine: {networking.description}")
        holders = sorted(c.labels.get(LABEL_INSTANCE, "?") for c in self._host_network_containers()
                         if c.labels.get(LABEL_PORT) == str(port))
        if holders:
            raise LaunchRefused(f"port {port} on host {self.settings.host} is taken by instance {holders[0]}: with "
                             f"host networking a fixed-port server runs once per port. {change}")
        if not _free_on_loopback(port):
            raise LaunchRefused(f"port {port} on host {self.settings.host} is in use by another program, so "
                             f"instance {instance_id} could not listen on it. {change}")

    def _run(self, spec: LaunchSpec, instance_id: str, port: int, networking: Networking, ports):
        """Create and start the container; return it and the log lines worth adding."""
        env = {str(k): str(v) for k, v in (spec.env or {}).items()}
        env.update(PORT=str(port), STANDBY_INSTANCE_ID=instance_id)
        command = None
        if spec.start_command and spec.start_command.strip():
            # Exec form: images without a shell (distroless) work; wrap in `sh -c '...'`
            # yourself when you need shell features.
            command = shlex.split(substitute_port(spec.start_command, port))
        device_requests = None
        if spec.gpus:
            device_requests = [DeviceRequest(device_ids=[str(i) for i in spec.gpus], capabilities=[["gpu"]])]
        network = {"network_mode": HOST} if networking.network == HOST else {"network": networking.network,
                                                                             "ports": ports}
        options = dict(
            command=command,
            detach=True,
            environment=env,
            labels={
                LABEL_INSTANCE: instance_id,
                LABEL_ENDPOINT: spec.endpoint_name,
                LABEL_PORT: str(port),
                LABEL_DATA_DIR: str(self.settings.data_dir),
            },
            # Its own working directory only, never the data dir; no privileges, and none to gain
            # through setuid binaries (README.md "Instance isolation").
            volumes={str(Path(spec.workdir).resolve()): {"bind": WORKSPACE, "mode": "rw"}},
            working_dir=WORKSPACE,
            privileged=False,
            security_opt=["no-new-privileges:true"],
            device_requests=device_requests,
            nano_cpus=int(spec.cpu_cores * 1e9) if spec.cpu_cores else None,
            mem_limit=f"{max(_MIN_MEMORY_MB, int(spec.memory_gb * 1024))}m" if spec.memory_gb else None,
            **network,
        )
        notes: list[str] = []
        try:
            if spec.disk_gb and self._storage_size_refused is None:
                try:
                    return self.client.containers.run(
                        spec.image, storage_opt={"size": f"{spec.disk_gb}G"}, **options), notes
                except APIError as exc:
                    if not _STORAGE_OPT_REFUSED.search(_explain(exc)):
                        raise
                    self._storage_size_refused = _explain(exc)
                    self._remove_containers(instance_id, 0)
            if spec.disk_gb:
                notes.append(f"disk_gb={spec.disk_gb} is not enforced: storage driver {self._storage_driver()} "
                             f"cannot limit a container's size here ({self._storage_size_refused})")
            return self.client.containers.run(spec.image, **options), notes
        except Exception:
            # A container created but not started (port or device errors) must not linger.
            self._remove_containers(instance_id, 0)
            raise

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
            raise LaunchRefused(f"image {image!r} was not found on host {self.settings.host} and could "
                             f"not be pulled: check the name and tag, or load it there first "
                             f"({getattr(exc, 'explanation', None) or exc})") from exc

    def _storage_driver(self) -> str:
        try:
            return str(self.client.info().get("Driver") or "?")
        except APIError:
            return "?"

    def _containers(self, instance_id: str) -> list:
        return self.client.containers.list(all=True, filters={"label": [
            f"{LABEL_INSTANCE}={instance_id}", f"{LABEL_DATA_DIR}={self.settings.data_dir}"]})

    def _host_network_containers(self) -> list:
        # Every Standby installation on this engine: they all share the host's ports.
        containers = self.client.containers.list(filters={"label": [LABEL_PORT]})
        return [c for c in containers if c.attrs.get("HostConfig", {}).get("NetworkMode") == HOST]

    def _host_ports_in_use(self) -> set[int]:
        return {int(c.labels[LABEL_PORT]) for c in self._host_network_containers()
                if c.labels.get(LABEL_PORT, "").isdigit()}

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

    def _follow_logs(self, instance_id: str, container, log_path: Path, header: list[str],
                     since_now: bool = False) -> None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "a") as log:
            log.writelines(f"[standby] {line}\n" for line in header)
        since = {"since": int(time.time())} if since_now else {}

        def copy() -> None:
            try:
                with open(log_path, "ab") as log:
                    for chunk in container.logs(stream=True, follow=True, **since):
                        log.write(chunk)
                        log.flush()
            except (NotFound, APIError, OSError):
                pass  # the container went away; what was copied stays

        thread = threading.Thread(target=copy, name=f"logs-{instance_id}", daemon=True)
        thread.start()
        self._log_threads[instance_id] = thread


def _published_port(container, port: int) -> int:
    """The host port Docker chose, read back from the engine; 0 when the container already
    stopped (the engine forgets its bindings then, and its liveness says why)."""
    container.reload()
    bindings = (container.attrs.get("NetworkSettings") or {}).get("Ports") or {}
    for binding in bindings.get(f"{port}/tcp") or []:
        if str(binding.get("HostPort", "")).isdigit():
            return int(binding["HostPort"])
    return 0


def _pid(container) -> int | None:
    return container.attrs.get("State", {}).get("Pid") or None


def _uses_port_placeholder(command: str) -> bool:
    return uses_port_placeholder(command)


def _started_at(container) -> float:
    from datetime import datetime

    raw = (container.attrs.get("State") or {}).get("StartedAt", "")
    try:
        # The engine writes nanoseconds: fromisoformat takes at most microseconds.
        head, _, rest = raw.partition(".")
        fraction = "".join(ch for ch in rest if ch.isdigit())[:6]
        return datetime.fromisoformat(f"{head}.{fraction or '0'}+00:00").timestamp()
    except ValueError:
        return time.time()


def _free_on_loopback(port: int) -> bool:
    """Nothing listens on the port (on 127.0.0.1 or every address): a bind that is never listened on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # Connections of an earlier server in TIME_WAIT do not make the port busy.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return False
            raise
    return True


def _readable_by_any_user(workdir: Path) -> None:
    """The mounted working directory readable by whatever user the image runs as (the worker
    writes it with umask 077; the container sees this directory and nothing around it)."""
    for root, dirs, files in os.walk(workdir):
        os.chmod(root, 0o755)
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, os.stat(path).st_mode | 0o444)
