"""Synchronous access to Temporal for Flask views.

Flask views are synchronous and temporalio is asyncio: one background thread runs an event
loop that owns the temporalio Client, and each call is submitted to it with
`run_coroutine_threadsafe`. The client connects lazily (the web app starts even when
Temporal is down) and reconnects after a failure.
"""
from __future__ import annotations

import asyncio
import threading
from datetime import timedelta
from typing import Any

from temporalio.client import (
    Client,
    WorkflowExecutionStatus,
    RPCError,
    WorkflowQueryFailedError,
    WorkflowUpdateFailedError,
    WorkflowUpdateRPCTimeoutOrCancelledError,
)
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCStatusCode

from common.config import Settings
from workflows.contracts import ENDPOINT_WORKFLOW, QUERY_STATUS, EndpointInput, endpoint_workflow_id


class TemporalUnavailable(Exception):
    """Temporal cannot be reached: views answer 503."""


class WorkflowActionError(Exception):
    """A business failure of a workflow update (e.g. ERR_REPLICA_QUOTA); `.type` says which."""

    def __init__(self, type_: str, message: str):
        super().__init__(message)
        self.type = type_
        self.message = message


class TemporalBridge:
    def __init__(self, settings: Settings, connect_timeout: float = 5.0):
        self.settings = settings
        self.connect_timeout = connect_timeout
        self._client: Client | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def target(self) -> str:
        return self.settings.temporal_target

    # ---- sync API used by views ----

    def start_endpoint(self, name: str) -> None:
        """Start the endpoint's workflow; a closed one with the same id (terminated) may be reused."""
        self._run(self._start(name, None, None), timeout=30)

    def signal(self, name: str, signal_name: str, arg: Any = None) -> None:
        """Signal the endpoint's workflow, starting it first if it is not running.

        Signal-with-start covers an endpoint row whose workflow never started (Temporal was
        down at creation): any later action brings the workflow into being.
        """
        self._run(self._start(name, signal_name, arg), timeout=30)

    def update(self, name: str, update_name: str, arg: Any, timeout: float) -> Any:
        """Run an update and wait for its result (at most `timeout` seconds)."""
        return self._run(self._update(name, update_name, arg, timeout), timeout=timeout + 10)

    def is_running(self, name: str) -> bool:
        """Whether the endpoint's workflow is still open (a terminated one may still be purging)."""
        return self._run(self._is_running(name), timeout=15)

    def query_status(self, name: str) -> Any:
        return self._run(self._query(name), timeout=15)

    def close(self) -> None:
        with self._lock:
            loop, thread = self._loop, self._thread
            self._loop = self._thread = None
            self._client = None
        if loop is not None:
            loop.call_soon_threadsafe(loop.stop)
        if thread is not None:
            thread.join(timeout=5)

    # ---- the loop thread ----

    def _ensure_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                thread = threading.Thread(target=loop.run_forever, name="temporal-bridge", daemon=True)
                thread.start()
                self._loop, self._thread = loop, thread
            return self._loop

    def _run(self, coro, timeout: float) -> Any:
        future = asyncio.run_coroutine_threadsafe(coro, self._ensure_loop())
        try:
            return future.result(timeout=timeout)
        except TimeoutError:
            future.cancel()
            raise WorkflowActionError("Timeout", f"Temporal did not answer within {timeout:g} seconds") from None

    async def _get_client(self) -> Client:
        if self._client is None:
            try:
                self._client = await asyncio.wait_for(
                    Client.connect(self.target, namespace=self.settings.temporal_namespace),
                    self.connect_timeout,
                )
            except (RuntimeError, OSError, asyncio.TimeoutError) as exc:
                raise TemporalUnavailable(self._message(exc)) from None
        return self._client

    def _message(self, exc: BaseException) -> str:
        detail = str(exc)
        if "refused" in detail.lower():
            detail = "connection refused"
        elif isinstance(exc, asyncio.TimeoutError):
            detail = f"no answer within {self.connect_timeout:g} seconds"
        return (f"Temporal is not reachable at {self.target} ({detail[:200]}); start it with "
                "`python app.py temporal` or point TEMPORAL_ADDRESS at a running server")

    def _unavailable(self, exc: RPCError) -> TemporalUnavailable:
        # Drop the client so the next call reconnects (the server may have restarted).
        self._client = None
        return TemporalUnavailable(self._message(exc))

    async def _start(self, name: str, signal_name: str | None, arg: Any) -> None:
        client = await self._get_client()
        extra: dict[str, Any] = {}
        if signal_name:
            extra = {"start_signal": signal_name, "start_signal_args": [] if arg is None else [arg]}
        try:
            await client.start_workflow(
                ENDPOINT_WORKFLOW,
                EndpointInput(name=name),
                id=endpoint_workflow_id(name),
                task_queue=self.settings.task_queue,
                id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE,
                # Creating twice (a retried POST) must not fail: join the running workflow.
                id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
                **extra,
            )
        except RPCError as exc:
            if exc.status in (RPCStatusCode.UNAVAILABLE, RPCStatusCode.DEADLINE_EXCEEDED):
                raise self._unavailable(exc) from None
            raise WorkflowActionError("TemporalError", exc.message) from None

    async def _update(self, name: str, update_name: str, arg: Any, timeout: float) -> Any:
        try:
            return await self._update_once(name, update_name, arg, timeout)
        except WorkflowActionError as exc:
            if exc.type != "NotFound":
                raise
        # The workflow never started (Temporal was down at creation): start it, then retry.
        await self._start(name, None, None)
        return await self._update_once(name, update_name, arg, timeout)

    async def _update_once(self, name: str, update_name: str, arg: Any, timeout: float) -> Any:
        client = await self._get_client()
        handle = client.get_workflow_handle(endpoint_workflow_id(name))
        try:
            return await asyncio.wait_for(
                handle.execute_update(update_name, arg, rpc_timeout=timedelta(seconds=timeout)),
                timeout,
            )
        except (asyncio.TimeoutError, WorkflowUpdateRPCTimeoutOrCancelledError):
            # The update stays accepted in the workflow (e.g. the instance keeps starting).
            raise WorkflowActionError("Timeout", f"{update_name} did not finish within {timeout:g} seconds") from None
        except WorkflowUpdateFailedError as exc:
            cause = exc.cause
            if isinstance(cause, ApplicationError):
                raise WorkflowActionError(cause.type or "ApplicationError", cause.message) from None
            raise WorkflowActionError("UpdateFailed", str(cause or exc)) from None
        except RPCError as exc:
            if exc.status == RPCStatusCode.NOT_FOUND:
                raise WorkflowActionError("NotFound", f"no running workflow for endpoint {name!r}") from None
            if exc.status in (RPCStatusCode.UNAVAILABLE, RPCStatusCode.DEADLINE_EXCEEDED):
                raise self._unavailable(exc) from None
            raise WorkflowActionError("TemporalError", exc.message) from None

    async def _is_running(self, name: str) -> bool:
        client = await self._get_client()
        try:
            description = await client.get_workflow_handle(endpoint_workflow_id(name)).describe()
        except RPCError as exc:
            if exc.status == RPCStatusCode.NOT_FOUND:
                return False
            if exc.status in (RPCStatusCode.UNAVAILABLE, RPCStatusCode.DEADLINE_EXCEEDED):
                raise self._unavailable(exc) from None
            raise WorkflowActionError("TemporalError", exc.message) from None
        return description.status == WorkflowExecutionStatus.RUNNING

    async def _query(self, name: str) -> Any:
        client = await self._get_client()
        handle = client.get_workflow_handle(endpoint_workflow_id(name))
        try:
            return await handle.query(QUERY_STATUS)
        except WorkflowQueryFailedError as exc:
            raise WorkflowActionError("QueryFailed", str(exc)) from None
        except RPCError as exc:
            if exc.status == RPCStatusCode.NOT_FOUND:
                raise WorkflowActionError("NotFound", f"no running workflow for endpoint {name!r}") from None
            if exc.status in (RPCStatusCode.UNAVAILABLE, RPCStatusCode.DEADLINE_EXCEEDED):
                raise self._unavailable(exc) from None
            raise WorkflowActionError("TemporalError", exc.message) from None
