"""`app.py up` as a new user runs it: from a venv built from requirements.txt alone (so a runtime
dependency that only the test requirements bring in fails here), the tutorial's endpoint served
through the proxy, Ctrl-C leaving nothing behind; a busy port named with exit status 1."""
from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from tests.conftest import USED_ENDPOINT_NAMES
from tests.user_world import UpProcess

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.timeout(900)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.fixture(scope="session")
def runtime_python(tmp_path_factory) -> str:
    """A venv with requirements.txt only, as `./run up` builds it; cached by the file's hash."""
    digest = hashlib.sha256((ROOT / "requirements.txt").read_bytes()).hexdigest()[:16]
    cache = Path(os.environ.get("STANDBY_TEST_CACHE", Path.home() / ".cache" / "standby-tests"))
    venv = cache / f"runtime-venv-{digest}"
    python = venv / "bin" / "python"
    if not (venv / ".complete").exists():
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True, timeout=300)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", "-r", str(ROOT / "requirements.txt")],
                       check=True, timeout=900)
        (venv / ".complete").touch()
    return str(python)


def test_up_from_a_runtime_only_venv_serves_the_tutorial_and_ctrl_c_stops_all(tmp_path, runtime_python):
    up = UpProcess(tmp_path, python=runtime_python).start(timeout=180)
    instance_pid = None
    try:
        name = "uptutorial"
        assert name not in USED_ENDPOINT_NAMES
        USED_ENDPOINT_NAMES.add(name)
        up.create({"name": name, "start_command": "python -m http.server 8080", "port": 8080, "max_instances": 2})
        up.wait_status(name, "standby")
        served = up.call(name, "/")
        assert served.status_code == 200 and served.headers["Deploy-Cold-Start"] == "true", served.text
        # The Temporal Web UI is on (not headless).
        assert requests.get(f"http://127.0.0.1:{up.ports['temporal'] + 1000}/", timeout=10).status_code == 200
        instance_pid = next(iter(_instance_pids(tmp_path)))
        assert alive(instance_pid)
    finally:
        status = up.stop()
    output = up.log()
    assert status == 0, output[-3000:]
    pids = [int(p) for p in re.findall(r"started \w+ \(pid (\d+)\)", output)]
    assert len(pids) == 4, output
    time.sleep(0.5)
    assert [p for p in pids if alive(p)] == [], output
    assert instance_pid is None or not alive(instance_pid), "Ctrl-C left an instance process behind"
    assert "restarting" not in output, output


def test_up_names_a_busy_port_and_exits_1(tmp_path):
    up = UpProcess(tmp_path)
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", up.ports["proxy"]))
        squatter.listen()
        up.start(wait=False)
        up.proc.wait(60)
    assert up.proc.returncode == 1
    assert f"port {up.ports['proxy']} for the proxy is in use by another program: stop it, or set " \
           "STANDBY_PROXY_PORT" in up.log()
    assert "started" not in up.log()  # nothing was started to be left behind


def _instance_pids(tmp_path: Path):
    for state in (tmp_path / "data" / "instances").glob("*.json"):
        pid = json.loads(state.read_text()).get("pid")
        if pid:
            yield pid
