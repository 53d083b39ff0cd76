"""HTTP health probes against instances, over one pooled, thread-safe connection manager.

Two rules (docs/architecture.md "Ports and readiness"), so that any server works as its tutorial
writes it:
- no health path set: the instance is ready when its port answers HTTP with any status below
  500 (`GET /`, redirects not followed), like a TCP/HTTP startup probe. Almost no real server
  answers 200 on a path Standby would guess, but nearly all answer *something* on `/`.
- a health path set: ready only on HTTP 200 from that path (a 204 or a redirect is not ready).

Readiness polls fast at first (a small server is up in tens of milliseconds, and every
millisecond is added to a cold start a client is waiting on) and backs off towards the
interval for servers that load a model for minutes.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import urllib3

# Shared by every probe of this worker: keep-alive connections to instances are reused.
_POOL = urllib3.PoolManager(num_pools=64, maxsize=4, retries=False)
# Every millisecond between "listening" and "seen ready" is added to a cold start, so probe every
# 10 ms while most servers come up (a refused connect costs microseconds), then back off, but to
# no more than 100 ms apart: a model that loads for minutes is answered within 0.1 s of being up.
_FIRST_DELAY = 0.01
_FAST_PROBING_SECONDS = 3.0
_BACKOFF = 1.3
_SLOWEST = 0.1
# One probe never waits longer than this, so a hung server cannot stall heartbeats.
MAX_PROBE_TIMEOUT = 5.0


@dataclass
class ReadyResult:
    ready: bool
    reason: str
    seconds: float
    # The last thing the probe saw ("GET / -> HTTP 404"), for the failure message.
    last_answer: str = ""


def normalize_path(path: str | None) -> str:
    """A set health path as an absolute path; empty means "no health path" (any answer)."""
    path = (path or "").strip()
    if not path:
        return ""
    return path if path.startswith("/") else "/" + path


def health_url(address: str, path: str) -> str:
    path = normalize_path(path) or "/"
    base = address if "://" in address else f"http://{address}"
    return base.rstrip("/") + path


def expectation(path: str | None) -> str:
    """What counts as ready, in words, for messages and the detail page."""
    path = normalize_path(path)
    return f"HTTP 200 from {path}" if path else "any HTTP answer below 500 on its port"


def probe(address: str, path: str | None, timeout: float) -> tuple[bool, str]:
    """One GET; returns (ready, what was seen). See the module docstring for the two rules."""
    path = normalize_path(path)
    target = path or "/"
    try:
        response = _POOL.request("GET", health_url(address, target), timeout=urllib3.Timeout(
            connect=timeout, read=timeout), redirect=False, preload_content=True)
    except urllib3.exceptions.HTTPError as exc:
        return False, f"GET {target} -> {_describe_error(exc)}"
    seen = f"GET {target} -> HTTP {response.status}"
    if path:
        return response.status == 200, seen
    return response.status < 500, seen


def wait_until_ready(
    address: str,
    path: str | None,
    deadline_seconds: float,
    is_alive: Callable[[], Any],
    heartbeat: Callable[[], Any] | None = None,
    interval: float = 0.5,
    on_answer: Callable[[str], Any] | None = None,
) -> ReadyResult:
    """Poll until the instance is ready, its process exits, or the deadline passes.

    is_alive returns a bool or a Liveness (whose exit_code makes a better message).
    heartbeat is called on every poll: the activity passes activity.heartbeat, so a
    cancelled activity stops waiting at the next poll. on_answer is called with every probe's
    answer ("GET / -> connection refused", then "GET / -> HTTP 404"), so the detail page can say
    what the instance is waiting for.
    """
    path = normalize_path(path)
    started = time.monotonic()
    deadline = started + deadline_seconds
    delay = min(_FIRST_DELAY, interval)
    last_answer = "no attempt made"
    while True:
        if heartbeat is not None:
            heartbeat()
        exited = _exit_reason(_settled(is_alive), path)
        if exited:
            return ReadyResult(False, exited, time.monotonic() - started, last_answer)
        remaining = deadline - time.monotonic()
        ok, answer = probe(address, path, max(0.05, min(MAX_PROBE_TIMEOUT, remaining)))
        if ok:
            return ReadyResult(True, f"{answer}: ready", time.monotonic() - started, answer)
        if on_answer is not None:
            on_answer(f"{answer}, waiting for {expectation(path)}")
        last_answer = answer
        now = time.monotonic()
        if now >= deadline:
            # The process may have died while the probe waited: that is the better reason.
            exited = _exit_reason(_settled(is_alive), path)
            reason = exited or (f"not ready within {_seconds(deadline_seconds)}: waited for {expectation(path)}; "
                                f"last answer: {last_answer}")
            return ReadyResult(False, reason, now - started, last_answer)
        time.sleep(min(delay, max(0.0, deadline - now)))
        if now - started > _FAST_PROBING_SECONDS:
            delay = min(interval, _SLOWEST, delay * _BACKOFF)


def _settled(is_alive: Callable[[], Any], wait: float = 1.0) -> Any:
    """The liveness, and for a process that died, once its exit code is known: the exit watcher
    may be reaping it this very moment, and "exited with code 3" says more than "exited"."""
    liveness = is_alive()
    deadline = time.monotonic() + wait
    while (not getattr(liveness, "alive", liveness) and getattr(liveness, "exit_code", 0) is None
           and time.monotonic() < deadline):
        time.sleep(0.05)
        liveness = is_alive()
    return liveness


def _exit_reason(liveness: Any, path: str) -> str:
    alive = getattr(liveness, "alive", liveness)
    if alive:
        return ""
    what = f"answering {path}" if path else "answering HTTP"
    code = getattr(liveness, "exit_code", None)
    if code is None:
        return f"process exited before {what}"
    if code < 0:
        return f"process was killed by signal {-code} before {what}"
    return f"process exited with code {code} before {what}"


def _describe_error(exc: Exception) -> str:
    reason = getattr(exc, "reason", None)
    if isinstance(exc, urllib3.exceptions.MaxRetryError) and reason is not None:
        exc = reason
    if isinstance(exc, urllib3.exceptions.NewConnectionError):
        return "connection refused" if "refused" in str(exc).lower() else f"cannot connect ({exc})"
    if isinstance(exc, (urllib3.exceptions.ReadTimeoutError, urllib3.exceptions.ConnectTimeoutError)):
        return "timed out"
    if isinstance(exc, urllib3.exceptions.ProtocolError):
        # Through a network-namespace relay, "nothing listens inside yet" is a connection that
        # closes before any answer.
        detail = exc.args[0] if exc.args else exc
        if "RemoteDisconnected" in repr(exc) or "without response" in str(exc):
            return "connection closed without an answer (nothing listening yet?)"
        return f"connection broken ({detail})"
    return str(exc)


def _seconds(value: float) -> str:
    return f"{value:g} s"
