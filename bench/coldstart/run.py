"""Cold-start overhead: first response from standby minus the instance's own start-to-ready time.

    .venv/bin/python bench/coldstart/run.py [--runs 10]

Starts (and stops) a Temporal dev server, a worker (`app.py worker`, process backend) and the
proxy; creates `--runs` endpoints in standby whose instance reports when its process started
and when it began listening; sends one request to each in turn. The overhead is the wake
(proxy -> workflow -> worker -> spawn), the readiness detection and the forward, i.e. all but
the server's own start-up. Prints the median and the parts. Target (issue 3): <= 150 ms.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import requests  # noqa: E402

from tests.conftest import AsyncRunner, Stack, _port_open, free_port, temporal_bin, wait_until  # noqa: E402
from tests.proxy_fixtures import ProxyProcess  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="standby-bench-coldstart-"))
    port = free_port()
    temporal = subprocess.Popen(
        [temporal_bin(), "server", "start-dev", "--headless", "--ip", "127.0.0.1", "--port", str(port),
         "--db-filename", str(tmp / "temporal.db"), "--log-level", "error"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    runner = AsyncRunner()
    stack = proxy = None
    try:
        wait_until(lambda: _port_open(port), 60, message="temporal")
        stack = Stack(tmp, f"127.0.0.1:{port}", runner,
                      {"STANDBY_PROXY_WORKERS": "1", "STANDBY_PROXY_LOG_LEVEL": "warning"})
        stack.start_worker()
        proxy = ProxyProcess(stack.env, tmp / "proxy.log")
        proxy.start()
        command = f"{sys.executable} {ROOT / 'bench' / 'coldstart' / 'instance.py'} $PORT"
        names = [f"cold{i}" for i in range(args.runs)]
        for name in names:
            stack.create_endpoint(name, start_command=command, health_path="/", idle_retention_seconds=3600)
        for name in names:
            stack.wait_status(name, "standby")
        time.sleep(1)  # the proxy's routing view has them all
        rows = []
        for name in names:
            sent = time.time()
            r = requests.get(f"{proxy.url}/e/{name}/", timeout=120)
            answered = time.time()
            assert r.status_code == 200, r.text
            started, ready = float(r.headers["X-Started-At"]), float(r.headers["X-Ready-At"])
            rows.append({
                "total": answered - sent,
                "own": ready - started,
                "overhead": (answered - sent) - (ready - started),
                "to_spawn": started - sent,
                "ready_to_answer": answered - ready,
            })
        ms = lambda key: statistics.median(row[key] for row in rows) * 1000  # noqa: E731
        print(f"runs: {len(rows)} (medians)")
        print(f"first response from standby   {ms('total'):8.1f} ms")
        print(f"instance's own start-to-ready  {ms('own'):8.1f} ms")
        print(f"overhead                       {ms('overhead'):8.1f} ms   (target <= 150 ms)")
        print(f"  request -> process started   {ms('to_spawn'):8.1f} ms   (proxy, workflow, worker, spawn)")
        print(f"  listening -> answered        {ms('ready_to_answer'):8.1f} ms   (readiness probe, workflow, proxy)")
    finally:
        if proxy is not None:
            proxy.stop()
        if stack is not None:
            stack.stop()
        runner.close()
        os.killpg(temporal.pid, signal.SIGTERM)
        temporal.wait(20)
        shutil.rmtree(tmp, ignore_errors=True)



if __name__ == "__main__":
    main()
