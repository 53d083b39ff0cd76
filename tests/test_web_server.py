"""The web app as `app.py web` serves it (gunicorn, webapp/gunicorn_worker.py): slow clients
do not starve it, and the errors gunicorn answers itself are JSON. Temporal is a closed port."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import free_port, wait_until

ROOT = Path(__file__).resolve().parent.parent
SLOW_CLIENTS = 30


@pytest.fixture
def web_server(tmp_path):
    from app import web_command
    from common.config import load_settings

    env = dict(os.environ, STANDBY_DATA_DIR=str(tmp_path / "data"), STANDBY_WEB_PORT=str(free_port()),
               TEMPORAL_ADDRESS=f"127.0.0.1:{free_port()}", STANDBY_GPUS="T4:1")
    settings = load_settings(env)
    log = open(tmp_path / "web.log", "wb")
    proc = subprocess.Popen(web_command(settings), cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        wait_until(lambda: _healthz(settings.web_port, timeout=1) is not None, 60, message="web app")
        yield settings.web_port
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def _healthz(port: int, timeout: float) -> float | None:
    """Seconds a fresh connection takes to get /healthz answered, or None on failure."""
    started = time.monotonic()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            answer = b""
            while chunk := sock.recv(4096):
                answer += chunk
    except OSError:
        return None
    return time.monotonic() - started if answer.startswith(b"HTTP/1.1 200") else None


def _trickle(port: int, stop: threading.Event, sockets: list[socket.socket]) -> None:
    """SLOW_CLIENTS connections each sending a request's headers at one byte a second."""
    request = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"x" * 200 + b"\r\n\r\n"
    for _ in range(SLOW_CLIENTS):
        sockets.append(socket.create_connection(("127.0.0.1", port), timeout=5))
    position = 0
    while not stop.is_set() and position < len(request) - 4:  # never complete the headers
        for sock in sockets:
            try:
                sock.send(request[position:position + 1])
            except OSError:
                pass
        position += 1
        stop.wait(1.0)


def worst_healthz_latency(port: int, seconds: float = 12.0) -> float:
    """The worst /healthz latency while SLOW_CLIENTS slow clients hold connections open (a
    failed or 5 s timed-out request counts as 5 s). Used by the test and for measurements."""
    stop, sockets = threading.Event(), []
    slow = threading.Thread(target=_trickle, args=(port, stop, sockets), daemon=True)
    slow.start()
    worst = 0.0
    try:
        time.sleep(2.0)  # every slow client has sent a byte or two: gthread has given each a thread
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            latency = _healthz(port, timeout=5.0)
            worst = max(worst, 5.0 if latency is None else latency)
            time.sleep(0.5)
    finally:
        stop.set()
        slow.join(10)
        for sock in sockets:
            sock.close()
    return worst


@pytest.mark.timeout(120)
def test_slow_clients_do_not_starve_the_web_app(web_server):
    worst = worst_healthz_latency(web_server)
    print(f"worst /healthz latency with {SLOW_CLIENTS} slow clients: {worst:.3f}s")
    assert worst < 1.0, f"/healthz took {worst:.2f}s while {SLOW_CLIENTS} clients sent headers slowly"


def _raw(port: int, request: bytes) -> tuple[str, dict, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return lines[0], headers, body


@pytest.mark.timeout(120)
@pytest.mark.parametrize("request_bytes, status", [
    (b"GET /api/v1/endpoints?q=" + b"x" * 10_000 + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", "414"),
    (b"GET /api/v1/endpoints?q=" + b"x" * 5_000 + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", "414"),
    (b"BR\x00KEN\r\n\r\n", "400"),
    (b"GET /api/v1/endpoints HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"y" * 20_000 + b"\r\n\r\n", "4"),
    (b"GET /api/v1/endpoints HTTP/1.1\r\nHost: evil.example\r\n\r\n", "400"),
    (b"DELETE /api/v1/endpoints HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", "405"),
    (b"GET /api/v1/nothing-here HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", "404"),
])
def test_every_error_of_the_server_is_json(web_server, request_bytes, status):
    status_line, headers, body = _raw(web_server, request_bytes)
    assert status_line.split(" ")[1].startswith(status), status_line
    assert headers["content-type"].startswith("application/json"), (status_line, headers, body[:200])
    assert json.loads(body)["error"]
