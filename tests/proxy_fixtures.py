"""Real processes for proxy tests: instance servers, the proxy under gunicorn, and the DB rows.

`ProxyWorld` writes Endpoint / Instance / ApiKey rows exactly as the web app and the worker do
(instances `ready` with an `address`), starts real instance processes (tests/proxy_instance.py)
and the real proxy (gunicorn + gevent, proxy/gunicorn_conf.py) on free ports, and stops every
process it started, by pid.
"""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import requests
from sqlalchemy import select

from common.db import Database
from common.schema import upgrade
from common.models import ApiKey, Endpoint, Instance

ROOT = Path(__file__).resolve().parent.parent
INSTANCE_SCRIPT = ROOT / "tests" / "proxy_instance.py"
WS_ECHO_SCRIPT = ROOT / "tests" / "ws_echo_instance.py"


from tests.conftest import free_port  # noqa: E402


def wait_for(predicate, timeout: float = 20.0, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
        except Exception as exc:  # noqa: BLE001 - not up yet
            last = exc
        if last and not isinstance(last, Exception):
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


def stop_process(proc: subprocess.Popen | None, grace: float = 5.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


@dataclass
class InstanceProcess:
    instance_id: str
    port: int
    proc: subprocess.Popen

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @classmethod
    def start(cls, instance_id: str, port: int | None = None, script: Path = INSTANCE_SCRIPT) -> "InstanceProcess":
        port = port or free_port()
        proc = subprocess.Popen(
            [sys.executable, str(script), str(port), instance_id],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        inst = cls(instance_id, port, proc)
        wait_for(lambda: requests.get(f"http://{inst.address}/ping", timeout=1).ok, 15, what=f"instance {instance_id}")
        return inst

    def stop(self) -> None:
        stop_process(self.proc)


class ProxyProcess:
    def __init__(self, env: dict, log_path: Path):
        self.env = env
        self.port = int(env["STANDBY_PROXY_PORT"])
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", str(ROOT / "proxy" / "gunicorn_conf.py"), "proxy.app:application"],
            cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        wait_for(lambda: requests.get(self.url + "/healthz", timeout=1).ok, 30, what="proxy")

    def stop(self) -> None:
        stop_process(self.proc, grace=10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


class ProxyWorld:
    """One data dir + SQLite DB + instance processes + one proxy, for one test."""

    def __init__(self, tmp_path: Path, temporal_address: str | None = None, workers: int = 1, extra_env=None):
        self.tmp_path = tmp_path
        self.data_dir = tmp_path / "data"
        self.env = dict(os.environ)
        self.env.update({
            "STANDBY_DATA_DIR": str(self.data_dir),
            "STANDBY_PROXY_PORT": str(free_port()),
            # No lifecycle in data-plane tests: an address nothing listens on.
            "TEMPORAL_ADDRESS": temporal_address or f"127.0.0.1:{free_port()}",
            "STANDBY_PROXY_REFRESH_SECONDS": "0.1",
            "STANDBY_TRAFFIC_DEBOUNCE_SECONDS": "0.2",
            "STANDBY_PROXY_WORKERS": str(workers),
            "STANDBY_PROXY_LOG_LEVEL": "warning",
            "STANDBY_PROXY_GRACEFUL_SECONDS": "1",
            # No lifecycle here: a held request gives up on it at once rather than after a minute.
            "STANDBY_PROXY_LIFECYCLE_OUTAGE_SECONDS": "0",
        })
        self.env.pop("DATABASE_URL", None)
        self.env.update(extra_env or {})
        database_url = f"sqlite:///{self.data_dir / 'standby.db'}"
        upgrade(database_url)  # as the web app or worker does before the proxy reads it
        self.db = Database(database_url)
        self.instances: dict[str, InstanceProcess] = {}
        self.proxy = ProxyProcess(self.env, tmp_path / "proxy.log")

    # ---- rows ----
    def add_endpoint(self, name: str, **spec) -> int:
        spec.setdefault("status", "running")
        with self.db.session() as s:
            endpoint = Endpoint(name=name, **spec)
            s.add(endpoint)
            s.flush()
            return endpoint.id

    def update_endpoint(self, name: str, **fields) -> None:
        with self.db.session() as s:
            endpoint = s.scalars(select(Endpoint).where(Endpoint.name == name)).one()
            for key, value in fields.items():
                setattr(endpoint, key, value)

    def add_instance(self, endpoint: str, instance_id: str, status: str = "ready", start: bool = True,
                     address: str | None = None, script: Path = INSTANCE_SCRIPT) -> InstanceProcess | None:
        proc = InstanceProcess.start(instance_id, script=script) if start else None
        if proc:
            self.instances[instance_id] = proc
        with self.db.session() as s:
            endpoint_row = s.scalars(select(Endpoint).where(Endpoint.name == endpoint)).one()
            s.add(Instance(id=instance_id, endpoint_id=endpoint_row.id, status=status,
                           address=address or (proc.address if proc else ""),
                           port=proc.port if proc else None, host="testhost"))
        return proc

    def set_instance_status(self, instance_id: str, status: str) -> None:
        with self.db.session() as s:
            s.get(Instance, instance_id).status = status

    def add_key(self, endpoint: str, key: str) -> None:
        with self.db.session() as s:
            endpoint_row = s.scalars(select(Endpoint).where(Endpoint.name == endpoint)).one()
            s.add(ApiKey(endpoint_id=endpoint_row.id, name="test", prefix=key[:8],
                         key_hash=hashlib.sha256(key.encode()).hexdigest()))

    # ---- processes ----
    def start_proxy(self) -> ProxyProcess:
        self.proxy.start()
        return self.proxy

    def refreshed(self) -> None:
        """Wait out a few routing-view refreshes (0.1 s each) after changing rows."""
        time.sleep(0.5)

    def url(self, endpoint: str, path: str = "/") -> str:
        return f"{self.proxy.url}/e/{endpoint}{path}"

    def stop(self) -> None:
        self.proxy.stop()
        for inst in self.instances.values():
            inst.stop()
