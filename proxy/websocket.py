"""WebSocket endpoints (README "WebSocket endpoints", docs/architecture.md "The proxy contract").

The handshake (`GET` with `Upgrade: websocket`) goes through the proxy's request path like any
request: endpoint lookup, API key, route rules, balancing, and cold-start holding from standby.
When the instance answers `101 Switching Protocols`, the proxy takes the client's socket from the
server (proxy/server.py `take_over`) and relays frames both ways as they arrive: each frame's
header is read to know where frames begin and end, its payload is passed on untouched (masked
from the client, unmasked from the instance, compressed or not), so ping/pong, text, binary and
fragments need nothing of the proxy.

Why frames and not plain bytes: the proxy must be able to say goodbye itself, and a close frame
may only go between frames. When the instance is stopped or drained, every socket on it gets a
close frame with 1001 ("going away") after a grace period (the instance is no longer among the
endpoint's ready instances for `grace_seconds`); when the instance's connection ends without a
close frame (its process died, or was stopped before the grace ran out), the client gets one at
once: never a silent reset. When the client goes away, the instance's socket is closed at once,
after a 1001 close frame if the client sent none, so the server's handler ends with it.

An open socket holds its request's claim on the instance (proxy/traffic.py `Claim`), so it counts
as in flight: the lifecycle never releases an instance with a socket open, and its idle retention
counts from the moment the last one closed. `max_websockets` caps the open sockets of one
instance (`Sockets.with_room`).
"""
from __future__ import annotations

import logging
import os
import struct
import time
from typing import Callable

import gevent
from gevent.lock import Semaphore

from proxy.routing_view import EndpointView, InstanceView, RoutingView

log = logging.getLogger("standby.proxy.websocket")

BLOCK = 64 * 1024
OP_CLOSE = 0x8
GOING_AWAY = 1001
# After the proxy sent a close frame of its own, how long the peer has to answer it.
CLOSE_REPLY_SECONDS = 2.0
# How long a close frame of the proxy's own waits for a frame in transit to end.
FRAME_END_WAIT_SECONDS = 5.0


def wants_websocket(environ: dict) -> bool:
    """A WebSocket handshake (RFC 6455 4.1): `Upgrade: websocket` with `Connection: upgrade`."""
    upgrade = environ.get("HTTP_UPGRADE")
    if not upgrade or "websocket" not in upgrade.lower():
        return False
    return "upgrade" in environ.get("HTTP_CONNECTION", "").lower()


def close_frame(code: int, reason: str, masked: bool) -> bytes:
    """A close frame (RFC 6455 5.5.1); frames to a server are masked."""
    payload = struct.pack("!H", code) + reason.encode("utf-8")[:123]
    if not masked:
        return bytes((0x80 | OP_CLOSE, len(payload))) + payload
    key = os.urandom(4)
    return bytes((0x80 | OP_CLOSE, 0x80 | len(payload))) + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def frame_header(data: bytes, pos: int) -> tuple[int, int] | None:
    """(header size, payload size) of the frame starting at `data[pos]`, or None while its header
    has not all arrived (RFC 6455 5.2)."""
    have = len(data) - pos
    if have < 2:
        return None
    second = data[pos + 1]
    size = 6 if second & 0x80 else 2
    length = second & 0x7F
    if length == 126:
        size += 2
        if have < size:
            return None
        length = struct.unpack_from("!H", data, pos + 2)[0]
    elif length == 127:
        size += 8
        if have < size:
            return None
        length = struct.unpack_from("!Q", data, pos + 2)[0]
    elif have < size:
        return None
    return size, length


class Direction:
    """Frames flowing one way (client -> instance, or instance -> client), parsed just enough to
    know where each ends and which are close frames. Pure: `feed` takes the bytes read and
    returns those to send on."""

    __slots__ = ("masked", "lock", "remaining", "pending", "dropping", "close_sent", "close_received", "ended")

    def __init__(self, masked: bool):
        self.masked = masked  # frames the proxy writes this way must be masked (towards the instance)
        # Held by the pump while a frame is part-way through (and while it sends): a close frame of
        # the proxy's own takes it, so it goes between frames, never inside one.
        self.lock = Semaphore()
        self.remaining = 0  # payload bytes of the current frame still to come
        self.pending = b""  # the start of a frame header that arrived without its end
        self.dropping = False  # the current frame is not passed on
        self.close_sent = False  # a close frame went this way (the sender's, or the proxy's own)
        self.close_received = False  # the sender sent a close frame
        self.ended = False  # the sender's socket closed or failed

    def feed(self, data: bytes) -> bytes:
        if self.pending:
            data, self.pending = self.pending + data, b""
        out = []
        pos, end = 0, len(data)
        while pos < end:
            if self.remaining:
                take = min(self.remaining, end - pos)
                if not self.dropping:
                    out.append(data[pos:pos + take] if pos or take < end else data)
                pos += take
                self.remaining -= take
                continue
            head = frame_header(data, pos)
            if head is None:
                self.pending = data[pos:]
                break
            size, self.remaining = head
            is_close = data[pos] & 0x0F == OP_CLOSE
            # Nothing may follow a close frame (RFC 6455 5.5.1): after one went this way, frames
            # are dropped; a close that answers the proxy's own is the proxy's to take.
            self.dropping = self.close_sent
            if is_close:
                self.close_received = True
            if not self.dropping:
                self.close_sent = self.close_sent or is_close
                out.append(data[pos:pos + size])
            pos += size
        return out[0] if len(out) == 1 else b"".join(out)

    @property
    def in_frame(self) -> bool:
        return self.remaining > 0


