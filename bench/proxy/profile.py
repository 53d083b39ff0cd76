"""Where one warm proxied request's microseconds go.

    .venv/bin/python bench/proxy/profile.py [--seconds 6] [--connections 1] [--top 0]

The setup of `bench/proxy/run.py` (a fast nginx instance answering 1 KB, the real proxy under
gunicorn at its default worker count, a warm route), with cProfile switched on inside the proxy's
worker for a window while wrk sends requests over one connection. The worker's CPU time over the
same window is read from /proc (through psutil) and split in two: kernel time (the socket
syscalls: the request read, the write to the instance, its answer read, the answer written, and
epoll) as measured, and user time shared out between the parts of the request path in proportion
to cProfile's own time per function (cProfile's overhead inflates every function alike, so its
shares are kept and its absolute times dropped). Time spent waiting (a greenlet parked in the
hub) is no CPU and is left out.
"""
from __future__ import annotations

import argparse
import pstats
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.proxy.run import http_ok, start_instance, wrk  # noqa: E402
from tests.proxy_fixtures import ProxyProcess, ProxyWorld, stop_process, wait_for  # noqa: E402

CONF = """
import os, sys
sys.path.insert(0, {root!r})
exec(open({conf!r}).read())
_post = post_worker_init


def post_worker_init(worker):
    _post(worker)
    import cProfile
    import gevent
    import psutil

    app = worker.wsgi
    served = [0]

    def counted(environ, start_response):
        served[0] += 1
        return app(environ, start_response)

    worker.wsgi = counted

    def measure(seconds, profile=None):
        me = psutil.Process()
        before, count = me.cpu_times(), served[0]
        if profile is not None:
            profile.enable()
        gevent.sleep(seconds)
        if profile is not None:
            profile.disable()
        after = me.cpu_times()
        return after.user - before.user, after.system - before.system, served[0] - count

    def windows():
        gevent.sleep(float(os.environ["PROFILE_DELAY"]))
        seconds = float(os.environ["PROFILE_SECONDS"])
        plain = measure(seconds)
        profile = cProfile.Profile()
        profiled = measure(seconds, profile)
        profile.dump_stats(os.environ["PROFILE_OUT"])
        with open(os.environ["PROFILE_OUT"] + ".cpu", "w") as out:
            out.write(" ".join(map(str, (*plain, *profiled))))

    gevent.spawn(windows)
"""

# Parts of the request path, by file (and function where a file does several things). The first
# match wins; gunicorn's files are there so that the same script profiles the code before the
# proxy had its own HTTP/1.1 loop.
PARTS = [
    ("metrics (prometheus_client)", ("prometheus_client/", "proxy/metrics.py")),
    ("traffic counts (claim, begin, end)", ("proxy/traffic.py",)),
    ("server: read and parse the request, environ", ("proxy/http1.py:read_head", "proxy/http1.py:parse_head",
                                                     "proxy/http1.py:_environ_key", "proxy/http1.py:recv",
                                                     "gunicorn/http/message.py", "gunicorn/http/parser.py",
                                                     "gunicorn/http/unreader.py", "gunicorn/http/body.py",
                                                     "gunicorn/http/wsgi.py:create",
                                                     "gunicorn/http/wsgi.py:base_environ",
                                                     "gunicorn/http/wsgi.py:default_environ",
                                                     "gunicorn/http/wsgi.py:proxy_environ", "gunicorn/config.py",
                                                     "ipaddress.py", "gunicorn/util.py:is_hoppish")),
    ("server: write the answer", ("proxy/http1.py:Response", "proxy/http1.py:write", "proxy/http1.py:_head",
                                  "proxy/http1.py:_framed", "proxy/http1.py:finish", "proxy/http1.py:start_response",
                                  "proxy/http1.py:date_header", "proxy/http1.py:send_all", "gunicorn/http/wsgi.py",
                                  "gunicorn/util.py", "gunicorn/glogging.py")),
    ("server: connection loop", ("proxy/http1.py", "proxy/server.py", "gunicorn/workers/", "gevent/baseserver.py")),
    ("request headers for the instance", ("proxy/headers.py",)),
    ("the instance's answer: read and parse its head", ("proxy/upstream.py:read_head", "proxy/upstream.py:_parse_head",
                                                         "proxy/upstream.py:_frame",
                                                         "proxy/upstream.py:_read_head_bytes",
                                                         "proxy/forward.py:response_headers",
                                                         "proxy/forward.py:connection_tokens")),
    ("forwarding: pool, request write, body relay", ("proxy/forward.py", "proxy/upstream.py")),
    ("routing: endpoint, checks, pick, claim", ("proxy/handler.py", "proxy/app.py", "proxy/routing_view.py",
                                                 "proxy/balancer.py", "proxy/coldstart.py", "proxy/auth.py",
                                                 "proxy/errors.py", "proxy/websocket.py")),
    ("gevent: socket wrappers, hub, switches", ("gevent/",)),
]
# The socket methods' own time is their syscalls: counted in the kernel figure.
SYSCALLS = ("of '_socket.socket' objects",)
# Functions whose own time is mostly a greenlet parked until a socket is ready: not CPU.
WAITING = ("gevent/_socketcommon.py:recv", "gevent/hub.py:switch", "gevent/hub.py:run", "gevent/hub.py:wait",
           "gevent/_hub_primitives.py")


