"""Wake-to-running time of a `python -m http.server` endpoint, beside the server's own start time.

    .venv/bin/python bench/wake.py [--runs 5]

Starts its own Temporal dev server and worker (like the tests), then for each run: from standby,
the `wake_until_ready` update until it answers (the instance answered its health check), and
until the database shows `running` (what the UI and proxy see). Separately it measures how long
the same server command takes from spawn to its first HTTP 200 with no platform in between.
The difference is Standby's own overhead.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.conftest import AsyncRunner, Stack, free_port, temporal_bin, wait_until  # noqa: E402
from workflows.contracts import WakeRequest  # noqa: E402

SERVER = [sys.executable, "-m", "http.server", "{port}", "--bind", "127.0.0.1"]


def server_start_to_ready() -> float:
    port = free_port()
    t0 = time.perf_counter()
    proc = subprocess.Popen([a.replace("{port}", str(port)) for a in SERVER], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        while True:
            try:
                if requests.get(f"http://127.0.0.1:{port}/", timeout=1).status_code == 200:
                    return time.perf_counter() - t0
            except requests.ConnectionError:
                time.sleep(0.005)
    finally:
        proc.terminate()
        proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        temporal = subprocess.Popen([temporal_bin(), "server", "start-dev", "--headless", "--ip", "127.0.0.1",
                                     "--port", str(port), "--db-filename", f"{tmp}/t.db", "--log-level", "error"],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        runner = AsyncRunner()
        stack = None
        try:
            time.sleep(1)
            stack = Stack(Path(tmp), f"127.0.0.1:{port}", runner)
            stack.start_worker()
            stack.create_endpoint("bench", health_path="/", idle_retention_seconds=1, health_interval_seconds=5)
            stack.wait_status("bench", "standby", 60)
            update_times, running_times = [], []
            for _ in range(args.runs):
                t0 = time.perf_counter()
                stack.update("bench", "wake_until_ready", WakeRequest())
                update_times.append(time.perf_counter() - t0)
                wait_until(lambda: stack.endpoint("bench").status == "running", 30, interval=0.005)
                running_times.append(time.perf_counter() - t0)
                stack.wait_status("bench", "standby", 60)
            own = [server_start_to_ready() for _ in range(args.runs)]
        finally:
            if stack:
                stack.stop()
            runner.close()
            temporal.terminate()
            temporal.wait()
    med = statistics.median
    print(f"runs: {args.runs}")
    print(f"wake -> ready (update answered)   median {med(update_times) * 1000:7.1f} ms  "
          f"all {[round(t * 1000) for t in update_times]}")
    print(f"wake -> running (status in DB)    median {med(running_times) * 1000:7.1f} ms")
    print(f"server's own start-to-ready       median {med(own) * 1000:7.1f} ms  all {[round(t * 1000) for t in own]}")
    print(f"Standby overhead (update - own)   median {(med(update_times) - med(own)) * 1000:7.1f} ms")


if __name__ == "__main__":
    main()
