"""One request to `/e/<endpoint>/<path>`: check, choose an instance (holding if needed), forward.

The order matters and is cheap first: endpoint lookup, auth, body size, status, route check
(all without waking anything), then the route rule or the endpoint's balancing, then forward.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from urllib.parse import quote

from proxy import errors
from proxy.auth import check_key
from proxy.balancer import sticky_cookie_name
from proxy.coldstart import NOT_SERVING_STATES, Acquired, ColdStarts, HoldFull, pick, run_to_end
from proxy.errors import (
    ErrorReply,
    bad_gateway,
    body_too_large,
    held_failure,
    lifecycle_reply,
    not_serving,
    overloaded,
)
from proxy.forward import BodyTooLarge, ConnectFailed, Forwarder, RequestBody, StreamedResponse, UpstreamFailed
from proxy.forward import response_headers
from proxy.headers import cookie_value, forward_headers, wants_event_stream
from proxy.metrics import Metrics
from proxy.routing_view import EndpointView, InstanceView, RoutingView
from proxy.temporal_bridge import LifecycleError
from proxy.traffic import TrafficTracker

log = logging.getLogger("standby.proxy")

RULE_SCALE_OUT, RULE_RANDOM, RULE_ROUND_ROBIN = "scale-out", "random", "round-robin"


@dataclass
class Request:
    environ: dict
    view: EndpointView
    request_id: str
    target: str  # path and query for the instance
    body: object  # RequestBody, bytes or None
    chunked: bool
    strip_authorization: bool
    started: float

    @property
    def name(self) -> str:
        return self.view.name


class ProxyHandler:
    def __init__(
        self,
        routing: RoutingView,
        coldstarts: ColdStarts,
        tracker: TrafficTracker,
        forwarder: Forwarder,
        metrics: Metrics,
        max_body_bytes: int,
        keepalive_seconds: float = 15.0,
    ):
        self.routing = routing
        self.coldstarts = coldstarts
        self.balancer = coldstarts.balancer
        self.tracker = tracker
        self.forwarder = forwarder
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes
        self.keepalive_seconds = keepalive_seconds

    def __call__(self, environ, start_response):
        started = time.monotonic()
        request_id = environ.get("HTTP_X_REQUEST_ID") or os.urandom(16).hex()
        prepared = self._prepare(environ, request_id, started)
        if isinstance(prepared, ErrorReply):
            return self._send_error(prepared, start_response, request_id, environ)
        req = prepared
        rule = environ.get("HTTP_DEPLOY_ROUTE_RULE", "").strip()
        if rule:
            chosen = self._by_rule(req, rule)
        else:
            chosen = self._ready_instance(req)
            if chosen is None:
                if wants_event_stream(environ) and self.keepalive_seconds > 0:
                    return self._held_event_stream(req, start_response)
                chosen = self._hold(req)
        if isinstance(chosen, ErrorReply):
            return self._send_error(chosen, start_response, request_id, environ, req.name)
        status, headers, body = self._forward(req, chosen)
        start_response(status, headers)
        return body

    # ---- checks before choosing an instance ----
    def _prepare(self, environ: dict, request_id: str, started: float) -> Request | ErrorReply:
        name, path = split_endpoint_path(environ)
        view = self.routing.find(name) if name else None
        if view is None:
            return errors.error(404, f"endpoint {name!r} not found; URLs look like /e/<endpoint-name>/<path>")
        allowed, strip_authorization = check_key(view, environ.get("HTTP_AUTHORIZATION"))
        if not allowed:
            reply = errors.error(401, "missing or invalid API key: send 'Authorization: Bearer <key>'")
            reply.headers.append(("WWW-Authenticate", 'Bearer realm="standby"'))
            return reply
        length = parse_length(environ.get("CONTENT_LENGTH"))
        if length is not None and length > self.max_body_bytes:
            return body_too_large(self.max_body_bytes)
        if view.status in NOT_SERVING_STATES:
            return not_serving(view.name, view.status)
        chunked = length is None and "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower()
        body = None
        if length or chunked:
            body = RequestBody(environ["wsgi.input"], length, self.max_body_bytes)
        elif length == 0:
            body = b""  # keep an explicit "Content-Length: 0" (some servers want it on POST)
        if view.source_kind == "routes":
            checked = self._check_route(view, environ, path, body)
            if isinstance(checked, ErrorReply):
                return checked
            body, chunked = (checked if checked or body is not None else None), False
        query = environ.get("QUERY_STRING")
        target = path + ("?" + query if query else "")
        return Request(environ, view, request_id, target, body, chunked, strip_authorization, started)

    def _check_route(self, view: EndpointView, environ: dict, path: str, body) -> bytes | ErrorReply:
        """Routes endpoints: refuse a bad body or an unknown route before any GPU wakes."""
        data = b""
        if isinstance(body, RequestBody):
            try:
                # read() may return less than asked while the client is still sending.
                while True:
                    more = body.read()
                    if not more:
                        break
                    data += more
            except BodyTooLarge:
                return body_too_large(self.max_body_bytes)
        try:
            from common.routes import check_request
        except ImportError:  # issue 4's module absent: nothing to check against
            return data
        result = check_request(
            list(view.routes), environ["REQUEST_METHOD"], path, data, environ.get("CONTENT_TYPE"),
            query=environ.get("QUERY_STRING", ""),
        )
        if result.status != 200:
            reply = errors.ErrorReply(result.status, result.error_body())
            if result.status == 405 and getattr(result, "allowed", None):
                reply.headers.append(("Allow", ", ".join(result.allowed)))
            return reply
        return data

    # ---- choosing an instance ----
    def _sticky_id(self, req: Request) -> str | None:
        if not req.view.sticky_sessions:
            return None
        return cookie_value(req.environ, sticky_cookie_name(req.name))

    def _ready_instance(self, req: Request) -> Acquired | None:
        candidates = self.balancer.available(req.view)
        if not candidates:
            return None
        instance = pick(self.balancer, req.view, candidates, req.environ.get("REMOTE_ADDR", ""), self._sticky_id(req))
        return Acquired(instance, False)

    def _by_rule(self, req: Request, rule: str) -> Acquired | ErrorReply:
        view = req.view
        if rule.lower() == RULE_SCALE_OUT:
            return self._scale_out(req)
        if rule.lower() in (RULE_RANDOM, RULE_ROUND_ROBIN):
            if not view.instances:
                return errors.route_target_not_found(f"endpoint {view.name!r} has no running instance")
            candidates = self.balancer.available(view) or list(view.instances)
            policy = "random" if rule.lower() == RULE_RANDOM else "round_robin"
            return Acquired(self.balancer.pick(view, candidates, policy=policy), False)
        instance = view.instance(rule)
        if instance is None:
            return errors.route_target_not_found(f"{rule!r} is not a running instance of endpoint {view.name!r}")
        return Acquired(instance, False)

    def _scale_out(self, req: Request) -> Acquired | ErrorReply:
        if req.view.live_count >= req.view.max_instances:
            return errors.replica_quota_exceeded()
        try:
            self.coldstarts.enter_hold(req.view)
        except HoldFull:
            return overloaded(self.metrics, req.name, "hold queue full")
        try:
            return Acquired(self.coldstarts.scale_out_for(req.view, req.request_id), True)
        except LifecycleError as exc:
            return lifecycle_reply(self.metrics, req.name, exc)
        finally:
            self.coldstarts.leave_hold(req.name)

    def _hold(self, req: Request) -> Acquired | ErrorReply:
        try:
            self.coldstarts.enter_hold(req.view)
        except HoldFull:
            self._nudge(req.view)
            return overloaded(self.metrics, req.name, "hold queue full")
        try:
            steps = self.coldstarts.acquire(req.name, req.environ.get("REMOTE_ADDR", ""), self._sticky_id(req), None)
            return run_to_end(steps)
        except Exception as exc:  # noqa: BLE001 - mapped to a JSON answer
            return held_failure(self.metrics, req.name, exc)
        finally:
            self.coldstarts.leave_hold(req.name)

    def _nudge(self, view: EndpointView) -> None:
        """Hold queue full (or size 0) at zero: still wake, so that a retry finds an instance."""
        if not view.instances:
            self.coldstarts.wake(view)

    def _held_event_stream(self, req: Request, start_response):
        """Hold an SSE client, sending `: waking` comments so idle-cutting balancers keep it."""
        try:
            self.coldstarts.enter_hold(req.view)
        except HoldFull:
            self._nudge(req.view)
            reply = overloaded(self.metrics, req.name, "hold queue full")
            return self._send_error(reply, start_response, req.request_id, req.environ, req.name)
        return self._event_stream_body(req, start_response)

    def _event_stream_body(self, req: Request, start_response):
        committed = False
        steps = self.coldstarts.acquire(
            req.name, req.environ.get("REMOTE_ADDR", ""), self._sticky_id(req), self.keepalive_seconds
        )
        try:
            while True:
                try:
                    next(steps)
                except StopIteration as stop:
                    chosen = stop.value
                    break
                if not committed:
                    committed = True
                    start_response("200 OK", [
                        ("Content-Type", "text/event-stream"), ("Cache-Control", "no-cache"),
                        ("X-Accel-Buffering", "no"), ("X-Request-Id", req.request_id),
                        ("Deploy-Cold-Start", "true"),
                    ])
                yield b": waking\n\n"
        except Exception as exc:  # noqa: BLE001
            chosen = held_failure(self.metrics, req.name, exc)
        finally:
            self.coldstarts.leave_hold(req.name)
        if isinstance(chosen, ErrorReply):
            if committed:
                yield b"event: error\ndata: " + chosen.body() + b"\n\n"
            else:
                yield from self._send_error(chosen, start_response, req.request_id, req.environ, req.name)
            return
        status, headers, body = self._forward(req, chosen)
        if committed:
            # Status and headers went out with the first keep-alive; name the target in-band.
            yield f": deploy-route-target {chosen.instance.id}\n\n".encode()
        else:
            start_response(status, headers)
        try:
            yield from body
        finally:
            close = getattr(body, "close", None)
            if close is not None:
                close()

    # ---- forwarding ----
    def _forward(self, req: Request, chosen: Acquired):
        instance = chosen.instance
        tried: set[str] = set()
        while True:
            tried.add(instance.id)
            headers = forward_headers(req.environ, req.request_id, req.strip_authorization)
            self.tracker.begin(req.name, instance.id)
            try:
                resp = self.forwarder.send(
                    instance.address, req.environ["REQUEST_METHOD"], req.target, headers, req.body, req.chunked
                )
                break
            except ConnectFailed as exc:
                self.tracker.end(req.name, instance.id)
                retry = self._retry_target(req, tried)
                if retry is None:
                    return self._error_triple(req, bad_gateway(instance, exc), instance.id, chosen.cold_start)
                log.info("instance %s refused the connection; retrying on %s", instance.id, retry.id)
                instance = retry
            except BodyTooLarge:
                self.tracker.end(req.name, instance.id)
                return self._error_triple(req, body_too_large(self.max_body_bytes), instance.id, chosen.cold_start)
            except UpstreamFailed as exc:
                self.tracker.end(req.name, instance.id)
                return self._error_triple(req, bad_gateway(instance, exc), instance.id, chosen.cold_start)

        out = response_headers(resp)
        out.append(("Deploy-Route-Target", instance.id))
        out.append(("Deploy-Cold-Start", "true" if chosen.cold_start else "false"))
        out.append(("X-Request-Id", req.request_id))
        out.append(("X-Accel-Buffering", "no"))
        if req.view.sticky_sessions and self._sticky_id(req) != instance.id:
            cookie = sticky_cookie_name(req.name)
            out.append(("Set-Cookie", f"{cookie}={instance.id}; Path=/e/{req.name}; HttpOnly; SameSite=Lax"))
        self.metrics.observe(req.name, resp.status, time.monotonic() - req.started)
        name, instance_id = req.name, instance.id
        body = StreamedResponse(resp, lambda: self.tracker.end(name, instance_id))
        return f"{resp.status} {resp.reason or ''}".rstrip(), out, body

    def _retry_target(self, req: Request, tried: set[str]) -> InstanceView | None:
        """Retry once, and only when not a byte of the body was consumed."""
        if len(tried) > 1 or (isinstance(req.body, RequestBody) and req.body.started):
            return None
        if req.environ.get("HTTP_DEPLOY_ROUTE_RULE", "").strip().lower() not in ("", RULE_RANDOM, RULE_ROUND_ROBIN):
            return None  # a pinned instance id or a fresh scale-out: no substitute
        view = self.routing.get(req.name) or req.view
        others = [inst for inst in self.balancer.available(view) if inst.id not in tried]
        if not others:
            others = [inst for inst in view.instances if inst.id not in tried]
        if not others:
            return None
        return self.balancer.pick(view, others, req.environ.get("REMOTE_ADDR", ""))

    def _error_triple(self, req: Request, reply: ErrorReply, target: str, cold_start: bool):
        self.metrics.observe(req.name, reply.status, time.monotonic() - req.started)
        headers = error_headers(reply, req.request_id, target)
        headers.append(("Deploy-Cold-Start", "true" if cold_start else "false"))
        return reply.status_line, headers, [reply.body()]

    def _send_error(self, reply: ErrorReply, start_response, request_id: str, environ: dict, endpoint: str = ""):
        if endpoint:
            self.metrics.observe(endpoint, reply.status, 0.0)
        start_response(reply.status_line, error_headers(reply, request_id, ""))
        return [reply.body()]


def error_headers(reply: ErrorReply, request_id: str, target: str) -> list[tuple[str, str]]:
    body = reply.body()
    return [
        ("Content-Type", "application/json"),
        ("Content-Length", str(len(body))),
        ("Deploy-Route-Target", target),
        ("X-Request-Id", request_id),
        *reply.headers,
    ]


def split_endpoint_path(environ: dict) -> tuple[str, str]:
    """("name", "/rest") from /e/name/rest, keeping the client's percent-encoding of the rest."""
    path_info = environ.get("PATH_INFO", "")
    raw = environ.get("RAW_URI", "")
    raw_path = raw.partition("?")[0] if raw.startswith("/") else quote(path_info, safe="/:@!$&'()*+,;=-._~%")
    if not raw_path.startswith("/e/"):
        return "", ""
    name, slash, rest = raw_path[3:].partition("/")
    return name, "/" + rest


def parse_length(value: str | None) -> int | None:
    if not value:
        return None
    try:
        return max(0, int(value))
    except ValueError:
        return None