def _key(func: tuple) -> str:
    filename, _, name = func
    if filename == "~":
        return name
    short = "/".join(Path(filename).parts[-2:])
    for marker in ("gunicorn/", "gevent/", "prometheus_client/", "proxy/"):
        at = filename.find(marker)
        if at >= 0:
            short = filename[at:]
            break
    return f"{short}:{name}"


def _part(key: str) -> str:
    return next((name for name, markers in PARTS if any(m in key for m in markers)),
                "other: background greenlets (reports, view refresh), runtime")


def breakdown(stats_path: str, requests: int, user_s: float, system_s: float) -> list[tuple[str, float]]:
    """CPU per request by part: kernel time as measured, user time shared out by cProfile's own
    time. A builtin's time (dict.get, str.split...) counts for the functions that called it; the
    socket calls' own time is their syscalls, which the kernel figure holds already."""
    stats = pstats.Stats(stats_path).stats
    own: dict[str, float] = {}
    for func, (_, _, tottime, _, callers) in stats.items():
        key = _key(func)
        if any(key.startswith(w) for w in WAITING) or any(m in key for m in SYSCALLS):
            continue
        if func[0] == "~" and callers:
            for caller, (_, _, caller_tottime, _) in callers.items():
                caller_key = _key(caller)
                if not any(caller_key.startswith(w) for w in WAITING):
                    own[_part(caller_key)] = own.get(_part(caller_key), 0.0) + caller_tottime
            continue
        own[_part(key)] = own.get(_part(key), 0.0) + tottime
    total = sum(own.values()) or 1.0
    user_us = user_s / requests * 1e6
    rows = [(part, seconds / total * user_us) for part, seconds in own.items()]
    rows.sort(key=lambda row: -row[1])
    rows.append(("kernel: the socket syscalls (request, instance, answer) and epoll, measured",
                 system_s / requests * 1e6))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--connections", type=int, default=1)
    parser.add_argument("--top", type=int, default=0, help="also list the N functions with most own time")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="standby-profile-"))
    instance = world = None
    try:
        for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (tmp / sub).mkdir()
        instance, port = start_instance("nginx", 1, tmp)
        wait_for(lambda: http_ok(f"http://127.0.0.1:{port}/"), 20, what="instance")
        out = tmp / "proxy.prof"
        conf = tmp / "gunicorn_profile.py"
        conf.write_text(CONF.format(root=str(ROOT), conf=str(ROOT / "proxy" / "gunicorn_conf.py")))
        warmup = 3.0
        world = ProxyWorld(tmp, extra_env={"STANDBY_PROXY_REFRESH_SECONDS": "1", "PROFILE_OUT": str(out),
                                           "PROFILE_DELAY": str(warmup), "PROFILE_SECONDS": str(args.seconds)})
        world.add_endpoint("bench")
        world.add_instance("bench", "benchins", start=False, address=f"127.0.0.1:{port}")
        world.proxy = _ProfiledProxy(world.env, tmp / "proxy.log", conf)
        started = time.monotonic()
        world.start_proxy()
        url = world.url("bench", "/")
        wait_for(lambda: http_ok(url), 20, what="proxy")
        # Requests from before the window until after it; the window counts its own.
        rps, p50, _, _ = wrk(url, args.connections,
                          int(warmup + 2 * args.seconds + 2 - (time.monotonic() - started)) + 1)
        wait_for(lambda: Path(str(out) + ".cpu").exists(), 20, what="the profile")
        user_s, system_s, requests, profiled_user, _, profiled_requests = map(
            float, Path(str(out) + ".cpu").read_text().split())
        print(f"\n{args.connections} connection(s), {rps:.0f} req/s; {requests:.0f} requests measured, then "
              f"{profiled_requests:.0f} profiled (user CPU with cProfile on: "
              f"{profiled_user / profiled_requests * 1e6:.0f} µs a request). CPU per request:")
        rows = breakdown(str(out), int(requests), user_s, system_s)
        for part, micros in rows:
            print(f"  {micros:6.1f} µs  {part}")
        print(f"  {sum(m for _, m in rows):6.1f} µs  total (user {user_s / requests * 1e6:.1f} + kernel "
              f"{system_s / requests * 1e6:.1f})")
        if args.top:
            print(f"\nThe {args.top} functions with most own time (cProfile's share of the profiled window):")
            stats = pstats.Stats(str(out)).stats
            total = sum(row[2] for row in stats.values()) or 1.0
            for func, row in sorted(stats.items(), key=lambda item: -item[1][2])[:args.top]:
                print(f"  {row[2] / total:6.1%}  {row[1]:>8} calls  {_key(func)}")
    finally:
        if world is not None:
            world.stop()
        stop_process(instance)
        time.sleep(0.2)
        shutil.rmtree(tmp, ignore_errors=True)


class _ProfiledProxy(ProxyProcess):
    def __init__(self, env: dict, log_path: Path, conf: Path):
        super().__init__(env, log_path)
        self.conf = conf

    def start(self) -> None:
        import requests

        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", str(self.conf), "proxy.app:application"],
            cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        wait_for(lambda: requests.get(self.url + "/healthz", timeout=1).ok, 30, what="proxy")


if __name__ == "__main__":
    main()