class Session:
    """One open WebSocket: the client's socket and the instance's, with a pump each way."""

    def __init__(self, endpoint: str, instance_id: str, client, upstream):
        self.endpoint, self.instance_id = endpoint, instance_id
        self.client, self.upstream = client, upstream
        self.to_upstream = Direction(masked=True)  # from the client
        self.to_client = Direction(masked=False)  # from the instance
        self.leaving_since: float | None = None  # when its instance left the endpoint's ready set
        self._finished = False
        self._reply_timer = None

    # ---- running ----
    def run(self, to_client_first: bytes, to_upstream_first: bytes) -> None:
        """Relay until both sides are done; returns when both sockets are closed."""
        try:
            if to_upstream_first:
                self._pass(self.to_upstream, self.upstream, to_upstream_first)
            if to_client_first:
                self._pass(self.to_client, self.client, to_client_first)
        except OSError:
            self.finish()
            return
        other = gevent.spawn(self._pump, self.to_client, self.upstream, self.client)
        try:
            self._pump(self.to_upstream, self.client, self.upstream)
        finally:
            other.join(CLOSE_REPLY_SECONDS + FRAME_END_WAIT_SECONDS)
            if not other.dead:
                other.kill(block=False)
            self.finish()

    def _pass(self, direction: Direction, dst, data: bytes) -> None:
        with direction.lock:
            out = direction.feed(data)
            if out:
                dst.sendall(out)

    def _pump(self, direction: Direction, src, dst) -> None:
        held = False
        try:
            while not self._finished:
                data = src.recv(BLOCK)
                if not data:
                    break
                if not held:
                    direction.lock.acquire()
                    held = True
                out = direction.feed(data)
                if out:
                    dst.sendall(out)
                if not direction.in_frame:
                    held = False
                    direction.lock.release()
                if direction.close_received and self._done():
                    break
        except OSError:
            pass
        finally:
            if held:
                direction.lock.release()
            direction.ended = True
        self._ended(direction)

    def _done(self) -> bool:
        """Both closing handshakes are over: the client's (a close frame each way between it and
        the proxy) and the instance's, unless the instance's socket is gone already."""
        client_leg = self.to_client.close_sent and self.to_upstream.close_received
        instance_leg = self.to_client.ended or (self.to_upstream.close_sent and self.to_client.close_received)
        return client_leg and instance_leg

    def _ended(self, direction: Direction) -> None:
        if self._finished:
            return
        if direction is self.to_upstream:
            # The client went away (closed, reset, or done): the instance's socket closes at once,
            # with a close frame first unless the client's own went.
            self.say(self.to_upstream, self.upstream, GOING_AWAY, "client went away")
            self.finish()
        elif self._done():
            self.finish()
        else:
            # The instance's socket ended. Without a close frame of its own (the process died, or
            # it was stopped), the client is told it went away, never just cut off.
            self.say(self.to_client, self.client, GOING_AWAY, f"instance {self.instance_id} went away")
            self._await_replies()

    # ---- the proxy's own close ----
    def going_away(self, reason: str) -> None:
        """Close both sides with 1001: its instance is stopping or draining, or the proxy is."""
        if self._finished:
            return
        self.say(self.to_client, self.client, GOING_AWAY, reason)
        self.say(self.to_upstream, self.upstream, GOING_AWAY, reason)
        self._await_replies()

    def say(self, direction: Direction, dst, code: int, reason: str) -> None:
        """Send a close frame of the proxy's own `direction`'s way, between frames, unless one
        went already or the way is closed."""
        if direction.close_sent or self._finished:
            return
        if not direction.lock.acquire(timeout=FRAME_END_WAIT_SECONDS):
            self.finish()  # a frame stuck part-way through: no frame can follow it
            return
        try:
            if not direction.close_sent:
                direction.close_sent = True
                dst.sendall(close_frame(code, reason, direction.masked))
        except OSError:
            pass
        finally:
            direction.lock.release()

    def _await_replies(self) -> None:
        if self._done():
            self.finish()
        elif self._reply_timer is None:
            self._reply_timer = gevent.spawn_later(CLOSE_REPLY_SECONDS, self.finish)

    def finish(self) -> None:
        """Close both sockets (idempotent); pumps blocked on them end."""
        if self._finished:
            return
        self._finished = True
        if self._reply_timer is not None and self._reply_timer is not gevent.getcurrent():
            self._reply_timer.kill(block=False)
        for sock in (self.upstream, self.client):
            try:
                sock.close()
            except OSError:
                pass


