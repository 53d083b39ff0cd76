"""`app.py up`'s supervisor: start every part, restart one that dies, stop all on Ctrl-C.

Like an init system (docs/architecture.md "Crash survival"):
- parts start in order, each waiting until the one before answers (Temporal before the worker);
- a part that cannot start at all (it exits before it ever answered: a missing dependency, a port
  in use) is named, everything stops and `up` exits 1;
- a part that dies later is restarted after a backoff (1 s, doubling to 30 s), with a line naming
  it and its exit status; the others keep running, so warm traffic never depends on the web app
  or on Temporal being up;
- a part that keeps dying (CRASH_LOOP_DEATHS deaths within CRASH_LOOP_WINDOW seconds) is a crash
  loop: named, everything stops, exit 1;
- Ctrl-C (SIGINT) or SIGTERM stops every part in reverse order, exit 0.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

BACKOFF_FIRST_SECONDS = 1.0
BACKOFF_MAX_SECONDS = 30.0
CRASH_LOOP_DEATHS = 5
CRASH_LOOP_WINDOW = 120.0
# A part that stays up this long after a restart is healthy again: its backoff starts over.
STABLE_SECONDS = 60.0
POLL_SECONDS = 0.2


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def describe_exit(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


@dataclass
class Part:
    name: str
    command: list[str]
    # Answers when the part is up (e.g. its port accepts connections); None: up once started.
    ready: Callable[[], bool] | None = None
    # How long it may take to answer the first time.
    start_timeout: float = 60.0
    proc: subprocess.Popen | None = None
    answered_once: bool = False
    started_at: float = 0.0
    deaths: list[float] = field(default_factory=list)
    backoff: float = BACKOFF_FIRST_SECONDS
    restart_at: float | None = None


class StartFailed(Exception):
    """A part could not start at all, or kept dying: `up` stops and exits 1."""


class Supervisor:
    def __init__(self, parts: list[Part], cwd: str, env: dict, out=None):
        self.parts = parts
        self.cwd, self.env = cwd, env
        self.out = out or sys.stdout
        self.stopping = False

    def say(self, message: str) -> None:
        print(f"standby: {message}", file=self.out, flush=True)

    def _start(self, part: Part) -> None:
        # Own process groups: Ctrl-C reaches only this supervisor, which stops them in order.
        part.proc = subprocess.Popen(part.command, cwd=self.cwd, env=self.env, start_new_session=True)
        part.started_at = time.monotonic()
        part.restart_at = None
        self.say(f"started {part.name} (pid {part.proc.pid})")

    def _wait_answer(self, part: Part) -> None:
        deadline = time.monotonic() + part.start_timeout
        while not self.stopping:
            code = part.proc.poll()
            if code is not None:
                raise StartFailed(f"{part.name} could not start: it exited ({describe_exit(code)}) before "
                                  "it answered; its own messages are above")
            if part.ready is None or part.ready():
                part.answered_once = True
                return
            if time.monotonic() > deadline:
                raise StartFailed(f"{part.name} did not answer within {part.start_timeout:.0f} s")
            time.sleep(0.1)

    def start_all(self, on_up: Callable[[], None] | None = None) -> None:
        """Start the parts in order, each once the one before answers."""
        for part in self.parts:
            if self.stopping:
                return
            self._start(part)
            if part.ready is not None:
                self._wait_answer(part)
                continue
            # A part without a port is "up" once it survived a moment.
            time.sleep(0.5)
            if part.proc.poll() is not None:
                raise StartFailed(f"{part.name} could not start: it exited ({describe_exit(part.proc.returncode)}) "
                                  "at once; its own messages are above")
            part.answered_once = True
        if on_up is not None and not self.stopping:
            on_up()

    def watch(self) -> None:
        """Restart parts that die, until stopping. Raises StartFailed on a crash loop."""
        while not self.stopping:
            now = time.monotonic()
            for part in self.parts:
                if self.stopping:
                    break
                if part.restart_at is not None:
                    if now >= part.restart_at:
                        self._start(part)
                    continue
                code = part.proc.poll() if part.proc else None
                if code is None:
                    if now - part.started_at > STABLE_SECONDS:
                        part.backoff = BACKOFF_FIRST_SECONDS
                    continue
                part.deaths = [t for t in part.deaths if now - t < CRASH_LOOP_WINDOW] + [now]
                if len(part.deaths) >= CRASH_LOOP_DEATHS:
                    raise StartFailed(f"{part.name} died {len(part.deaths)} times within {CRASH_LOOP_WINDOW:.0f} s "
                                      f"(last: {describe_exit(code)}); giving up")
                self.say(f"{part.name} (pid {part.proc.pid}) exited ({describe_exit(code)}); "
                         f"restarting in {part.backoff:g} s")
                part.restart_at = now + part.backoff
                part.backoff = min(BACKOFF_MAX_SECONDS, part.backoff * 2)
            time.sleep(POLL_SECONDS)

    def stop_all(self, grace_seconds: float) -> None:
        for part in reversed(self.parts):
            proc = part.proc
            if proc is None:
                continue
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
                try:
                    proc.wait(timeout=grace_seconds)
                except subprocess.TimeoutExpired:
                    try:
                        os.killpg(proc.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    proc.wait()
            self.say(f"{part.name} stopped")

    def run(self, grace_seconds: float, on_up: Callable[[], None] | None = None) -> int:
        """The whole life of `up`; returns its exit status."""
        def on_signal(_signum, _frame):
            self.stopping = True

        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
        status = 0
        try:
            self.start_all(on_up)
            self.watch()
        except StartFailed as err:
            self.say(str(err))
            status = 1
        finally:
            self.stop_all(grace_seconds)
        return status
