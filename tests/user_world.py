"""The user's world for end-to-end tests: `app.py up` as the README runs it, used through the JSON
API and the proxy as a user would.

Defaults everywhere unless a test is about a setting: the proxy at its default worker count, no
health path override, commands as users write them. Only what isolates one test run from another
on a shared machine is set: free ports, a data directory, a task queue and host name of its own,
and (to spare a Temporal boot per module) the session's Temporal dev server via TEMPORAL_ADDRESS,
which `up` supports as a documented setting.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import requests

from tests.conftest import USED_ENDPOINT_NAMES, free_port, wait_until

ROOT = Path(__file__).resolve().parent.parent
# Variables of the developer's shell that would change what a fresh `up` does.
_RESET = ("TEMPORAL_ADDRESS", "DATABASE_URL", "STANDBY_GPUS", "STANDBY_PROXY_WORKERS", "STANDBY_BACKEND",
          "STANDBY_HOST", "STANDBY_TASK_QUEUE", "STANDBY_POOL", "PROMETHEUS_MULTIPROC_DIR")


class UpProcess:
    """`python app.py up` in its own data directory; stopped with Ctrl-C (SIGINT)."""

    def __init__(self, tmp_path: Path, python: str = sys.executable, temporal_address: str | None = None,
                 extra_env: dict | None = None):
        self.tmp_path = tmp_path
        self.python = python
        uid = uuid.uuid4().hex[:8]
        self.ports = {"web": free_port(), "proxy": free_port()}
        self.env = {k: v for k, v in os.environ.items() if k not in _RESET and not k.startswith("PYTEST")}
        self.env.update({
            "STANDBY_DATA_DIR": str(tmp_path / "data"),
            "STANDBY_WEB_PORT": str(self.ports["web"]),
            "STANDBY_PROXY_PORT": str(self.ports["proxy"]),
            "STANDBY_TASK_QUEUE": f"standby-user-{uid}",
            "STANDBY_HOST": f"userhost-{uid}",
            "STANDBY_POOL": f"userpool-{uid}",
            "PYTHONUNBUFFERED": "1",
        })
        if temporal_address:
            self.env["TEMPORAL_ADDRESS"] = temporal_address
        else:
            # The embedded dev server: its gRPC port and, at +1000, its Web UI must both be free.
            port = free_temporal_port()
            self.ports["temporal"] = port
            self.env["STANDBY_TEMPORAL_PORT"] = str(port)
        self.env.update(extra_env or {})
        self.log_path = tmp_path / "up.log"
        self.proc: subprocess.Popen | None = None

    @property
    def web(self) -> str:
        return f"http://127.0.0.1:{self.ports['web']}"

    @property
    def proxy(self) -> str:
        return f"http://127.0.0.1:{self.ports['proxy']}"

    def start(self, wait: bool = True, timeout: float = 120) -> "UpProcess":
        self.tmp_path.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([self.python, str(ROOT / "app.py"), "up"], cwd=ROOT, env=self.env,
                                     stdout=self._log, stderr=subprocess.STDOUT)
        if wait:
            wait_until(lambda: self.proc.poll() is not None or "Standby is up" in self.log(), timeout,
                       interval=0.2, message="app.py up to report it is up")
            assert self.proc.poll() is None, self.log()[-4000:]
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout: float = 90) -> int:
        """Ctrl-C, as a user would; returns `up`'s exit status."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
                raise AssertionError(f"app.py up did not stop within {timeout}s:\n{self.log()[-3000:]}")
        self._log.close()
        return self.proc.returncode

    # ---- signing in, as the README says: the first admin `up` made ----
    @property
    def token(self) -> str:
        """The first admin's token, from the file `up` wrote (README.md "Accounts and projects")."""
        return (self.tmp_path / "data" / "cli-token").read_text().strip()

    @property
    def admin_password(self) -> str:
        match = re.search(r"Sign in as admin with password (\S+)", self.log())
        assert match, "app.py up printed no first admin's password:\n" + self.log()[-3000:]
        return match.group(1)

    def browser(self, name: str = "admin", password: str | None = None) -> requests.Session:
        """A session signed in through the login form, as a browser would be."""
        session = requests.Session()
        page = session.get(f"{self.web}/login", timeout=30).text
        csrf = re.search(r'name="csrf_token" type="hidden" value="([^"]+)"', page).group(1)
        answer = session.post(f"{self.web}/login", timeout=30, allow_redirects=False, data={
            "csrf_token": csrf, "name": name, "password": password or self.admin_password})
        assert answer.status_code == 302, answer.text[:2000]
        return session

    # ---- the JSON API, as the README shows it ----
    def api(self, method: str, path: str, **kwargs) -> requests.Response:
        kwargs.setdefault("timeout", 60)
        kwargs["headers"] = {"Authorization": f"Bearer {self.token}", **kwargs.get("headers", {})}
        return requests.request(method, f"{self.web}/api/v1{path}", **kwargs)

    def create(self, spec: dict) -> dict:
        r = self.api("POST", "/endpoints", json=spec)
        assert r.status_code == 201, r.text
        return r.json()

    def endpoint(self, name: str) -> dict:
        r = self.api("GET", f"/endpoints/{name}")
        assert r.status_code == 200, r.text
        return r.json()

    def wait_status(self, name: str, status: str, timeout: float = 60) -> dict:
        def check():
            body = self.endpoint(name)
            return body if body["status"] == status else None

        try:
            return wait_until(check, timeout, interval=0.1, message=f"{name} to be {status}")
        except AssertionError:
            body = self.endpoint(name)
            raise AssertionError(f"{name} is {body['status']!r} ({body.get('status_reason')}), not {status!r}; "
                                 f"instances: {body.get('instances')}\nup log:\n{self.log()[-3000:]}") from None

    def call(self, name: str, path: str = "/", method: str = "GET", **kwargs) -> requests.Response:
        kwargs.setdefault("timeout", 120)
        return requests.request(method, f"{self.proxy}/e/{name}{path}", **kwargs)


def unique(name: str) -> str:
    """An endpoint name no other test of the session used (its workflow id lives as long as the
    session's Temporal server)."""
    assert name not in USED_ENDPOINT_NAMES, f"endpoint name {name!r} already used in this test session"
    USED_ENDPOINT_NAMES.add(name)
    return name


def free_temporal_port() -> int:
    """A free port whose +1000 (the Temporal Web UI) is free too."""
    import socket

    for _ in range(50):
        port = free_port()
        if port + 1000 > 65535:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port + 1000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair for Temporal and its Web UI")


def wait_for(predicate, timeout: float = 30.0, interval: float = 0.05, message: str = "condition"):
    return wait_until(predicate, timeout, interval, message)


def now() -> float:
    return time.time()
