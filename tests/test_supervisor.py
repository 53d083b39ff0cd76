"""`app.py up`'s supervisor (common/supervisor.py) with real child processes: a part that cannot
start stops everything with status 1; one that dies later is restarted after a backoff, the others
untouched; a crash loop gives up with status 1; a stop leaves no process."""
from __future__ import annotations

import io
import os
import signal
import sys
import threading
import time

import pytest

from common import supervisor as sup
from common.supervisor import Part, StartFailed, Supervisor

pytestmark = pytest.mark.timeout(60)
SLEEPER = [sys.executable, "-c", "import time; time.sleep(600)"]


def run_in_thread(s: Supervisor, grace: float = 2.0):
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("status", _run(s, grace)), daemon=True)
    thread.start()
    return thread, result


def _run(s: Supervisor, grace: float) -> int:
    status = 0
    try:
        s.start_all()
        s.watch()
    except StartFailed as err:
        s.say(str(err))
        status = 1
    finally:
        s.stop_all(grace)
    return status


def wait(predicate, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    raise AssertionError("timed out")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as fh:
        return fh.read().split(")")[-1].split()[0] != "Z"


def test_a_part_that_cannot_start_is_named_and_everything_stops(tmp_path):
    out = io.StringIO()
    first = Part("first", SLEEPER)
    broken = Part("broken", [sys.executable, "-c", "import no_such_module"], ready=lambda: False)
    s = Supervisor([first, broken], cwd=str(tmp_path), env=dict(os.environ), out=out)
    assert _run(s, 2.0) == 1
    text = out.getvalue()
    assert "broken could not start: it exited (exit code 1) before it answered" in text
    assert not alive(first.proc.pid)


def test_a_part_that_dies_later_is_restarted_and_the_others_keep_running(tmp_path, monkeypatch):
    monkeypatch.setattr(sup, "BACKOFF_FIRST_SECONDS", 0.2)
    out = io.StringIO()
    steady, flaky = Part("steady", SLEEPER), Part("flaky", SLEEPER)
    flaky.backoff = 0.2
    s = Supervisor([steady, flaky], cwd=str(tmp_path), env=dict(os.environ), out=out)
    thread, result = run_in_thread(s)
    wait(lambda: flaky.proc is not None and steady.answered_once and flaky.answered_once)
    first_pid, steady_pid = flaky.proc.pid, steady.proc.pid
    os.killpg(first_pid, signal.SIGKILL)
    wait(lambda: flaky.proc.pid != first_pid and flaky.proc.poll() is None)
    assert f"flaky (pid {first_pid}) exited (killed by SIGKILL); restarting in 0.2 s" in out.getvalue()
    assert steady.proc.pid == steady_pid and alive(steady_pid)
    s.stopping = True
    thread.join(30)
    assert result["status"] == 0
    assert not alive(steady_pid) and not alive(flaky.proc.pid)


def test_a_crash_loop_gives_up_with_status_1(tmp_path, monkeypatch):
    monkeypatch.setattr(sup, "CRASH_LOOP_DEATHS", 3)
    out = io.StringIO()
    # Up long enough to count as started, then dies, again and again.
    dying = Part("dying", [sys.executable, "-c", "import time; time.sleep(0.7)"])
    dying.backoff = 0.05
    monkeypatch.setattr(sup, "BACKOFF_MAX_SECONDS", 0.1)
    s = Supervisor([dying], cwd=str(tmp_path), env=dict(os.environ), out=out)
    assert _run(s, 1.0) == 1
    assert "dying died 3 times within 120 s (last: exit code 0); giving up" in out.getvalue()
