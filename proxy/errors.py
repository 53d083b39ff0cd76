"""JSON error answers of the proxy. Every one says what happened and, where it can, what to do.

Route-rule errors use the hosted product's codes: 1006 "route target not found" (HTTP 404)
and 1007 "deployment replica quota exceeded" (HTTP 429: the request is valid, the endpoint is
at max instances). Overload and cold-start timeouts are 503 with Retry-After.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

from proxy.coldstart import ClientWaitOver, EndpointGone, HoldTimeout, NotServing
from proxy.metrics import Metrics
from proxy.routing_view import InstanceView
from proxy.lifecycle_client import ERR_NO_WORKFLOW, ERR_NOT_SERVING, ERR_REPLICA_QUOTA, ERR_START_FAILED, LifecycleError

log = logging.getLogger("standby.proxy")
RETRY_AFTER_SECONDS = 5

STATUS_LINES = {
    200: "200 OK",
    400: "400 Bad Request",
    401: "401 Unauthorized",
    404: "404 Not Found",
    405: "405 Method Not Allowed",
    408: "408 Request Timeout",
    413: "413 Content Too Large",
    429: "429 Too Many Requests",
    500: "500 Internal Server Error",
    502: "502 Bad Gateway",
    503: "503 Service Unavailable",
}

ROUTE_TARGET_NOT_FOUND = 1006
REPLICA_QUOTA_EXCEEDED = 1007


@dataclass
class ErrorReply:
    status: int
    payload: dict
    headers: list[tuple[str, str]] = field(default_factory=list)

    @property
    def status_line(self) -> str:
        return STATUS_LINES.get(self.status, f"{self.status} Error")

    def body(self) -> bytes:
        return json.dumps(self.payload).encode()


def error(http_status: int, msg: str, code: int | None = None, retry_after: int | None = None, **extra) -> ErrorReply:
    payload = {"code": code if code is not None else http_status, "msg": msg}
    payload.update(extra)
    headers = []
    if retry_after is not None:
        headers.append(("Retry-After", str(retry_after)))
    return ErrorReply(http_status, payload, headers)


def route_target_not_found(detail: str) -> ErrorReply:
    return error(404, "route target not found", code=ROUTE_TARGET_NOT_FOUND, detail=detail)


def replica_quota_exceeded() -> ErrorReply:
    return error(429, "deployment replica quota exceeded", code=REPLICA_QUOTA_EXCEEDED)


def body_too_large(limit: int) -> ErrorReply:
    return error(413, f"request body is larger than the proxy's limit of {limit} bytes "
                             "(STANDBY_PROXY_MAX_BODY_BYTES)")


def not_serving(name: str, status: str, reason: str = "") -> ErrorReply:
    hint = "terminate it" if status == "failed" else "restart it" if status == "stopped" else "create a new one"
    because = f" ({reason})" if reason else ""
    return error(503, f"endpoint {name!r} is {status}{because} and does not wake on requests; {hint} first",
                 status=status, reason=reason)


def bad_gateway(instance: InstanceView, exc: Exception) -> ErrorReply:
    return error(502, f"instance {instance.id} did not answer: {exc}")


def overloaded(metrics: Metrics, name: str, reason: str, label: str = "hold_queue_full") -> ErrorReply:
    metrics.rejected(name, label)
    return error(503, f"endpoint {name!r} is overloaded ({reason}); retry later",
                        retry_after=RETRY_AFTER_SECONDS)


def lifecycle_reply(metrics: Metrics, name: str, exc: LifecycleError) -> ErrorReply:
    if exc.kind == ERR_REPLICA_QUOTA:
        return replica_quota_exceeded()
    if exc.kind == ERR_NOT_SERVING:
        metrics.rejected(name, "not_serving")
        return error(503, f"endpoint {name!r} is not serving and does not wake on requests: {exc}")
    if exc.kind == ERR_START_FAILED:
        # Every request held for this start hears it at once, with the instance's own words
        # (exit code, last log lines), not at the end of the startup timeout.
        metrics.rejected(name, "start_failed")
        return error(503, f"endpoint {name!r} could not start an instance: {exc}", reason=str(exc))
    if exc.kind == ERR_NO_WORKFLOW:
        metrics.rejected(name, "no_workflow")
        return error(503, f"endpoint {name!r} has no running lifecycle workflow; restart it")
    metrics.rejected(name, "lifecycle_unavailable")
    return error(503, f"could not wake endpoint {name!r}: {exc}", retry_after=RETRY_AFTER_SECONDS)


def held_failure(metrics: Metrics, name: str, exc: Exception) -> ErrorReply:
    if isinstance(exc, HoldTimeout):
        return overloaded(metrics, name, "no instance became ready within the startup timeout", "hold_timeout")
    if isinstance(exc, ClientWaitOver):
        metrics.rejected(name, "client_wait_over")
        return error(503, f"no instance of endpoint {name!r} was ready within the {exc.seconds:g} s "
                          "asked by X-Scale-Up-Timeout; it keeps starting, retry later",
                     retry_after=RETRY_AFTER_SECONDS)
    if isinstance(exc, NotServing):
        return not_serving(name, exc.status, exc.reason)
    if isinstance(exc, EndpointGone):
        return error(404, f"endpoint {name!r} not found")
    if isinstance(exc, LifecycleError):
        return lifecycle_reply(metrics, name, exc)
    log.exception("holding a request for %s failed", name, exc_info=exc)
    return error(503, f"could not get an instance for endpoint {name!r}: {exc}",
                        retry_after=RETRY_AFTER_SECONDS)


def client_body_error(status: int, detail: str) -> ErrorReply:
    """The client's request body could not be read (malformed chunking, cut short, too slow)."""
    reply = error(status, f"could not read the request body: {detail}")
    return reply
