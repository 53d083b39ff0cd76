"""HTTP health probes against instances, over one pooled, thread-safe connection manager.

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
# 10 ms while most servers come up (a refused connect costs microseconds), then back off.
_FIRST_DELAY = 0.01
_FAST_PROBING_SECONDS = 3.0
_BACKOFF = 1.3
# One probe never waits longer than this, so a hung server cannot stall heartbeats.
MAX_PROBE_TIMEOUT = 5.0


@dataclass
class ReadyResult:
    ready: bool
    reason: str
    seconds: float


def normalize_path(path: str | None) -> str:
    path = (path or "/").strip() or "/"
    return path if path.startswith("/") else "/" + path


def health_url(address: str, path: str) -> str:
    path = normalize_path(path)
    base = address if "://" in address else f"http://{address}"
    return base.rstrip("/") + path


def probe(address: str, path: str, timeout: float) -> tuple[bool, str]:
    """One GET; ok only on HTTP 200 (a redirect or 204 is not "ready")."""
    path = normalize_path(path)
    try:
        response = _POOL.request("GET", health_url(address, path), timeout=urllib3.Timeout(
            connect=timeout, read=timeout), redirect=False, preload_content=True)
    except urllib3.exceptions.HTTPError as exc:
        return False, _describe_error(exc)
    if response.status == 200:
        return True, "HTTP 200"
    return False, f"HTTP {response.status} from {path}"


def wait_until_ready(
    address: str,
    path: str,
    deadline_seconds: float,
    is_alive: Callable[[], Any],
    heartbeat: Callable[[], Any] | None = None,
    interval: float = 0.5,
) -> ReadyResult:
    """Poll until HTTP 200, the process exits, or the deadline passes.

    is_alive returns a bool or a Liveness (whose exit_code makes a better message).
    heartbeat is called on every poll: the activity passes activity.heartbeat, so a
    cancelled activity stops waiting at the next poll.
    """
    path = normalize_path(path)
    started = time.monotonic()
    deadline = started + deadline_seconds
    delay = min(_FIRST_DELAY, interval)
    last_error = "no attempt made"
    while True:
        if heartbeat is not None:
            heartbeat()
        exited = _exit_reason(is_alive(), path)
        if exited:
            return ReadyResult(False, exited, time.monotonic() - started)
        remaining = deadline - time.monotonic()
        ok, detail = probe(address, path, max(0.05, min(MAX_PROBE_TIMEOUT, remaining)))
        if ok:
            return ReadyResult(True, f"{path} answered HTTP 200", time.monotonic() - started)
        last_error = detail
        now = time.monotonic()
        if now >= deadline:
            # The process may have died while the probe waited: that is the better reason.
            exited = _exit_reason(is_alive(), path)
            reason = exited or (f"no HTTP 200 from {path} within {_seconds(deadline_seconds)}; "
                                f"last error: {last_error}")
            return ReadyResult(False, reason, now - started)
        time.sleep(min(delay, max(0.0, deadline - now)))
        if now - started > _FAST_PROBING_SECONDS:
            delay = min(interval, delay * _BACKOFF)


def _exit_reason(liveness: Any, path: str) -> str:
    alive = getattr(liveness, "alive", liveness)
    if alive:
        return ""
    code = getattr(liveness, "exit_code", None)
    if code is None:
        return f"process exited before answering {path}"
    if code < 0:
        return f"process was killed by signal {-code} before answering {path}"
    return f"process exited with code {code} before answering {path}"


def _describe_error(exc: Exception) -> str:
    reason = getattr(exc, "reason", None)
    if isinstance(exc, urllib3.exceptions.MaxRetryError) and reason is not None:
        exc = reason
    if isinstance(exc, urllib3.exceptions.NewConnectionError):
        return "connection refused" if "refused" in str(exc).lower() else f"cannot connect ({exc})"
    if isinstance(exc, (urllib3.exceptions.ReadTimeoutError, urllib3.exceptions.ConnectTimeoutError)):
        return "timed out"
    if isinstance(exc, urllib3.exceptions.ProtocolError):
        return f"connection broken ({exc.args[0] if exc.args else exc})"
    return str(exc)


def _seconds(value: float) -> str:
    return f"{value:g} s"
