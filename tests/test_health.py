"""Readiness and probes against real HTTP servers started by the process backend."""
from __future__ import annotations

import sys
import time

import pytest

from common.config import Settings
from tests.conftest import free_port
from workers.backends.base import LaunchSpec
from workers.backends.process import ProcessBackend
from workers.health import health_url, probe, wait_until_ready
from workers.workdir import log_path_for, prepare_workdir

pytestmark = pytest.mark.timeout(60)

# Serves its (empty) workdir: "/" answers 200, "/ping" answers 404.
HTTP_SERVER = f"{sys.executable} -m http.server {{port}} --bind 127.0.0.1"


@pytest.fixture
def settings(tmp_path) -> Settings:
    return Settings(data_dir=tmp_path / "data", stop_grace_seconds=1.0)


@pytest.fixture
def backend(settings):
    backend = ProcessBackend(settings)
    try:
        yield backend
    finally:
        backend.stop_all(0.5)


def launch(settings, backend, instance_id, command):
    workdir = prepare_workdir(settings, instance_id, None)
    return backend.launch(LaunchSpec(
        instance_id=instance_id, endpoint_name="ep", start_command=command, image="", port=8080,
        workdir=str(workdir), log_path=str(log_path_for(settings, instance_id))))


class Beats:
    def __init__(self):
        self.count = 0

    def __call__(self):
        self.count += 1


def test_ready_when_the_server_answers(settings, backend):
    launched = launch(settings, backend, "ready1", HTTP_SERVER)
    beats = Beats()
    result = wait_until_ready(launched.address, "/", 15, lambda: backend.liveness("ready1"), beats)
    assert result.ready, result.reason
    assert result.reason == "GET / -> HTTP 200: ready"
    assert beats.count >= 1


def test_without_a_health_path_any_answer_below_500_is_ready(settings, backend):
    """The tutorial's server answers 404 on most paths: with no health path it is ready."""
    launched = launch(settings, backend, "any1", HTTP_SERVER)
    assert wait_until_ready(launched.address, "", 15, lambda: backend.liveness("any1")).ready
    assert probe(launched.address, "", 2.0) == (True, "GET / -> HTTP 200")
    # A set path needs 200: http.server answers 404 on /ping.
    assert probe(launched.address, "/ping", 2.0) == (False, "GET /ping -> HTTP 404")


def test_a_500_is_not_ready_and_progress_is_reported(settings, backend, tmp_path):
    script = tmp_path / "five.py"
    script.write_text(
        "import http.server, sys\n"
        "class H(http.server.BaseHTTPRequestHandler):\n"
        "    def do_GET(self):\n"
        "        self.send_response(503); self.end_headers()\n"
        "http.server.HTTPServer(('127.0.0.1', int(sys.argv[1])), H).serve_forever()\n")
    launched = launch(settings, backend, "five1", f"{sys.executable} {script} $PORT")
    answers = []
    # First while nothing listens yet, then once it answers: both are what the probe reports.
    first = wait_until_ready(launched.address, "", 0.01, lambda: backend.liveness("five1"), on_answer=answers.append)
    assert not first.ready
    deadline = time.monotonic() + 15
    while probe(launched.address, "", 1.0)[1] != "GET / -> HTTP 503" and time.monotonic() < deadline:
        time.sleep(0.05)
    result = wait_until_ready(launched.address, "", 2.0, lambda: backend.liveness("five1"), on_answer=answers.append)
    assert not result.ready
    assert result.reason == ("not ready within 2 s: waited for any HTTP answer below 500 on its port; "
                             "last answer: GET / -> HTTP 503")
    # What the detail page shows while it starts: first nothing listening, then the 503.
    assert answers[0] == "GET / -> connection refused, waiting for any HTTP answer below 500 on its port"
    assert answers[-1] == "GET / -> HTTP 503, waiting for any HTTP answer below 500 on its port"


def test_early_exit_is_reported_with_its_exit_code(settings, backend):
    launched = launch(settings, backend, "exit1", "sleep 0.3; exit 7")
    beats = Beats()
    result = wait_until_ready(launched.address, "/ping", 30, lambda: backend.liveness("exit1"), beats)
    assert not result.ready
    assert result.reason == "process exited with code 7 before answering /ping"
    assert wait_until_ready(launched.address, "", 5, lambda: backend.liveness("exit1")).reason == \
        "process exited with code 7 before answering HTTP"
    assert result.seconds < 30
    assert beats.count >= 2  # it polled, heartbeating each time, until the exit


def test_plain_bool_liveness_is_accepted(settings, backend):
    launched = launch(settings, backend, "exit2", "exit 0")
    result = wait_until_ready(launched.address, "/ping", 30, lambda: backend.liveness("exit2").alive)
    assert not result.ready
    assert result.reason == "process exited before answering /ping"


def test_timeout_names_the_path_and_the_last_error(settings, backend):
    launched = launch(settings, backend, "slow1", HTTP_SERVER)
    # Wait until the server listens, so the last error is its 404, not a refused connection.
    assert wait_until_ready(launched.address, "/", 15, lambda: True).ready
    result = wait_until_ready(launched.address, "ping", 1.0, lambda: backend.liveness("slow1"), Beats())
    assert not result.ready
    assert result.reason == "not ready within 1 s: waited for HTTP 200 from /ping; last answer: GET /ping -> HTTP 404"
    assert result.seconds >= 1.0


def test_timeout_when_nothing_listens(settings, backend):
    launched = launch(settings, backend, "deaf1", "sleep 300")
    result = wait_until_ready(launched.address, "/ping", 0.5, lambda: backend.liveness("deaf1"), Beats())
    assert not result.ready
    assert result.reason == ("not ready within 0.5 s: waited for HTTP 200 from /ping; "
                             "last answer: GET /ping -> connection refused")


def test_probe_refused_and_url_building():
    ok, detail = probe(f"127.0.0.1:{free_port()}", "/ping", 1.0)
    assert (ok, detail) == (False, "GET /ping -> connection refused")
    assert health_url("127.0.0.1:80", "ping") == "http://127.0.0.1:80/ping"
    assert health_url("http://h:1/", "/health") == "http://h:1/health"
    assert health_url("h:1", "") == "http://h:1/"


def test_probe_reuses_pooled_connections(settings, backend):
    launched = launch(settings, backend, "pool1", HTTP_SERVER)
    assert wait_until_ready(launched.address, "/", 15, lambda: True).ready
    started = time.monotonic()
    for _ in range(20):
        assert probe(launched.address, "/", 2.0)[0]
    assert time.monotonic() - started < 20
