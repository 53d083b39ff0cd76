"""A Docker engine for the docker backend tests: the one that answers, or a private throwaway one.

When no daemon answers at DOCKER_HOST (or the default socket) and we are root with a `dockerd`
on PATH (`.ci/run` installs docker.io), `docker_client()` starts a private dockerd whose socket,
data, exec state, pidfile, config and trust key all live in one temporary directory, so it never
touches /var/run/docker.sock, /var/lib/docker or /etc/docker. With no `--containerd` given and
its own exec root, dockerd supervises a private containerd (state under <tmp>/exec/containerd).
vfs + no default bridge + no iptables keep it working in sandboxes without overlayfs or netfilter,
and leave the host's firewall and forwarding alone. It can still create bridge networks (the docker
backend makes one, a `br-<id>` interface with a private subnet in the host's network namespace)
and publish container ports through its userland proxy (docker-proxy), which needs no iptables.
On exit everything it made is removed, networks included, and every process stopped.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

docker = pytest.importorskip("docker")

START_TIMEOUT = 60.0
STOP_TIMEOUT = 20.0


@contextlib.contextmanager
def docker_client():
    """Yield a client for a working engine, or skip saying why there is none."""
    try:
        client = docker.from_env(timeout=10)
        client.ping()
    except Exception as exc:  # any failure to reach an engine means "no Docker here"
        no_daemon = f"no Docker daemon answers ({type(exc).__name__}: {exc})"
    else:
        try:
            yield client
        finally:
            client.close()
        return
    dockerd = shutil.which("dockerd")
    if dockerd is None:
        pytest.skip(f"{no_daemon}; set DOCKER_HOST, or install docker.io so a private dockerd can be started")
    if os.geteuid() != 0:
        pytest.skip(f"{no_daemon}; starting a private {dockerd} needs root")
    engine = PrivateDockerd(dockerd)
    try:
        failure = engine.start()
        if failure:
            pytest.skip(f"{no_daemon}, and a private dockerd did not start: {failure}")
        yield engine.client
    finally:
        engine.stop()


class PrivateDockerd:
    def __init__(self, dockerd: str):
        self.dockerd = dockerd
        # Short, fixed parent: unix socket paths (ours and containerd's) are limited to 108 bytes.
        self.tmp = Path(tempfile.mkdtemp(prefix="standby-dockerd-", dir="/tmp"))
        self.socket = self.tmp / "docker.sock"
        self.log_path = self.tmp / "dockerd.log"
        self.process: subprocess.Popen | None = None
        self.client = None

    def start(self) -> str | None:
        """Start and wait until it answers; return why it failed, or None."""
        failure = self._launch(trust_key_in_config=True)
        # Newer engines dropped the trust key and reject unknown config keys: retry without it.
        if failure and "deprecated-key-path" in failure:
            self._stop_daemon()
            failure = self._launch(trust_key_in_config=False)
        return failure

    def _launch(self, trust_key_in_config: bool) -> str | None:
        # Our own config file, so a host /etc/docker/daemon.json (hosts, data-root...) cannot
        # conflict; the trust key would otherwise be written to /etc/docker/key.json.
        config = {"deprecated-key-path": str(self.tmp / "key.json")} if trust_key_in_config else {}
        (self.tmp / "daemon.json").write_text(json.dumps(config))
        cmd = [self.dockerd, "--host", f"unix://{self.socket}", "--config-file", str(self.tmp / "daemon.json"),
               "--data-root", str(self.tmp / "root"), "--exec-root", str(self.tmp / "exec"),
               "--pidfile", str(self.tmp / "docker.pid"), "--storage-driver=vfs", "--bridge=none",
               "--iptables=false", "--ip6tables=false", "--ip-forward=false", "--ip-masq=false"]
        with open(self.log_path, "ab") as log:
            # Own session: a Ctrl-C at the terminal reaches pytest, whose teardown stops it.
            self.process = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT
        last_error = "no answer"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return f"exited with code {self.process.returncode}: {self._log_reason()}"
            if self.socket.exists():
                client = docker.DockerClient(base_url=f"unix://{self.socket}", timeout=10)
                try:
                    client.ping()
                    self.client = client
                    return None
                except Exception as exc:
                    last_error = f"{type(exc).__name__}: {exc}"
                    client.close()
            time.sleep(0.2)
        return f"did not answer within {START_TIMEOUT:.0f}s ({last_error}): {self._log_reason()}"

    def _log_reason(self) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "no log"
        for line in reversed(lines):
            if "level=fatal" in line or "level=error" in line:
                match = re.search(r'msg="((?:[^"\\]|\\.)*)"', line)
                return match.group(1) if match else line
        return lines[-1] if lines else "empty log"

    def stop(self) -> None:
        if self.client is not None:
            # Remove what the tests made through the daemon, so it unmounts their layers itself.
            with contextlib.suppress(Exception):
                for container in self.client.containers.list(all=True):
                    container.remove(force=True)
                for image in self.client.images.list(all=True):
                    self.client.images.remove(image.id, force=True)
            bridges = self._remove_networks()
            self.client.close()
            self.client = None
        else:
            bridges = []
        self._stop_daemon()
        for bridge in bridges:  # one the daemon could not remove (it stopped, or failed)
            if Path("/sys/class/net", bridge).exists():
                with contextlib.suppress(OSError, subprocess.SubprocessError):
                    subprocess.run(["ip", "link", "delete", bridge], capture_output=True, timeout=30)
        for pid in self._processes_using_tmp():  # its containerd or a shim that outlived it
            _stop_pid(pid, STOP_TIMEOUT / 2)
        self._unmount_all()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def _remove_networks(self) -> list[str]:
        """Remove the networks the tests made; return their bridge interface names."""
        bridges = []
        with contextlib.suppress(Exception):
            for network in self.client.networks.list():
                if network.name in ("bridge", "host", "none"):
                    continue
                options = network.attrs.get("Options") or {}
                bridges.append(options.get("com.docker.network.bridge.name") or f"br-{network.id[:12]}")
                with contextlib.suppress(Exception):
                    network.remove()
        return bridges

    def _stop_daemon(self) -> None:
        if self.process is None:
            return
        containerd_pid = _read_pid(self.tmp / "exec" / "containerd" / "containerd.pid")
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.process = None
        # dockerd stops the containerd it supervises; make sure, but only if it is still ours.
        if containerd_pid and str(self.tmp) in _cmdline(containerd_pid):
            _stop_pid(containerd_pid, STOP_TIMEOUT / 2)

    def _processes_using_tmp(self) -> list[int]:
        own = os.getpid()
        return [int(d) for d in os.listdir("/proc")
                if d.isdigit() and int(d) != own and str(self.tmp) in _cmdline(int(d))]

    def _unmount_all(self) -> None:
        prefix = str(self.tmp)
        with open("/proc/self/mountinfo") as f:
            points = [line.split()[4].replace("\\040", " ") for line in f]
        # Deepest first, so a parent is not busy because of a child.
        for point in sorted({p for p in points if p == prefix or p.startswith(prefix + "/")}, key=len, reverse=True):
            subprocess.run(["umount", "-l", point], capture_output=True, timeout=30)


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _stop_pid(pid: int, timeout: float) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.1)
        if not _alive(pid):
            return
