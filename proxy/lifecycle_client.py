"""The proxy's calls to endpoint workflows, from greenlets, over the one Temporal bridge.

`wake` and `scale_out` block only the calling greenlet (common/temporal_bridge.py's
GreenletWaiter) and fail with a `LifecycleError` whose `kind` the proxy answers by
(proxy/errors.py) and holds requests through (proxy/coldstart.py); traffic reports go without
waiting.
"""
from __future__ import annotations

from typing import Any

from common.config import Settings
from common.temporal_bridge import (
    NOT_FOUND,
    TEMPORAL_ERROR,
    TIMEOUT,
    GreenletWaiter,
    TemporalBridge,
    TemporalUnavailable,
    WorkflowActionError,
)
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
)


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


def lifecycle_error(exc: TemporalUnavailable | WorkflowActionError) -> LifecycleError:
    """The bridge's failure as the proxy sees it: unreachable or refused by Temporal itself is
    ERR_UNAVAILABLE (held requests wait through it), any failure of the update that is not one
    of the workflow's own kinds is a failed start."""
    if isinstance(exc, TemporalUnavailable):
        return LifecycleError(ERR_UNAVAILABLE, str(exc))
    if exc.type == NOT_FOUND:
        return LifecycleError(ERR_NO_WORKFLOW, exc.message)
    if exc.type == TIMEOUT:
        return LifecycleError(ERR_TIMEOUT, exc.message)
    if exc.type == TEMPORAL_ERROR:
        return LifecycleError(ERR_UNAVAILABLE, f"Temporal call failed: {exc.message}")
    if exc.type in KNOWN_KINDS:
        return LifecycleError(exc.type, exc.message)
    return LifecycleError(ERR_START_FAILED, exc.message)


class LifecycleClient:
    def __init__(self, settings: Settings):
        self.bridge = TemporalBridge(settings, waiter=GreenletWaiter)

    def start(self) -> None:
        """Start the bridge's loop thread and connect in the background, so that the first wake
        does not pay for either."""
        self.bridge.start()
        self.bridge.connect_soon()

    def wake(self, endpoint: str, request_id: str, timeout: float, revision: int = 0) -> WakeResult:
        return self._update(endpoint, UPDATE_WAKE, WakeRequest(request_id, revision), WakeResult, timeout)

    def scale_out(self, endpoint: str, request_id: str, timeout: float, revision: int = 0) -> ScaleOutResult:
        return self._update(endpoint, UPDATE_SCALE_OUT, ScaleOutRequest(request_id, revision), ScaleOutResult,
                            timeout)

    def send_traffic(self, endpoint: str, report: TrafficReport) -> None:
        self.bridge.signal_soon(endpoint, SIGNAL_TRAFFIC, report)

    def _update(self, endpoint: str, update: str, arg: Any, result_type: type, timeout: float) -> Any:
        try:
            # A workflow that is not there is not started here: the endpoint is gone or broken.
            return self.bridge.update(endpoint, update, arg, timeout, result_type=result_type, start_missing=False)
        except (TemporalUnavailable, WorkflowActionError) as exc:
            raise lifecycle_error(exc) from exc