class Sockets:
    """The open WebSockets of this proxy process, by instance: the cap per instance, and 1001
    for every socket of an instance that leaves its endpoint's ready set (stopped, drained)."""

    def __init__(self, routing: RoutingView, grace_seconds: float = 10.0, tick_seconds: float = 0.25):
        self.routing = routing
        self.grace_seconds = grace_seconds
        self.tick_seconds = tick_seconds
        self._counts: dict[str, int] = {}  # instance id -> sockets open or being opened
        self._sessions: set[Session] = set()

    # ---- the cap ----
    def open_on(self, instance_id: str) -> int:
        return self._counts.get(instance_id, 0)

    def with_room(self, view: EndpointView, candidates: list[InstanceView]) -> list[InstanceView]:
        """The candidates below the endpoint's `max_websockets`."""
        cap = view.max_websockets
        counts = self._counts
        return [inst for inst in candidates if counts.get(inst.id, 0) < cap]

    def reserve(self, instance_id: str) -> "Slot":
        """Count a socket on the instance from its choice (before the handshake) to its close."""
        return Slot(self, instance_id)

    def _count(self, instance_id: str, delta: int) -> None:
        left = self._counts.get(instance_id, 0) + delta
        if left > 0:
            self._counts[instance_id] = left
        else:
            self._counts.pop(instance_id, None)

    # ---- relaying ----
    def relay(self, endpoint: str, instance_id: str, client, upstream, to_client_first: bytes,
              to_upstream_first: bytes) -> None:
        session = Session(endpoint, instance_id, client, upstream)
        self._sessions.add(session)
        try:
            session.run(to_client_first, to_upstream_first)
        finally:
            self._sessions.discard(session)

    def open_sessions(self) -> list[Session]:
        return list(self._sessions)

    # ---- going away ----
    def sweep(self, now: float | None = None) -> list[Session]:
        """Sessions whose instance has been out of the endpoint's ready set for the grace period:
        told 1001 (returned). One look at the routing view per session."""
        now = time.monotonic() if now is None else now
        due = []
        for session in list(self._sessions):
            view = self.routing.get(session.endpoint)
            if view is not None and view.instance(session.instance_id) is not None:
                session.leaving_since = None
                continue
            if session.leaving_since is None:
                session.leaving_since = now
            if now - session.leaving_since >= self.grace_seconds:
                due.append(session)
        for session in due:
            self._sessions.discard(session)
            gevent.spawn(session.going_away, f"instance {session.instance_id} is stopping")
        return due

    def run_forever(self) -> None:
        """Body of the sweeping greenlet."""
        while True:
            gevent.sleep(self.tick_seconds)
            try:
                self.sweep()
            except Exception:  # the sweep must go on
                log.exception("websocket sweep failed")

    def going_away_all(self, reason: str = "the proxy is shutting down") -> None:
        for session in list(self._sessions):
            gevent.spawn(session.going_away, reason)


class Slot:
    """One socket counted against an instance's `max_websockets`; `move` follows a substitute
    instance, `release` is idempotent."""

    __slots__ = ("_sockets", "instance_id")

    def __init__(self, sockets: Sockets, instance_id: str):
        self._sockets, self.instance_id = sockets, instance_id
        sockets._count(instance_id, +1)

    def move(self, instance_id: str) -> None:
        if self.instance_id is not None and instance_id != self.instance_id:
            self._sockets._count(self.instance_id, -1)
            self._sockets._count(instance_id, +1)
            self.instance_id = instance_id

    def release(self) -> None:
        if self.instance_id is not None:
            self._sockets._count(self.instance_id, -1)
            self.instance_id = None


RelayFunction = Callable[..., None]
