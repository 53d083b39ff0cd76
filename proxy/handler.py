"""One request to `/e/<endpoint>/<path>`: check, choose an instance (holding if needed), forward.

The order matters and is cheap first: endpoint lookup, auth, body size, status, route check
(all without waking anything), then the route rule or the endpoint's balancing, then forward.

A request's place on an instance is one `Claim` (proxy/traffic.py), taken when the instance is
chosen and released exactly once: by the response body's close() when an answer streams back,
and right here on every other way out (an error answer, a refused connection, a bad client body,
an exception), so no path can leave an instance counted busy, and so never idle-released.

A WebSocket handshake takes the same path; when the instance switches protocols, the socket is
relayed until it closes (`_websocket`, proxy/websocket.py) and holds its claim all along.
"""
from __future__ import annotations

import itertools
import logging
import os
import time
from dataclasses import dataclass
from urllib.parse import quote

from common.routes import RUNTIME_HEALTH_PATH
from proxy import errors
from proxy.auth import check_key
from proxy.balancer import sticky_cookie_name
from proxy.coldstart import NOT_SERVING_STATES, Acquired, ColdStarts, HoldFull, run_to_end
from proxy.errors import (
    ErrorReply,
    bad_gateway,
    body_too_large,
    client_body_error,
    held_failure,
    lifecycle_reply,
    not_serving,
    overloaded,
)
from proxy.forward import (
    BodyTooLarge,
    ClientBodyError,
    ConnectFailed,
    Forwarder,
    RequestBody,
    StreamedResponse,
    UpstreamFailed,
    response_headers,
)
from proxy.headers import cookie_value, forward_headers, wants_event_stream
from proxy.metrics import Metrics
from proxy.revisions import RevisionPicker, narrow
from proxy.routing_view import EndpointView, RoutingView
from proxy.server import TAKEN_OVER, arrival_of, take_over
from proxy.lifecycle_client import LifecycleError
from proxy.traffic import TrafficTracker
from proxy.websocket import Sockets, wants_websocket

log = logging.getLogger("standby.proxy")

RULE_SCALE_OUT, RULE_RANDOM, RULE_ROUND_ROBIN = "scale-out", "random", "round-robin"
# A client may bound its own wait for a cold start (seconds), as Hugging Face's endpoints allow.
SCALE_UP_TIMEOUT_HEADER = "HTTP_X_SCALE_UP_TIMEOUT"
# A request may find its instance gone (released between the view's refresh and the connect):
# it then goes to another, or is held for a new one, at most this many times.
MAX_SUBSTITUTES = 2


