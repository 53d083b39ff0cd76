"""The one way into Temporal for code that has no asyncio loop: the web app's threads and the
proxy's greenlets (docs/architecture.md "The Temporal bridge").

temporalio's client is asyncio over a Rust core. One native thread runs an asyncio loop that owns
the client; callers hand it coroutines and wait for the outcome. The proxy's gunicorn worker has
monkey patched `socket`, `select` and `threading`, and an asyncio loop built on patched sockets
would block inside gevent's hub, so the loop thread is a native (unpatched) one, polls with the
original epoll and wakes itself through a raw `_socket` pair. Where nothing is patched (the web
app) these are the ordinary objects.

How a caller waits is the one thing that differs, chosen at construction:
- `ThreadWaiter` (Flask views on gunicorn threads) blocks the calling thread;
- `GreenletWaiter` (the proxy) blocks only the calling greenlet, on a gevent `AsyncResult` that the
  loop thread completes through `hub.loop.run_callback_threadsafe` (the one thread-safe way into a
  gevent hub), so other requests keep flowing while one waits for a cold start.

Every failure comes out as one of two exceptions: `TemporalUnavailable` (no connection, or the
server stopped answering) and `WorkflowActionError(type, message)` (Temporal answered, and the
answer is no). The client connects lazily, so every process starts while Temporal is down; an
unreachable server is tried at most once a second, and a call that finds it gone drops the client,
so the next one reconnects to the restarted server.
"""
from __future__ import annotations

import asyncio
import importlib
import logging
import sys
import time
from datetime import timedelta
from typing import Any, Awaitable, Callable, Protocol

from temporalio.client import (
    Client,
    WorkflowExecutionStatus,
    WorkflowQueryFailedError,
    WorkflowUpdateFailedError,
    WorkflowUpdateRPCTimeoutOrCancelledError,
)
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError, RPCStatusCode

from common.config import Settings
from workflows.contracts import ENDPOINT_WORKFLOW, QUERY_STATUS, EndpointInput, endpoint_workflow_id

log = logging.getLogger("standby.temporal")

# WorkflowActionError types besides the workflows' own ApplicationError types (workflows/contracts.py).
NOT_FOUND = "NotFound"  # no such workflow (or it has ended)
TIMEOUT = "Timeout"  # no answer within the caller's time
TEMPORAL_ERROR = "TemporalError"  # Temporal refused the call itself
UPDATE_FAILED = "UpdateFailed"  # an update failed without an ApplicationError
QUERY_FAILED = "QueryFailed"

# An unreachable server is not asked again sooner than this: callers that retry in a loop (held
# requests, page reloads) would otherwise each wait out a connect of their own.
RECONNECT_INTERVAL_SECONDS = 1.0
# How often a failing background call (traffic reports) is logged, at most.
BACKGROUND_LOG_SECONDS = 60.0


class TemporalUnavailable(Exception):
    """Temporal cannot be reached; the message says where it was looked for and how to start it."""


class WorkflowActionError(Exception):
    """Temporal answered no: `.type` says why (NOT_FOUND, TIMEOUT, ..., or the workflow's own
    ApplicationError type, e.g. ERR_REPLICA_QUOTA)."""

    def __init__(self, type_: str, message: str):
        super().__init__(message)
        self.type = type_
        self.message = message


def _original(module: str, name: str):
    """The unpatched object when gevent has monkey patched `module` (which takes importing
    gevent.monkey first), else the module's own."""
    monkey = sys.modules.get("gevent.monkey")
    if monkey is not None:
        return monkey.get_original(module, name)
    return getattr(importlib.import_module(module), name)


def _native_lock():
    return _original("_thread", "allocate_lock")()


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

    for name in ("EpollSelector", "PollSelector", "SelectSelector"):
        try:
            return _NativeSelectorLoop(_original("selectors", name)())
        except AttributeError:  # not on this platform
            continue
    return _NativeSelectorLoop(selectors.DefaultSelector())


# ---------------------------------------------------------------- waiting for an outcome

class Waiter(Protocol):
    """One call's outcome, handed over from the loop thread to the caller."""

    def deliver(self, ok: bool, value: Any) -> None:
        """Called once, in the loop thread: the result (ok) or the exception."""

    def wait(self, timeout: float) -> bool:
        """Block the caller until delivered or `timeout`; whether it was delivered."""

    def get(self) -> Any:
        """The result, or raise the exception."""


