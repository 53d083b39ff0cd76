"""Temporal calls from gevent greenlets: one native thread runs an asyncio loop with the client.

temporalio's client is asyncio over a Rust core, and the gunicorn gevent worker has monkey
patched `socket`, `select` and `threading`. An asyncio loop built on patched sockets would block
inside gevent's hub, so the loop here runs in a native (unpatched) thread, polls with the
original epoll and wakes itself through a raw `_socket` pair. Greenlets hand it coroutines with
`call_soon_threadsafe` and wait on a gevent `AsyncResult` that the loop thread completes through
`hub.loop.run_callback_threadsafe` (the one thread-safe way into a gevent hub), so a greenlet
waiting for a cold start never blocks the hub and other requests keep flowing.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from workflows.contracts import (
    ERR_NOT_SERVING,
    ERR_REPLICA_QUOTA,
    ERR_START_FAILED,
    SIGNAL_TRAFFIC,
    UPDATE_SCALE_OUT,
    UPDATE_WAKE,
    ScaleOutRequest,
    ScaleOutResult,
    TrafficReport,
    WakeRequest,
    WakeResult,
    endpoint_workflow_id,
)

log = logging.getLogger("standby.proxy.temporal")


class LifecycleError(Exception):
    """The endpoint's workflow refused or failed a wake / scale-out; `kind` says which."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


# Kinds of LifecycleError besides the workflow's own ApplicationError types.
ERR_NO_WORKFLOW = "NoWorkflow"
ERR_UNAVAILABLE = "TemporalUnavailable"
ERR_TIMEOUT = "TemporalTimeout"
KNOWN_KINDS = (ERR_NOT_SERVING, ERR_REPLICA_QUOTA, ERR_START_FAILED)


def _original(module: str, name: str):
    """The unpatched object when gevent has monkey patched `module`, else the current one."""
    try:
        from gevent import monkey

        return monkey.get_original(module, name)
    except ImportError:  # pragma: no cover - gevent is a runtime dependency
        import importlib

        return getattr(importlib.import_module(module), name)


class _NativeSelectorLoop(asyncio.SelectorEventLoop):
    """A selector loop whose self-pipe is a raw `_socket` pair, never a gevent socket."""

    def _make_self_pipe(self):
        import _socket

        self._ssock, self._csock = _socket.socketpair()
        self._ssock.setblocking(False)
        self._csock.setblocking(False)
        self._internal_fds += 1
        self._add_reader(self._ssock.fileno(), self._read_from_self)


def _new_native_loop() -> asyncio.AbstractEventLoop:
    import selectors

    selector_cls = None
    for name in ("EpollSelector", "PollSelector", "SelectSelector"):
        try:
            selector_cls = _original("selectors", name)
            break
        except (AttributeError, ImportError):
            continue
    if selector_cls is None:
        selector_cls = selectors.DefaultSelector
    return _NativeSelectorLoop(selector_cls())


@dataclass
class _Call:
    factory: Callable[[], Awaitable[Any]]
    deliver: Callable[[bool, Any], None] | None


