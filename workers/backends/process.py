"""The default backend: each instance is a shell command in its own session on this host.

Ports (workers/ports.py): a command with `$PORT` gets a free port and shares the host's network;
a command that listens on the endpoint's fixed `port` runs in its own network namespace behind
workers/netns_relay.py, reached through a host port, so any number of instances of
`python -m http.server 8080` run side by side.

A small JSON state file per instance (pid, process start time, port) lets a restarted worker
find, check and stop instances it did not start itself. The start time read from /proc guards
against PID reuse: a pid is only "ours" while it still has the start time we recorded. Every
instance process also carries STANDBY_INSTANCE_STATE=<state path> in its environment, so
processes left by a worker that crashed between spawning and recording them can still be found.

Resources are enforced (README.md "Resources are enforced"): each instance runs in its own
cgroup limiting its CPU (`cpu_cores`), memory (`memory_gb`) and process count where the host
offers cgroups (workers/cgroups.py), and a watchdog stops an instance whose directory grows past
its `disk_gb`, saying so.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common.config import Settings
from workers.backends.base import LaunchRefused, LaunchSpec, Launched, Liveness
from workers.cgroups import Cgroups, describe_oom, join_command
from workers.ports import (
    RELAY_SCRIPT,
    fixed_port_refusal,
    namespace_mode,
    substitute_port,
    uses_port_placeholder,
)
from workers import isolation
from workers.workdir import check_instance_id, state_path_for, stopped_state_path_for

# Worker configuration (database URL, secret key, Temporal address) is none of an instance's
# business: user code must not be able to read it from its environment.
log = logging.getLogger("worker")
# An instance that runs as a uid of its own joins its cgroups as root, then becomes that uid:
# a process cannot always move itself into a cgroup once it is not root (README.md "Resources
# are enforced").
SETPRIV = shutil.which("setpriv") or ""

_INTERNAL_ENV_PREFIXES = ("STANDBY_", "TEMPORAL_", "FLASK_")
_INTERNAL_ENV_NAMES = {"DATABASE_URL", "SECRET_KEY", "CUDA_VISIBLE_DEVICES", "PORT"}
MARKER_ENV = "STANDBY_INSTANCE_STATE"

# A port handed out is not offered again for this long, even if nothing listens on it yet:
# the server of the instance that got it may still be starting.
_PORT_QUARANTINE_SECONDS = 120.0
_POLL_SECONDS = 0.05
_KILL_WAIT_SECONDS = 5.0


def instance_environment(base: dict[str, str], spec: LaunchSpec, port: int, marker: str) -> dict[str, str]:
    env = {
        key: value
        for key, value in base.items()
        if key not in _INTERNAL_ENV_NAMES and not key.startswith(_INTERNAL_ENV_PREFIXES)
    }
    env.update({str(k): str(v) for k, v in (spec.env or {}).items()})
    # Set last so a user's env cannot take a port or GPUs it was not granted. An empty
    # CUDA_VISIBLE_DEVICES hides every GPU from a CPU-only instance.
    env["PORT"] = str(port)
    # A fallback `python` for commands written as in tutorials, where the host has only
    # python3: the worker's own interpreter directory goes last, so the user's PATH wins.
    interpreter_dir = os.path.dirname(sys.executable)
    if interpreter_dir not in env.get("PATH", "").split(os.pathsep):
        env["PATH"] = os.pathsep.join(p for p in (env.get("PATH", ""), interpreter_dir) if p)
    env["CUDA_VISIBLE_DEVICES"] = ",".join(str(index) for index in spec.gpus)
    env["STANDBY_INSTANCE_ID"] = spec.instance_id
    env[MARKER_ENV] = marker
    return env


class PortAllocator:
    """Free ports on the bind address, never handing out the same one twice within a quarantine
    period: the server of the instance that got it may not be listening yet."""

    def __init__(self, quarantine_seconds: float = _PORT_QUARANTINE_SECONDS, bind: str = "127.0.0.1"):
        self._quarantine = quarantine_seconds
        self._bind = bind
        self._lock = threading.Lock()
        self._recent: dict[int, float] = {}

    def allocate(self, taken: set[int] | None = None) -> int:
        with self._lock:
            now = time.monotonic()
            self._recent = {p: t for p, t in self._recent.items() if now - t < self._quarantine}
            avoid = set(taken or ()) | set(self._recent)
            for _ in range(100):
                family = socket.AF_INET6 if ":" in self._bind else socket.AF_INET
                with socket.socket(family, socket.SOCK_STREAM) as sock:
                    sock.bind((self._bind, 0))
                    port = sock.getsockname()[1]
                if port not in avoid:
                    self._recent[port] = now
                    return port
        raise RuntimeError(f"could not find a free port on {self._bind} for the instance")


class _Proc:
    __slots__ = ("pid", "state", "pgid", "start_time")

    def __init__(self, pid: int, state: str, pgid: int, start_time: int | None):
        self.pid, self.state, self.pgid, self.start_time = pid, state, pgid, start_time

    @property
    def running(self) -> bool:
        return self.state not in ("Z", "X")


def _read_proc(pid: int) -> _Proc | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        if Path("/proc/self/stat").exists():
            return None
        # No procfs (macOS): fall back to kill(0) and accept that PID reuse goes unnoticed.
        try:
            os.kill(pid, 0)
            return _Proc(pid, "R", os.getpgid(pid), None)
        except (ProcessLookupError, PermissionError):
            return None
    except (ProcessLookupError, PermissionError, OSError):
        return None
    # The command name may contain spaces and parentheses: fields are counted from the last ')'.
    fields = raw[raw.rindex(")") + 2:].split()
    return _Proc(pid, fields[0], int(fields[2]), int(fields[19]))


def _all_pids() -> list[int]:
    try:
        return [int(name) for name in os.listdir("/proc") if name.isdigit()]
    except FileNotFoundError:
        return []


def _has_marker(pid: int, marker: str) -> bool:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False
    return f"{MARKER_ENV}={marker}".encode() in environ.split(b"\0")


class ProcessBackend:
    name = "process"

    def __init__(self, settings: Settings):
        self.settings = settings
        self._guard = threading.Lock()
        self._instance_locks: dict[str, threading.Lock] = {}
        # Popen objects of the instances this worker started, so it can reap them and report
        # their exit codes. After a worker restart it is not their parent and has none.
        self._children: dict[str, subprocess.Popen] = {}
        self._ports = PortAllocator(bind=settings.instance_bind)
        self._cgroups_made: Cgroups | None = None
        self._last_disk_check = 0.0
        # Whether instances run as uids of their own (workers/isolation.py), decided once.
        self.isolation = isolation.decide(settings)

    @property
    def cgroups(self) -> Cgroups | None:
        """The host's cgroups, looked at on first use (None with STANDBY_CGROUPS=off)."""
        if self.settings.cgroups == "off":
            return None
        with self._guard:
            if self._cgroups_made is None:
                self._cgroups_made = Cgroups()
            return self._cgroups_made

    # -- the Backend protocol -------------------------------------------------------------

    def launch(self, spec: LaunchSpec) -> Launched:
        instance_id = check_instance_id(spec.instance_id)
        if not spec.start_command or not spec.start_command.strip():
            raise ValueError("start_command is empty: give the command that starts your server")
        workdir = Path(spec.workdir)
        if not workdir.is_dir():
            raise ValueError(f"workdir {str(workdir)!r} does not exist; prepare it before launching")
        with self._lock_for(instance_id):
            # A retried provision after a worker crash: never leave two processes per instance.
            self._stop_locked(instance_id, self.settings.stop_grace_seconds)
            host_port = self._allocate_port()
            uid, base_env = self._identity(instance_id, workdir)
            user = {"user": uid, "group": uid, "extra_groups": []} if uid is not None else {}
            if uses_port_placeholder(spec.start_command):
                inner_port, mode = host_port, None
                command = substitute_port(spec.start_command, host_port)
                argv = ["/bin/sh", "-c", command]
            else:
                inner_port, mode = spec.port, namespace_mode()
                if mode is None:
                    raise LaunchRefused(fixed_port_refusal(spec.port))
                command = spec.start_command
                # The relay makes the namespace as root, then starts the command as the instance's uid.
                argv = [sys.executable, str(RELAY_SCRIPT), "--listen", f"{self.settings.instance_bind}:{host_port}",
                        "--port", str(inner_port), "--mode", mode,
                        *(["--uid", str(uid)] if uid is not None else []), "--", "/bin/sh", "-c", command]
                user = {}
            cgroups = self.cgroups
            procs = cgroups.create(instance_id, spec.cpu_cores, spec.memory_gb) if cgroups else []
            if procs and user and not SETPRIV:
                log.warning("instance %s runs without cgroup limits: setpriv (util-linux) is not installed, "
                            "so its first process cannot join them as root and then become uid %s", instance_id, uid)
                cgroups.kill_and_remove(instance_id)
                procs = []
            if procs:  # the first process joins the cgroup, then execs: all it starts is inside
                if user:  # it joins as root, then becomes the instance's uid (see isolation above)
                    argv = [SETPRIV, f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--", *argv]
                    user = {}
                argv = ["/bin/sh", "-c", join_command(procs) + 'exec "$0" "$@"', *argv]
            state_path = state_path_for(self.settings, instance_id)
            env = instance_environment({**os.environ, **base_env}, spec, inner_port, str(state_path))
            log_path = Path(spec.log_path)
            log_path.parent.mkdir(parents=True, exist_ok=True)
            where = (f"port {inner_port} in its own network namespace ({mode}), reached at host port {host_port}"
                     if mode else f"port {host_port}")
            who = (f"as uid {uid}" if uid is not None else
                   f"as the worker's user ({self.isolation.reason}; README.md \"Instance isolation\")")
            with open(log_path, "ab") as log:
                log.write(f"[standby] {_now()} starting instance {instance_id} on {where} {who}: {command}\n".encode())
                log.flush()
                child = subprocess.Popen(
                    argv,
                    cwd=workdir,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    close_fds=True,
                    **user,
                )
            proc = _read_proc(child.pid)
            self._children[instance_id] = child
            self._write_state(instance_id, {
                "instance_id": instance_id,
                "endpoint": spec.endpoint_name,
                "pid": child.pid,
                # start_new_session makes the shell (or the relay) the leader of its own group.
                "pgid": child.pid,
                "start_time": proc.start_time if proc else None,
                "port": host_port,
                "inner_port": inner_port,
                "netns": mode,
                "address": f"{self.settings.advertise_address}:{host_port}",
                "log_path": str(log_path),
                "workdir": str(workdir),
                "uid": uid,
                "command": command,
                "cgroup": bool(procs),
                "disk_gb": spec.disk_gb,
                "started_at": time.time(),
                "stopped": False,
                "exit_code": None,
            })
            return Launched(host=self.settings.host, address=f"{self.settings.advertise_address}:{host_port}",
                            port=host_port, pid=child.pid)

    def adopt(self, instance_id: str) -> Launched | None:
        instance_id = check_instance_id(instance_id)
        state = self._read_state(instance_id)
        if state is None or state.get("stopped") or not self._leader_alive(state):
            return None
        port = int(state["port"])
        return Launched(host=self.settings.host,
                        address=state.get("address") or f"{self.settings.advertise_address}:{port}",
                        port=port, pid=int(state["pid"]), started_at=float(state.get("started_at") or 0.0),
                        log_path=state.get("log_path", ""), workdir=state.get("workdir", ""))

    def liveness(self, instance_id: str) -> Liveness:
        instance_id = check_instance_id(instance_id)
        state = self._read_state(instance_id)
        if state is None:
            return Liveness(False, None, f"no process recorded for instance {instance_id} on {self.settings.host}")
        if state.get("stopped"):
            return Liveness(False, state.get("exit_code"), "stopped by Standby")
        child = self._children.get(instance_id)
        if child is not None and child.pid == state["pid"]:
            code = child.poll()
            if code is not None:
                return Liveness(False, code, self._why_dead(instance_id, state, _describe_exit(code)))
        if self._leader_alive(state):
            return Liveness(True, None, f"pid {state['pid']} running")
        return Liveness(False, None, self._why_dead(instance_id, state,
                                                    f"process {state['pid']} is no longer running"))

    def _why_dead(self, instance_id: str, state: dict, otherwise: str) -> str:
        """What killed an instance, where Standby knows better than its exit status: its disk
        watchdog, or the kernel's OOM killer within its memory limit."""
        if state.get("stop_reason"):
            return state["stop_reason"]
        cgroups = self.cgroups if state.get("cgroup") else None
        if cgroups is not None and cgroups.oom_kills(instance_id) > 0:
            return f"{otherwise}: {describe_oom(cgroups.memory_limit_gb(instance_id))}"
        return otherwise

    def resource_note(self, instance_id: str) -> str:
        """Why a running instance may have stopped answering: the kernel killed some of its
        processes for its memory limit."""
        state = self._read_state(check_instance_id(instance_id)) or {}
        cgroups = self.cgroups if state.get("cgroup") else None
        if cgroups is not None and cgroups.oom_kills(instance_id) > 0:
            return f"a process of it was killed: {describe_oom(cgroups.memory_limit_gb(instance_id))}"
        return ""

    def enforce_disk(self) -> list[str]:
        """Stop every instance whose directory has grown past its disk_gb (at most once per
        STANDBY_DISK_CHECK_SECONDS); the exit watcher then tells its workflow, which records why.
        Returns the ids stopped."""
        now = time.monotonic()
        if now - self._last_disk_check < self.settings.disk_check_seconds:
            return []
        self._last_disk_check = now
        stopped = []
        for path in self.settings.instances_dir.glob("*.json"):
            state = _load_json(path)
            if not state or state.get("stopped") or not state.get("disk_gb") or not state.get("workdir"):
                continue
            used = directory_bytes(Path(state["workdir"]))
            limit = float(state["disk_gb"]) * 1024**3
            if used <= limit or not self._leader_alive(state):
                continue
            instance_id = path.stem
            with self._lock_for(instance_id):
                state = self._read_state(instance_id)
                if not state or state.get("stopped"):
                    continue
                state["stop_reason"] = (f"out of disk: its directory holds {used / 1024**3:.1f} GB, past its "
                                        f"{float(state['disk_gb']):g} GB disk_gb; raise disk_gb or write less")
                self._write_state(instance_id, state)
                _append_log(state.get("log_path"), f"[standby] {_now()} stopping instance {instance_id}: "
                            + state["stop_reason"])
                groups = self._find_groups(instance_id, state)
                _signal_groups(groups, signal.SIGKILL)
                self._wait_groups_empty(instance_id, groups, _KILL_WAIT_SECONDS)
            stopped.append(instance_id)
        return stopped

    def stop(self, instance_id: str, grace_seconds: float) -> None:
        instance_id = check_instance_id(instance_id)
        with self._lock_for(instance_id):
            self._stop_locked(instance_id, grace_seconds)

    def resource_usage(self, instance_id: str):
        """CPU seconds and resident memory of the instance's process tree, for the worker's
        usage sampler (workers/usage.py). None when it does not run."""
        from workers.usage import process_tree_usage

        state = self._read_state(check_instance_id(instance_id))
        if state is None or state.get("stopped") or not self._leader_alive(state):
            return None
        return process_tree_usage(int(state["pid"]))

    def running_instance_ids(self) -> list[str]:
        running = []
        for path in sorted(self.settings.instances_dir.glob("*.json")):
            state = _load_json(path)
            if state and not state.get("stopped") and self._leader_alive(state):
                running.append(path.stem)
        return running

    def running_endpoints(self) -> dict[str, str]:
        running = {}
        for path in self.settings.instances_dir.glob("*.json"):
            state = _load_json(path)
            if state and not state.get("stopped") and self._leader_alive(state):
                running[path.stem] = state.get("endpoint", "")
        return running

    def exited_instances(self) -> dict[str, str]:
        exited = {}
        for path in self.settings.instances_dir.glob("*.json"):
            state = _load_json(path)
            if state and not state.get("stopped") and not self._leader_alive(state):
                self._poll_child(path.stem)  # reap it, so its exit code is known
                exited[path.stem] = state.get("endpoint", "")
        return exited

    def stop_all(self, grace_seconds: float) -> None:
        """Worker shutdown: stop every instance at once, so shutdown takes one grace period."""
        with self._guard:
            ids = set(self._children)
        # Not only live leaders: a leader that exited may have left children in its group.
        for path in self.settings.instances_dir.glob("*.json"):
            state = _load_json(path)
            if state and not state.get("stopped"):
                ids.add(path.stem)
        if not ids:
            return
        with ThreadPoolExecutor(max_workers=min(16, len(ids))) as pool:
            list(pool.map(lambda i: self.stop(i, grace_seconds), sorted(ids)))

    # -- internals ------------------------------------------------------------------------

    def _identity(self, instance_id: str, workdir: Path) -> tuple[int | None, dict[str, str]]:
        """The uid a new instance runs as (None: the worker's user), with its directory given to
        it and the environment that goes with it: HOME and TMPDIR of its own."""
        instance_dir = workdir.parent
        if self.isolation.uids is None or instance_dir.parent != self.settings.instances_dir:
            return None, {}
        with self._guard:
            taken = set()
            for path in self.settings.instances_dir.glob("*.json"):
                state = _load_json(path)
                if state and not state.get("stopped") and state.get("uid") is not None and path.stem != instance_id:
                    taken.add(int(state["uid"]))
            uid = self.isolation.uid_for(instance_id, taken)
        home, tmp = instance_dir / "home", instance_dir / "tmp"
        home.mkdir(exist_ok=True)
        tmp.mkdir(exist_ok=True)
        isolation.give(instance_dir, uid)
        return uid, {"HOME": str(home), "TMPDIR": str(tmp)}

    def _lock_for(self, instance_id: str) -> threading.Lock:
        with self._guard:
            return self._instance_locks.setdefault(instance_id, threading.Lock())

    def _leader_alive(self, state: dict) -> bool:
        proc = _read_proc(int(state["pid"]))
        if proc is None or not proc.running:
            return False
        recorded = state.get("start_time")
        return recorded is None or proc.start_time is None or proc.start_time == recorded

    def _find_groups(self, instance_id: str, state: dict | None) -> set[int]:
        """Process groups that hold at least one live process of this instance.

        A group with a verified member is ours: Linux never reuses a pid as a group id
        while that group still has members.
        """
        marker = str(state_path_for(self.settings, instance_id))
        groups: set[int] = set()
        if state and self._leader_alive(state):
            groups.add(int(state["pgid"]))
        for pid in _all_pids():
            proc = _read_proc(pid)
            if proc is None or not proc.running or proc.pgid in groups:
                continue
            if _has_marker(pid, marker):
                groups.add(proc.pgid)
        # Never signal the worker's own group, whatever a confused environment says.
        groups.discard(os.getpgid(0))
        return groups

    def _stop_locked(self, instance_id: str, grace_seconds: float) -> None:
        state = self._read_state(instance_id)
        groups = self._find_groups(instance_id, state)
        if groups:
            _signal_groups(groups, signal.SIGTERM)
            if not self._wait_groups_empty(instance_id, groups, grace_seconds):
                _signal_groups(groups, signal.SIGKILL)
                self._wait_groups_empty(instance_id, groups, _KILL_WAIT_SECONDS)
        exit_code = self._reap(instance_id)
        if state is not None and state.get("cgroup") and self.cgroups is not None:
            self.cgroups.kill_and_remove(instance_id)  # what left the process groups still dies
        if state is not None and state.get("uid") is not None and state.get("workdir"):
            instance_dir = Path(state["workdir"]).parent
            if instance_dir.parent == self.settings.instances_dir:
                isolation.take_back(instance_dir)
        if state is not None and not state.get("stopped"):
            state.update(stopped=True, stopped_at=time.time(), exit_code=exit_code)
            self._write_state(instance_id, state)
            _append_log(state.get("log_path"), f"[standby] {_now()} instance {instance_id} stopped"
                        + (f" ({_describe_exit(exit_code)})" if exit_code is not None else ""))

    def _wait_groups_empty(self, instance_id: str, groups: set[int], timeout: float) -> bool:
        deadline = time.monotonic() + max(0.0, timeout)
        while True:
            self._poll_child(instance_id)
            if not _groups_have_live_members(groups):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(_POLL_SECONDS)

    def _poll_child(self, instance_id: str) -> None:
        child = self._children.get(instance_id)
        if child is not None:
            child.poll()

    def _reap(self, instance_id: str) -> int | None:
        with self._guard:
            child = self._children.pop(instance_id, None)
        if child is None:
            return None
        try:
            return child.wait(timeout=_KILL_WAIT_SECONDS)
        except subprocess.TimeoutExpired:
            # Still alive after SIGKILL (uninterruptible sleep): keep it to reap later.
            with self._guard:
                self._children.setdefault(instance_id, child)
            return None

    def _allocate_port(self) -> int:
        taken = set()
        for path in self.settings.instances_dir.glob("*.json"):
            state = _load_json(path)
            if state and not state.get("stopped") and state.get("port"):
                taken.add(int(state["port"]))
        return self._ports.allocate(taken)

    def _read_state(self, instance_id: str) -> dict | None:
        state = _load_json(state_path_for(self.settings, instance_id))
        return state if state is not None else _load_json(stopped_state_path_for(self.settings, instance_id))

    def _write_state(self, instance_id: str, state: dict) -> None:
        live, stopped = state_path_for(self.settings, instance_id), stopped_state_path_for(self.settings, instance_id)
        path, other = (stopped, live) if state.get("stopped") else (live, stopped)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{threading.get_ident()}.tmp")
        tmp.write_text(json.dumps(state, indent=1))
        os.replace(tmp, path)  # atomic: a crash never leaves half a state file
        other.unlink(missing_ok=True)


def directory_bytes(root: Path) -> int:
    """Disk space a directory tree takes (allocated blocks, so sparse files count what they
    hold), without following links; walked without recursion."""
    total, stack = 0, [root]
    while stack:
        try:
            with os.scandir(stack.pop()) as entries:
                for entry in entries:
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except OSError:
                        continue
                    total += st.st_blocks * 512
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(Path(entry.path))
        except OSError:
            continue
    return total


def _groups_have_live_members(groups: set[int]) -> bool:
    if not Path("/proc/self/stat").exists():
        return any(_killpg_alive(pgid) for pgid in groups)
    for pid in _all_pids():
        proc = _read_proc(pid)
        if proc is not None and proc.running and proc.pgid in groups:
            return True
    return False


def _killpg_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def _signal_groups(groups: set[int], sig: int) -> None:
    for pgid in groups:
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _load_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "process exited"
    if code < 0:
        try:
            return f"process killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"process killed by signal {-code}"
    return f"process exited with code {code}"


def _append_log(log_path: str | None, line: str) -> None:
    if not log_path:
        return
    try:
        with open(log_path, "a") as log:
            log.write(line + "\n")
    except OSError:
        pass


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