class ThreadWaiter:
    """Blocks the calling thread on a native lock that the loop thread releases."""

    def __init__(self) -> None:
        self._done = _native_lock()
        self._done.acquire()
        self._ok, self._value = False, None

    def deliver(self, ok: bool, value: Any) -> None:
        self._ok, self._value = ok, value
        self._done.release()

    def wait(self, timeout: float) -> bool:
        return self._done.acquire(timeout=timeout)

    def get(self) -> Any:
        if self._ok:
            return self._value
        raise self._value


class GreenletWaiter:
    """Blocks only the calling greenlet: the loop thread completes a gevent AsyncResult through
    the hub's thread-safe callback, never touching gevent objects from its own thread."""

    def __init__(self) -> None:
        import gevent
        from gevent.event import AsyncResult

        self._result = AsyncResult()
        self._hub = gevent.get_hub()

    def deliver(self, ok: bool, value: Any) -> None:
        self._hub.loop.run_callback_threadsafe(self._result.set if ok else self._result.set_exception, value)

    def wait(self, timeout: float) -> bool:
        self._result.wait(timeout)
        return self._result.ready()

    def get(self) -> Any:
        return self._result.get()


class _Call:
    """One coroutine run as a task on the bridge's loop; its outcome goes to `deliver`."""

    def __init__(self, factory: Callable[[], Awaitable[Any]], deliver: Callable[[bool, Any], None]):
        self.factory, self.deliver = factory, deliver
        self.task: asyncio.Task | None = None

    def run(self) -> None:  # loop thread
        self.task = asyncio.get_running_loop().create_task(self.factory())
        self.task.add_done_callback(self._done)

    def cancel(self) -> None:  # loop thread
        if self.task is not None:
            self.task.cancel()

    def _done(self, task: asyncio.Task) -> None:
        if task.cancelled():
            self.deliver(False, TemporalUnavailable("the call to Temporal was cancelled"))
        elif task.exception() is not None:
            self.deliver(False, task.exception())
        else:
            self.deliver(True, task.result())


# ---------------------------------------------------------------- the bridge