@dataclass(slots=True)
class Request:
    environ: dict
    view: EndpointView
    request_id: str
    target: str  # path and query for the instance
    body: object  # RequestBody, bytes or None
    chunked: bool
    strip_authorization: bool
    started: float  # monotonic
    arrived_at: float  # wall clock, compared with instances' ready times
    client_wait: float | None
    websocket: bool = False  # a WebSocket handshake to a WebSocket service

    @property
    def name(self) -> str:
        return self.view.name

    @property
    def client_ip(self) -> str:
        return self.environ.get("REMOTE_ADDR", "")


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
        body_timeout_seconds: float = 60.0,
        sockets: Sockets | None = None,
    ):
        self.routing = routing
        self.coldstarts = coldstarts
        self.balancer = coldstarts.balancer
        self.tracker = tracker
        self.forwarder = forwarder
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes
        self.keepalive_seconds = keepalive_seconds
        self.body_timeout_seconds = body_timeout_seconds
        self.sockets = sockets or Sockets(routing)
        self.revisions = RevisionPicker()

    def __call__(self, environ, start_response):
        started = time.monotonic()
        arrived_at = arrival_of(environ.get("gunicorn.socket"), time.time())
        request_id = environ.get("HTTP_X_REQUEST_ID") or new_request_id()
        prepared = self._prepare(environ, request_id, started, arrived_at)
        if isinstance(prepared, ErrorReply):
            return self._send_error(prepared, start_response, request_id, environ)
        req = prepared
        if req.view.source_kind == "routes" and self._is_health_check(req):
            answered = self._health_check(req, start_response)
            if answered is not None:
                return answered
        rule = environ.get("HTTP_DEPLOY_ROUTE_RULE", "").strip()
        if rule:
            chosen = self._by_rule(req, rule)
        else:
            # With a traffic split, the revision first (README.md "Revisions and updates"); a routes
            # endpoint's /ping takes no turn of the split and wakes no sleeping revision.
            req.view = self.revisions.narrow_for(
                req.view, req.client_ip, self._sticky_id(req),
                health_check=req.view.source_kind == "routes" and self._is_health_check(req))
            chosen = self._ready_instance(req)
            if chosen is None:
                if req.websocket and self._sockets_full(req.view):
                    chosen = self._sockets_full_reply(req)
                elif wants_event_stream(environ) and self.keepalive_seconds > 0:
                    return self._held_event_stream(req, start_response)
                else:
                    chosen = self._hold(req)
        if isinstance(chosen, ErrorReply):
            return self._send_error(chosen, start_response, request_id, environ, req.name)
        if req.websocket:
            return self._websocket(req, chosen, start_response)
        status, headers, body = self._forward(req, chosen)
        start_response(status, headers)
        return body

    # ---- checks before choosing an instance ----
    def _prepare(self, environ: dict, request_id: str, started: float, arrived_at: float) -> Request | ErrorReply:
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
            return not_serving(view.name, view.status, view.status_reason)
        websocket = wants_websocket(environ)
        if websocket and not view.websocket:
            return errors.error(400, f"endpoint {view.name!r} is not a WebSocket service, so it takes no "
                                     "'Upgrade: websocket'; create an endpoint with \"websocket\": true for a "
                                     "server that speaks WebSocket")
        client_wait = parse_client_wait(environ.get(SCALE_UP_TIMEOUT_HEADER))
        if isinstance(client_wait, ErrorReply):
            return client_wait
        chunked = length is None and "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower()
        body = None
        if length or chunked:
            self._bound_body_reads(environ)
            body = RequestBody(environ["wsgi.input"], length, self.max_body_bytes, self.body_timeout_seconds)
        elif length == 0:
            body = b""  # keep an explicit "Content-Length: 0" (some servers want it on POST)
        if view.source_kind == "routes" and path != RUNTIME_HEALTH_PATH:
            checked = self._check_route(view, environ, path, body)
            if isinstance(checked, ErrorReply):
                return checked
            body, chunked = (checked if checked or body is not None else None), False
        query = environ.get("QUERY_STRING")
        target = path + ("?" + query if query else "")
        return Request(environ, view, request_id, target, body, chunked, strip_authorization, started, arrived_at,
                       client_wait, websocket)

    def _bound_body_reads(self, environ: dict) -> None:
        """A client that stops sending its body mid-way is answered 408 after the timeout instead
        of holding an instance (and its GPU) busy for good."""
        sock = environ.get("gunicorn.socket")
        if sock is not None and self.body_timeout_seconds > 0:
            try:
                sock.settimeout(self.body_timeout_seconds)
            except OSError:
                pass

    def _check_route(self, view: EndpointView, environ: dict, path: str, body) -> bytes | ErrorReply:
        """Routes endpoints: refuse a bad body or an unknown route before any GPU wakes."""
        from common.routes import check_request

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
            except ClientBodyError as exc:
                return client_body_error(exc.status, str(exc))
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

    # ---- the routes runtime's health check ----
    @staticmethod
    def _is_health_check(req: Request) -> bool:
        return req.target.partition("?")[0] == RUNTIME_HEALTH_PATH and req.environ["REQUEST_METHOD"] in ("GET", "HEAD")

    def _health_check(self, req: Request, start_response):
        """`GET /e/<name>/ping` answers 200 for every routes endpoint that serves (README
        "Model code as an endpoint"). With a ready instance it goes to the runtime, which says
        whether its functions are loaded; an endpoint asleep is answered here, from its status,
        because a health check must not cost a GPU. None: forward it like any request."""
        if req.view.instances:
            return None
        payload = {"status": req.view.status or "standby", "ready_instances": 0,
                   "msg": "no instance is running; the endpoint wakes on its first call to a route"}
        reply = errors.ErrorReply(200, payload)
        self.metrics.observe(req.name, 200, time.monotonic() - req.started)
        start_response(reply.status_line, error_headers(reply, req.request_id, ""))
        return [reply.body()] if req.environ["REQUEST_METHOD"] == "GET" else [b""]

    # ---- choosing an instance ----
    def _sticky_id(self, req: Request) -> str | None:
        if not req.view.sticky_sessions:
            return None
        return cookie_value(req.environ, sticky_cookie_name(req.name))

    def _ready_instance(self, req: Request) -> Acquired | None:
        candidates = self.balancer.available(req.view)
        if req.websocket:
            candidates = self.sockets.with_room(req.view, candidates)
        if not candidates:
            return None
        return self.coldstarts.take(req.view, candidates, req.client_ip, self._sticky_id(req), req.arrived_at)

    def _by_rule(self, req: Request, rule: str) -> Acquired | ErrorReply:
        view = req.view
        if rule.lower() == RULE_SCALE_OUT:
            req.view = self.revisions.narrow_for(view, req.client_ip)
            return self._scale_out(req)
        if rule.lower() in (RULE_RANDOM, RULE_ROUND_ROBIN):
            # Among the running instances of the revision the split picks, else of any revision;
            # an instance id (below) pins its instance whatever its revision.
            narrowed = self.revisions.narrow_for(view, req.client_ip)
            if narrowed.instances:
                view = req.view = narrowed
            if not view.instances and self.routing.poll_ready(view.name):
                view = req.view = self.routing.get(view.name) or view
            if not view.instances:  # a rule picks among running instances; it wakes nothing
                return errors.route_target_not_found(f"endpoint {view.name!r} has no running instance")
            candidates = self.balancer.available(view) or list(view.instances)
            policy = "random" if rule.lower() == RULE_RANDOM else "round_robin"
            instance = self.balancer.pick(view, candidates, policy=policy)
            return Acquired(self.tracker.claim(view.name, instance.id), instance,
                            cold_start=instance.ready_at > req.arrived_at)
        instance = view.instance(rule)
        if instance is None and self.routing.poll_ready(view.name):
            # The cached view may be a refresh behind the instance the client was just served by.
            view = req.view = self.routing.get(view.name) or view
            instance = view.instance(rule)
        if instance is None:
            return errors.route_target_not_found(f"{rule!r} is not a running instance of endpoint {view.name!r}")
        return Acquired(self.tracker.claim(view.name, instance.id), instance, cold_start=False)

    def _scale_out(self, req: Request) -> Acquired | ErrorReply:
        if req.view.live_count >= req.view.max_instances:
            return errors.replica_quota_exceeded()
        try:
            self.coldstarts.enter_hold(req.view)
        except HoldFull:
            return overloaded(self.metrics, req.name, "hold queue full")
        try:
            return self.coldstarts.scale_out_for(req.view, req.request_id)
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
            steps = self.coldstarts.acquire(req.name, req.client_ip, self._sticky_id(req), None, req.arrived_at,
                                            req.client_wait, room=self.sockets.with_room if req.websocket else None,
                                            revision=req.view.revision)
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
        steps = self.coldstarts.acquire(req.name, req.client_ip, self._sticky_id(req), self.keepalive_seconds,
                                        req.arrived_at, req.client_wait, revision=req.view.revision)
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
        except GeneratorExit:
            steps.close()
            raise
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
        """Send the request to the chosen instance; returns (status, headers, body iterable).
        The claim goes to the response body (released by its close()) or is released here."""
        claim, instance, cold_start = chosen.claim, chosen.instance, chosen.cold_start
        waited = time.monotonic() - req.started  # queue wait: arrival until an instance was chosen
        tried: set[str] = set()
        try:
            while True:
                tried.add(instance.id)
                headers = forward_headers(req.environ, req.request_id, req.strip_authorization, req.websocket)
                try:
                    resp = self.forwarder.send(
                        instance.address, req.environ["REQUEST_METHOD"], req.target, headers, req.body, req.chunked
                    )
                    break
                except ConnectFailed as exc:
                    claim.release()
                    self.tracker.error(req.name, instance.id)
                    # Released (or dead) since the view was loaded: send nothing more there.
                    self.routing.forget(instance.id)
                    again = self._another_instance(req, tried) if len(tried) <= MAX_SUBSTITUTES else None
                    if again is None:
                        return self._error_triple(req, bad_gateway(instance, exc), instance.id, cold_start)
                    if isinstance(again, ErrorReply):
                        reply = bad_gateway(instance, exc)
                        reply.payload["then"] = again.payload.get("msg", "")
                        return self._error_triple(req, reply, instance.id, cold_start)
                    log.info("instance %s refused the connection; going on with %s", instance.id, again.instance.id)
                    claim, instance, cold_start = again.claim, again.instance, cold_start or again.cold_start
                except BodyTooLarge:
                    claim.release()
                    return self._error_triple(req, body_too_large(self.max_body_bytes), instance.id, cold_start)
                except ClientBodyError as exc:
                    claim.release()
                    return self._error_triple(req, client_body_error(exc.status, str(exc)), instance.id, cold_start)
                except UpstreamFailed as exc:
                    claim.release()
                    self.tracker.error(req.name, instance.id)
                    return self._error_triple(req, bad_gateway(instance, exc), instance.id, cold_start)
        except BaseException:
            claim.release()
            raise

        if resp.status >= 500:  # an update's new instances are judged by these (proxy/traffic.py)
            self.tracker.error(req.name, instance.id)
        out = response_headers(resp)
        out.append(("Deploy-Route-Target", instance.id))
        if instance.revision:
            out.append(("Deploy-Revision", str(instance.revision)))
        out.append(("Deploy-Cold-Start", "true" if cold_start else "false"))
        out.append(("X-Request-Id", req.request_id))
        out.append(("X-Accel-Buffering", "no"))
        if req.view.sticky_sessions and self._sticky_id(req) != instance.id:
            cookie = sticky_cookie_name(req.name)
            out.append(("Set-Cookie", f"{cookie}={instance.id}; Path=/e/{req.name}; HttpOnly; SameSite=Lax"))
        self.metrics.observe(req.name, resp.status, time.monotonic() - req.started, instance.id, waited, cold_start)
        return f"{resp.status} {resp.reason or ''}".rstrip(), out, StreamedResponse(resp, claim.release)

    # ---- WebSockets ----
    def _sockets_full(self, view: EndpointView) -> bool:
        """Every ready instance has its `max_websockets` open and no other may start: refused
        at once rather than held (a socket may stay open for hours)."""
        return bool(view.instances) and view.live_count >= view.max_instances \
            and not self.sockets.with_room(view, list(view.instances))

    def _sockets_full_reply(self, req: Request) -> ErrorReply:
        return overloaded(self.metrics, req.name, f"every instance has its max_websockets "
                                                  f"({req.view.max_websockets}) sockets open and the endpoint is "
                                                  f"at max_instances ({req.view.max_instances})", "websockets_full")

    def _websocket(self, req: Request, chosen: Acquired, start_response):
        """Forward the handshake; when the instance switches protocols, take the client's socket
        and relay frames until either side closes. The socket is counted against the instance's
        `max_websockets` from its choice on, and its claim held until it closes."""
        slot = self.sockets.reserve(chosen.instance.id)
        try:
            if self.sockets.open_on(chosen.instance.id) > req.view.max_websockets:  # a route rule named it
                chosen.claim.release()
                return self._send_error(self._sockets_full_reply(req), start_response, req.request_id,
                                        req.environ, req.name)
            status, headers, body = self._forward(req, chosen)
            if not status.startswith("101") or not isinstance(body, StreamedResponse):
                # The instance refused the upgrade (its own answer), or an error answer: plain HTTP.
                start_response(status, headers)
                return body
            resp, release = body.detach()
            try:
                instance_id = next(value for name, value in headers if name == "Deploy-Route-Target")
                slot.move(instance_id)
                client, client_ahead = take_over(req.environ)
                head = ["HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n",
                        f"Upgrade: {resp.header('upgrade') or 'websocket'}\r\n"]
                head.extend(f"{name}: {value}\r\n" for name, value in headers if name != "X-Accel-Buffering")
                head.append("\r\n")
                instance_ahead = bytes(resp.conn.buf)
                resp.conn.buf.clear()
                try:
                    client.sendall("".join(head).encode("latin-1"))
                except OSError:
                    resp.conn.close()
                    return TAKEN_OVER
                self.sockets.relay(req.name, instance_id, client, resp.conn.sock, instance_ahead, client_ahead)
            finally:
                release()
            return TAKEN_OVER
        finally:
            slot.release()

    def _another_instance(self, req: Request, tried: set[str]) -> Acquired | ErrorReply | None:
        """After a refused connection: another ready instance, or (nothing of the body sent, no
        instance pinned) a hold for a new one, as a request to a sleeping endpoint would get."""
        if isinstance(req.body, RequestBody) and req.body.started:
            return None
        rule = req.environ.get("HTTP_DEPLOY_ROUTE_RULE", "").strip().lower()
        if rule not in ("", RULE_RANDOM, RULE_ROUND_ROBIN):
            return None  # a pinned instance id or a fresh scale-out: no substitute
        view = narrow(self.routing.get(req.name), req.view.revision) or req.view
        others = [inst for inst in self.balancer.available(view) if inst.id not in tried]
        if req.websocket:
            others = self.sockets.with_room(view, others)
        if others:
            req.view = view
            return self.coldstarts.take(view, others, req.client_ip, None, req.arrived_at)
        req.view = view
        return self._hold(req)

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


# Request ids: this process's random prefix and a counter (unique, and no syscall per request).
_ID_PREFIX = os.urandom(8).hex()
_id_counter = itertools.count(1)


def new_request_id() -> str:
    return f"{_ID_PREFIX}{next(_id_counter):016x}"


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


def parse_client_wait(value: str | None) -> float | None | ErrorReply:
    """`X-Scale-Up-Timeout: <seconds>`: how long this client is willing to wait for a start."""
    if value is None or not value.strip():
        return None
    try:
        seconds = float(value)
    except ValueError:
        seconds = float("nan")
    if not 0 <= seconds <= 86400:  # NaN fails this too
        return errors.error(400, f"X-Scale-Up-Timeout must be a number of seconds between 0 and 86400, got {value!r}")
    return seconds
