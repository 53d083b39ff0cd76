"""Proxy overhead: wrk against the instance directly, nginx proxy_pass, and Standby's proxy.

    .venv/bin/python bench/proxy/run.py [--seconds 10] [--rounds 2] [--proxy-workers 1] [--instance nginx]

Starts (and stops, by pid) an instance answering 1 KB, nginx on 127.0.0.1 with a temporary config
(keep-alive upstream), and the real Standby proxy under gunicorn in front of a temporary SQLite
routing table. The instance is by default a second nginx answering 1 KB from memory, fast enough
not to be the bottleneck, so the ratios measure the proxies (`--instance flask`: the small
gunicorn/Flask app of `bench/proxy/instance_app.py`, which caps every target near its own rate).

Prints, per target, req/s at 32 connections, p50 and p99 at 1 connection, and the CPU time its
processes spent per request over the 32-connection run (utime + stime from /proc/<pid>/stat of the process
and its children, through psutil); then the ratios to nginx. Targets (issue 15): added p50 at 1
connection <= 0.3 ms; req/s at 32 connections >= 80% of nginx's; CPU per request <= 4x nginx's.
Needs `wrk` and `nginx` (Debian: apt-get install -y wrk nginx).
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.conftest import free_port  # noqa: E402
from tests.proxy_fixtures import ProxyWorld, stop_process, wait_for  # noqa: E402

NGINX_CONF = """
worker_processes {workers};
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
daemon off;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    upstream instance {{ server {instance}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://instance;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"""

# The fast instance: nginx answering 1 KB from memory (no file read), in a process of its own so
# that the proxying nginx's CPU time is its own.
INSTANCE_CONF = """
worker_processes 1;
pid {tmp}/instance.pid;
error_log {tmp}/instance-error.log warn;
daemon off;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    keepalive_requests 1000000;
    server {{
        listen 127.0.0.1:{port};
        location / {{ default_type text/plain; return 200 '{payload}'; }}
    }}
}}
"""


def wrk(url: str, connections: int, seconds: int) -> tuple[float, float, int, float]:
    """(requests per second, p50 in ms, requests completed, p99 in ms)."""
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", url],
        capture_output=True, text=True, check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    total = int(re.search(r"(\d+) requests in", out).group(1))
    return rps, _percentile_ms(out, "50"), total, _percentile_ms(out, "99")


def _percentile_ms(out: str, percent: str) -> float:
    found = re.search(percent + r"%\s+([\d.]+)(us|ms|s)\b", out)
    value, unit = float(found.group(1)), found.group(2)
    return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value


def cpu_seconds(pids: list[int]) -> float:
    """CPU time (user + system) of these processes and all their children, so far."""
    import psutil

    total = 0.0
    for pid in pids:
        try:
            root = psutil.Process(pid)
            for proc in [root, *root.children(recursive=True)]:
                times = proc.cpu_times()
                total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


def http_ok(url: str) -> bool:
    import requests

    return requests.get(url, timeout=1).ok


def start_instance(kind: str, workers: int, tmp: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    if kind == "flask":
        proc = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-k", "gevent", "-w", str(workers),
             "-b", f"127.0.0.1:{port}", "--log-level", "warning", "bench.proxy.instance_app:app"],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
    else:
        conf = tmp / "instance.conf"
        conf.write_text(INSTANCE_CONF.format(tmp=tmp, port=port, payload="x" * 1024))
        proc = subprocess.Popen(["nginx", "-c", str(conf), "-p", str(tmp)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
    return proc, port


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2, help="runs per target; the best is kept (shared machine)")
    parser.add_argument("--proxy-workers", type=int, default=None,
                        help="gunicorn workers for Standby's proxy (default: its own default, STANDBY_PROXY_WORKERS)")
    parser.add_argument("--nginx-workers", type=int, default=1)
    parser.add_argument("--instance", choices=("nginx", "flask"), default="nginx",
                        help="what answers the 1 KB (default: nginx from memory, never the bottleneck)")
    parser.add_argument("--instance-workers", type=int, default=1, help="workers of the flask instance")
    args = parser.parse_args()
    if args.proxy_workers is None:
        from common.config import Settings

        args.proxy_workers = Settings(data_dir=Path(".")).proxy_workers
    for tool in ("wrk", "nginx"):
        if not shutil.which(tool):
            sys.exit(f"{tool} is missing: apt-get install -y wrk nginx")

    tmp = Path(tempfile.mkdtemp(prefix="standby-bench-"))
    procs: list[subprocess.Popen] = []
    world = None
    try:
        for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (tmp / sub).mkdir()
        instance, instance_port = start_instance(args.instance, args.instance_workers, tmp)
        procs.append(instance)
        direct = f"http://127.0.0.1:{instance_port}/"
        wait_for(lambda: http_ok(direct), 20, what="instance")

        nginx_port = free_port()
        conf = tmp / "nginx.conf"
        conf.write_text(NGINX_CONF.format(workers=args.nginx_workers, tmp=tmp, port=nginx_port,
                                          instance=f"127.0.0.1:{instance_port}"))
        nginx = subprocess.Popen(["nginx", "-c", str(conf), "-p", str(tmp)], stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL, start_new_session=True)
        procs.append(nginx)
        via_nginx = f"http://127.0.0.1:{nginx_port}/"
        wait_for(lambda: http_ok(via_nginx), 20, what="nginx")

        world = ProxyWorld(tmp, workers=args.proxy_workers, extra_env={"STANDBY_PROXY_REFRESH_SECONDS": "1"})
        world.add_endpoint("bench")
        world.add_instance("bench", "benchins", start=False, address=f"127.0.0.1:{instance_port}")
        world.start_proxy()
        via_standby = world.url("bench", "/")
        wait_for(lambda: http_ok(via_standby), 20, what="standby proxy")

        # Whose CPU time counts for each target: the proxy's processes (the instance's for direct).
        targets = {"direct": (direct, instance.pid), "nginx": (via_nginx, nginx.pid),
                   "standby": (via_standby, world.proxy.proc.pid)}
        results: dict[str, list[tuple[float, float, float]]] = {name: [] for name in targets}
        for _ in range(args.rounds):  # interleaved, so background load hits every target alike
            for name, (url, pid) in targets.items():
                wrk(url, 32, 2)  # warm up pools and keep-alive connections
                cpu_before = cpu_seconds([pid])
                rps, _, total, _ = wrk(url, 32, args.seconds)
                cpu_us = (cpu_seconds([pid]) - cpu_before) / max(total, 1) * 1e6
                _, p50, _, p99 = wrk(url, 1, max(3, args.seconds // 2))
                results[name].append((rps, p50, cpu_us, p99))
        # The best of the rounds for each figure (the machine is shared).
        best = {name: (max(run[0] for run in runs), min(run[1] for run in runs), min(run[2] for run in runs),
                       min(run[3] for run in runs))
                for name, runs in results.items()}

        print(f"\n{'target':<10}{'req/s @32':>12}{'p50 @1 (ms)':>14}{'p99 @1 (ms)':>14}{'CPU/req (us)':>15}")
        for name, (rps, p50, cpu_us, p99) in best.items():
            print(f"{name:<10}{rps:>12.0f}{p50:>14.3f}{p99:>14.3f}{cpu_us:>15.1f}")
        nginx_rps, nginx_p50, nginx_cpu, nginx_p99 = best["nginx"]
        standby_rps, standby_p50, standby_cpu, standby_p99 = best["standby"]
        direct_p50, direct_p99 = best["direct"][1], best["direct"][3]
        print(f"\nadded p50 at 1 connection: nginx {nginx_p50 - direct_p50:+.3f} ms, "
              f"standby {standby_p50 - direct_p50:+.3f} ms (target <= 0.3 ms)")
        # p99 at one connection is the machine's scheduling noise as much as the proxy's: compare
        # it within a run, and across runs only loosely.
        print(f"added p99 at 1 connection: nginx {nginx_p99 - direct_p99:+.3f} ms, "
              f"standby {standby_p99 - direct_p99:+.3f} ms")
        print(f"standby / nginx req/s at 32 connections: {standby_rps / nginx_rps:.0%} (target >= 80%)")
        print(f"standby / nginx CPU per request: {standby_cpu / nginx_cpu:.1f}x (target <= 4x)")
        print(f"(proxy workers {args.proxy_workers}, nginx workers {args.nginx_workers}, "
              f"instance {args.instance}, {os.cpu_count()} CPUs)")
    finally:
        if world is not None:
            world.stop()
        for proc in procs:
            stop_process(proc)
        time.sleep(0.2)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