class TemporalBridge:
    """Calls to endpoint workflows that block the caller (a thread, or with GreenletWaiter only a
    greenlet), and background calls that do not wait."""

    def __init__(self, settings: Settings, waiter: Callable[[], Waiter] = ThreadWaiter,
                 connect_timeout: float = 5.0):
        self.target = settings.temporal_target
        self.namespace = settings.temporal_namespace
        self.task_queue = settings.task_queue
        self.connect_timeout = connect_timeout
        self._waiter = waiter
        self._start_lock = _native_lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: Client | None = None
        self._client_lock: asyncio.Lock | None = None
        # (monotonic time, message) of the last failed connect.
        self._connect_failure: tuple[float, str] | None = None
        self._background_logged_at = 0.0

    # ---- calls that wait ----
    def start_endpoint(self, name: str) -> None:
        """Start the endpoint's workflow; a closed one with the same id (terminated) may be reused."""
        self.call(lambda: self._start(name, None, None), timeout=30)

    def signal(self, name: str, signal_name: str, arg: Any = None) -> None:
        """Signal the endpoint's workflow, starting it first if it is not running.

        Signal-with-start covers an endpoint row whose workflow never started (Temporal was
        down at creation): any later action brings the workflow into being.
        """
        self.call(lambda: self._start(name, signal_name, arg), timeout=30)

    def update(self, name: str, update_name: str, arg: Any, timeout: float, *, result_type: type | None = None,
               start_missing: bool = True) -> Any:
        """Run an update and wait for its result (at most `timeout` seconds). With `start_missing`,
        a workflow that never started is started and the update tried again."""
        return self.call(lambda: self._update(name, update_name, arg, timeout, result_type, start_missing),
                         timeout=timeout + 10)

    def is_running(self, name: str) -> bool:
        """Whether the endpoint's workflow is still open (a terminated one may still be purging)."""
        return self.call(lambda: self._is_running(name), timeout=15)

    def query_status(self, name: str) -> Any:
        return self.call(lambda: self._query(name, QUERY_STATUS), timeout=15)

    def signal_workflow(self, workflow_id: str, signal_name: str, arg: Any = None) -> None:
        """Signal any running workflow by id (a pool's, for an operator's drain)."""
        self.call(lambda: self._by_id(workflow_id, lambda h: h.signal(signal_name, arg)), timeout=30)

    def query_workflow(self, workflow_id: str, query_name: str, result_type: type | None = None) -> Any:
        """Query any running workflow by id (a pool's queue and free resources)."""
        return self.call(lambda: self._by_id(workflow_id, lambda h: h.query(query_name, result_type=result_type)),
                         timeout=15)

    # ---- calls that do not wait ----
    def signal_soon(self, name: str, signal_name: str, arg: Any) -> None:
        """Signal a running workflow (never start one); a failure is logged, at most once a minute."""
        self.fire(lambda: self._signal(name, signal_name, arg))

    def connect_soon(self) -> None:
        """Connect in the background, so that the first call does not pay for it."""
        self.fire(self._connected_client)

    # ---- the loop thread ----
    def start(self) -> None:
        """Start the loop thread (idempotent; the first call starts it anyway)."""
        with self._start_lock:
            if self._loop is not None:
                return
            ready = _native_lock()
            ready.acquire()

            def main() -> None:
                loop = _new_native_loop()
                asyncio.set_event_loop(loop)
                self._client_lock = asyncio.Lock()
                self._loop = loop
                ready.release()
                loop.run_forever()

            _original("_thread", "start_new_thread")(main, ())
            # A native lock: this wait is microseconds, while the thread builds its loop.
            ready.acquire()

    def close(self) -> None:
        """Stop the loop thread and drop the client; a later call starts both afresh."""
        with self._start_lock:
            loop, self._loop, self._client = self._loop, None, None
        if loop is not None:
            loop.call_soon_threadsafe(loop.stop)

    def call(self, factory: Callable[[], Awaitable[Any]], timeout: float) -> Any:
        """Run `factory()` on the loop and block the caller (see `waiter`) for its outcome."""
        waiter = self._waiter()
        call = _Call(factory, waiter.deliver)
        loop = self._submit(call)
        if not waiter.wait(timeout):
            loop.call_soon_threadsafe(call.cancel)
            raise WorkflowActionError(TIMEOUT, f"Temporal did not answer within {timeout:g} seconds")
        return waiter.get()

    def fire(self, factory: Callable[[], Awaitable[Any]]) -> None:
        """Run `factory()` on the loop without waiting; a failure is logged, at most once a minute."""
        self._submit(_Call(factory, self._log_background_failure))

    def _submit(self, call: _Call) -> asyncio.AbstractEventLoop:
        loop = self._loop
        if loop is None:
            self.start()
            loop = self._loop
        loop.call_soon_threadsafe(call.run)
        return loop

    def _log_background_failure(self, ok: bool, value: Any) -> None:
        # Unreachable Temporal would log on every traffic report: once a minute is enough to be seen.
        now = time.monotonic()
        if not ok and now - self._background_logged_at > BACKGROUND_LOG_SECONDS:
            self._background_logged_at = now
            log.warning("background Temporal call failed: %s", value)

    # ---- coroutines (loop thread) ----
    async def _connected_client(self) -> Client:
        if self._client is not None:
            return self._client
        async with self._client_lock:
            if self._client is None:
                failure = self._connect_failure
                if failure is not None and time.monotonic() - failure[0] < RECONNECT_INTERVAL_SECONDS:
                    raise TemporalUnavailable(failure[1])
                try:
                    self._client = await asyncio.wait_for(
                        Client.connect(self.target, namespace=self.namespace), self.connect_timeout)
                except Exception as exc:  # noqa: BLE001 - whatever the cause, Temporal is not there
                    message = self._unreachable(exc)
                    self._connect_failure = (time.monotonic(), message)
                    raise TemporalUnavailable(message) from None
                self._connect_failure = None
        return self._client

    def _unreachable(self, exc: BaseException) -> str:
        detail = str(exc)
        if "refused" in detail.lower():
            detail = "connection refused"
        elif isinstance(exc, asyncio.TimeoutError):
            detail = f"no answer within {self.connect_timeout:g} seconds"
        return (f"Temporal is not reachable at {self.target} ({detail[:200]}); start it with "
                "`python app.py temporal` or point TEMPORAL_ADDRESS at a running server")

    def _rpc_failure(self, exc: RPCError, name: str) -> Exception:
        """What a failed call to Temporal means for the caller (the one reading of RPC errors)."""
        if exc.status == RPCStatusCode.NOT_FOUND:
            return WorkflowActionError(NOT_FOUND, f"no running workflow for endpoint {name!r}")
        if exc.status in (RPCStatusCode.UNAVAILABLE, RPCStatusCode.DEADLINE_EXCEEDED):
            self._client = None  # the server may have restarted: the next call reconnects
            return TemporalUnavailable(self._unreachable(exc))
        return WorkflowActionError(TEMPORAL_ERROR, exc.message)

    async def _start(self, name: str, signal_name: str | None, arg: Any) -> None:
        client = await self._connected_client()
        extra: dict[str, Any] = {}
        if signal_name:
            extra = {"start_signal": signal_name, "start_signal_args": [] if arg is None else [arg]}
        try:
            await client.start_workflow(
                ENDPOINT_WORKFLOW,
                EndpointInput(name=name),
                id=endpoint_workflow_id(name),
                task_queue=self.task_queue,
                id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE,
                # Creating twice (a retried POST) must not fail: join the running workflow.
                id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
                **extra,
            )
        except RPCError as exc:
            raise self._rpc_failure(exc, name) from None

    async def _signal(self, name: str, signal_name: str, arg: Any) -> None:
        client = await self._connected_client()
        try:
            await client.get_workflow_handle(endpoint_workflow_id(name)).signal(signal_name, arg)
        except RPCError as exc:
            raise self._rpc_failure(exc, name) from None

    async def _update(self, name: str, update_name: str, arg: Any, timeout: float, result_type: type | None,
                      start_missing: bool) -> Any:
        try:
            return await self._update_once(name, update_name, arg, timeout, result_type)
        except WorkflowActionError as exc:
            if exc.type != NOT_FOUND or not start_missing:
                raise
        # The workflow never started (Temporal was down at creation): start it, then retry.
        await self._start(name, None, None)
        return await self._update_once(name, update_name, arg, timeout, result_type)

    async def _update_once(self, name: str, update_name: str, arg: Any, timeout: float,
                           result_type: type | None) -> Any:
        client = await self._connected_client()
        handle = client.get_workflow_handle(endpoint_workflow_id(name))
        try:
            return await asyncio.wait_for(
                handle.execute_update(update_name, arg, result_type=result_type,
                                      rpc_timeout=timedelta(seconds=timeout)),
                timeout,
            )
        except (asyncio.TimeoutError, WorkflowUpdateRPCTimeoutOrCancelledError):
            # The update stays accepted in the workflow (e.g. the instance keeps starting).
            raise WorkflowActionError(TIMEOUT, f"{update_name} did not finish within {timeout:g} seconds") from None
        except WorkflowUpdateFailedError as exc:
            cause = exc.cause
            if isinstance(cause, ApplicationError):
                raise WorkflowActionError(cause.type or "ApplicationError", cause.message) from None
            raise WorkflowActionError(UPDATE_FAILED, str(cause or exc)) from None
        except RPCError as exc:
            raise self._rpc_failure(exc, name) from None

    async def _is_running(self, name: str) -> bool:
        client = await self._connected_client()
        try:
            description = await client.get_workflow_handle(endpoint_workflow_id(name)).describe()
        except RPCError as exc:
            if exc.status == RPCStatusCode.NOT_FOUND:
                return False
            raise self._rpc_failure(exc, name) from None
        return description.status == WorkflowExecutionStatus.RUNNING

    async def _by_id(self, workflow_id: str, act: Callable[[Any], Awaitable[Any]]) -> Any:
        client = await self._connected_client()
        try:
            return await act(client.get_workflow_handle(workflow_id))
        except WorkflowQueryFailedError as exc:
            raise WorkflowActionError(QUERY_FAILED, str(exc)) from None
        except RPCError as exc:
            failure = self._rpc_failure(exc, workflow_id)
            if isinstance(failure, WorkflowActionError) and failure.type == NOT_FOUND:
                failure = WorkflowActionError(NOT_FOUND, f"no running workflow {workflow_id!r}")
            raise failure from None

    async def _query(self, name: str, query_name: str) -> Any:
        client = await self._connected_client()
        try:
            return await client.get_workflow_handle(endpoint_workflow_id(name)).query(query_name)
        except WorkflowQueryFailedError as exc:
            raise WorkflowActionError(QUERY_FAILED, str(exc)) from None
        except RPCError as exc:
            raise self._rpc_failure(exc, name) from None