class TemporalBridge:
    """Greenlet-facing facade: `wake`, `scale_out` block the calling greenlet only."""

    def __init__(self, target: str, namespace: str = "default", connect_timeout: float = 5.0):
        self.target = target
        self.namespace = namespace
        self.connect_timeout = connect_timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client = None
        self._client_lock: asyncio.Lock | None = None
        self._last_connect_failure = 0.0
        self._started = False

    # ---- the native thread ----
    def start(self) -> None:
        if self._started:
            return
        self._started = True
        start_new_thread = _original("_thread", "start_new_thread")
        allocate_lock = _original("_thread", "allocate_lock")
        ready = allocate_lock()
        ready.acquire()

        def main() -> None:
            loop = _new_native_loop()
            asyncio.set_event_loop(loop)
            self._client_lock = asyncio.Lock()
            self._loop = loop
            ready.release()
            loop.run_forever()

        start_new_thread(main, ())
        # A native lock: this wait is microseconds, while the thread builds its loop.
        ready.acquire()

    def _submit(self, call: _Call) -> None:
        if not self._started:
            self.start()
        loop = self._loop
        assert loop is not None

        def run() -> None:
            task = loop.create_task(call.factory())
            if call.deliver is not None:
                deliver = call.deliver

                def done(t: asyncio.Task) -> None:
                    if t.cancelled():
                        deliver(False, LifecycleError(ERR_UNAVAILABLE, "temporal call cancelled"))
                    elif t.exception() is not None:
                        deliver(False, t.exception())
                    else:
                        deliver(True, t.result())

                task.add_done_callback(done)
            else:
                task.add_done_callback(_log_failure)

        loop.call_soon_threadsafe(run)

    def call(self, factory: Callable[[], Awaitable[Any]], timeout: float | None) -> Any:
        """Run `factory()` on the loop; block this greenlet (not the hub) for its result."""
        import gevent
        from gevent.event import AsyncResult

        result = AsyncResult()
        hub = gevent.get_hub()

        def deliver(ok: bool, value: Any) -> None:
            # Runs in the loop thread: hop into the gevent hub's thread before touching `result`.
            if ok:
                hub.loop.run_callback_threadsafe(result.set, value)
            else:
                hub.loop.run_callback_threadsafe(result.set_exception, value)

        self._submit(_Call(factory, deliver))
        result.wait(timeout)
        if not result.ready():
            raise LifecycleError(ERR_TIMEOUT, f"no answer from Temporal within {timeout:.0f} s")
        return result.get()

    def fire(self, factory: Callable[[], Awaitable[Any]]) -> None:
        """Run `factory()` on the loop without waiting; failures are logged."""
        self._submit(_Call(factory, None))

    # ---- coroutines (loop thread) ----
    async def _get_client(self):
        if self._client is not None:
            return self._client
        assert self._client_lock is not None
        async with self._client_lock:
            if self._client is None:
                from temporalio.client import Client

                # Do not hammer an unreachable server: one attempt per second at most.
                if time.monotonic() - self._last_connect_failure < 1.0:
                    raise LifecycleError(ERR_UNAVAILABLE, f"Temporal at {self.target} is unreachable")
                try:
                    self._client = await asyncio.wait_for(
                        Client.connect(self.target, namespace=self.namespace),
                        self.connect_timeout,
                    )
                except Exception as exc:
                    self._last_connect_failure = time.monotonic()
                    raise LifecycleError(
                        ERR_UNAVAILABLE, f"Temporal at {self.target} is unreachable: {exc}"
                    ) from exc
        return self._client

    async def _update(self, endpoint: str, update: str, arg: Any, result_type: type) -> Any:
        from temporalio.client import WorkflowUpdateFailedError
        from temporalio.exceptions import ApplicationError
        from temporalio.service import RPCError, RPCStatusCode

        client = await self._get_client()
        handle = client.get_workflow_handle(endpoint_workflow_id(endpoint))
        try:
            return await handle.execute_update(update, arg, result_type=result_type)
        except WorkflowUpdateFailedError as exc:
            cause = exc.cause
            if isinstance(cause, ApplicationError) and cause.type in KNOWN_KINDS:
                raise LifecycleError(cause.type, cause.message) from exc
            raise LifecycleError(ERR_START_FAILED, str(getattr(cause, "message", cause))) from exc
        except RPCError as exc:
            if exc.status == RPCStatusCode.NOT_FOUND:
                raise LifecycleError(ERR_NO_WORKFLOW, f"endpoint {endpoint!r} has no running lifecycle") from exc
            raise LifecycleError(ERR_UNAVAILABLE, f"Temporal call failed: {exc.message}") from exc

    async def _signal(self, endpoint: str, signal: str, arg: Any) -> None:
        client = await self._get_client()
        await client.get_workflow_handle(endpoint_workflow_id(endpoint)).signal(signal, arg)

    # ---- greenlet API ----
    def connect_soon(self) -> None:
        """Connect in the background so that the first wake does not pay for it."""
        self.fire(self._get_client)

    def wake(self, endpoint: str, request_id: str, timeout: float) -> WakeResult:
        return self.call(lambda: self._update(endpoint, UPDATE_WAKE, WakeRequest(request_id), WakeResult), timeout)

    def scale_out(self, endpoint: str, request_id: str, timeout: float) -> ScaleOutResult:
        return self.call(
            lambda: self._update(endpoint, UPDATE_SCALE_OUT, ScaleOutRequest(request_id), ScaleOutResult), timeout
        )

    def send_traffic(self, endpoint: str, report: TrafficReport) -> None:
        self.fire(lambda: self._signal(endpoint, SIGNAL_TRAFFIC, report))


_last_logged = {"at": 0.0}


def _log_failure(task: asyncio.Task) -> None:
    if task.cancelled() or task.exception() is None:
        return
    # Unreachable Temporal would log on every report: once a minute is enough to be seen.
    now = time.monotonic()
    if now - _last_logged["at"] > 60:
        _last_logged["at"] = now
        log.warning("background Temporal call failed: %s", task.exception())
