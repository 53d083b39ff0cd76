"""`app.py up`: the whole system on one machine, and Ctrl-C leaves nothing behind."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from tests.conftest import free_port, wait_until

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.timeout(240)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_up_runs_everything_and_ctrl_c_stops_all(tmp_path):
    ports = {name: free_port() for name in ("web", "proxy", "temporal")}
    env = {k: v for k, v in os.environ.items() if k not in ("TEMPORAL_ADDRESS", "DATABASE_URL")}
    env.update({
        "STANDBY_DATA_DIR": str(tmp_path / "data"),
        "STANDBY_WEB_PORT": str(ports["web"]),
        "STANDBY_PROXY_PORT": str(ports["proxy"]),
        "STANDBY_TEMPORAL_PORT": str(ports["temporal"]),
        "STANDBY_GPUS": "T4:1",
        "STANDBY_STOP_GRACE_SECONDS": "2",
        "PYTHONUNBUFFERED": "1",
    })
    # The Temporal UI listens on the gRPC port + 1000: make sure that one is free too.
    log = open(tmp_path / "up.log", "wb")
    up = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "up"], cwd=ROOT, env=env, stdout=log,
                          stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: up.poll() is not None or "Standby is up" in (tmp_path / "up.log").read_text(), 120,
                   interval=0.3, message="app.py up to report it is up")
        assert up.poll() is None, (tmp_path / "up.log").read_text()[-3000:]
        web = f"http://127.0.0.1:{ports['web']}"
        r = requests.post(f"{web}/api/v1/endpoints", json={
            "name": "uptest", "start_command": f"{sys.executable} -m http.server $PORT --bind 127.0.0.1",
            "port": 8080, "health_path": "/", "min_instances": 1, "startup_timeout_seconds": 180}, timeout=30)
        assert r.status_code == 201, r.text
        wait_until(lambda: requests.get(f"{web}/api/v1/endpoints/uptest", timeout=10).json()["status"] == "running",
                   60, interval=0.3, message="endpoint running")
        inst = requests.get(f"{web}/api/v1/endpoints/uptest/instances", timeout=10).json()["instances"][0]
        assert requests.get(f"http://{inst['address']}/", timeout=5).status_code == 200
        # The proxy serves the fixed URL.
        via_proxy = requests.get(f"http://127.0.0.1:{ports['proxy']}/e/uptest/", timeout=30)
        assert via_proxy.status_code == 200
        assert via_proxy.headers["Deploy-Route-Target"] == inst["id"]
        # The Temporal Web UI is on (not headless).
        assert requests.get(f"http://127.0.0.1:{ports['temporal'] + 1000}/", timeout=10).status_code == 200
        instance_pid = next(int(p) for p in _instance_pids(tmp_path))
        assert alive(instance_pid)
    finally:
        up.send_signal(signal.SIGINT)
        try:
            up.wait(90)
        except subprocess.TimeoutExpired:
            up.kill()
            raise
        log.close()
    output = (tmp_path / "up.log").read_text()
    pids = [int(p) for p in re.findall(r"started \w+ \(pid (\d+)\)", output)]
    assert len(pids) == 4, output
    time.sleep(0.5)
    assert [p for p in pids if alive(p)] == [], output
    assert not alive(instance_pid), "Ctrl-C left an instance process behind"
    assert up.returncode == 0


def _instance_pids(tmp_path: Path):
    import json

    for state in (tmp_path / "data" / "instances").glob("*.json"):
        pid = json.loads(state.read_text()).get("pid")
        if pid:
            yield pid
