"""The proxy's gunicorn worker: gunicorn's gevent worker, with three answers it does not give.

- **Bytes that are not HTTP** (a TLS ClientHello sent to this plain-HTTP port, a stray binary
  protocol) would wait for a line end that never comes until the client gives up. The first byte
  of a request is a letter (the method), so a connection whose first byte is not one is answered
  400 at once, saying what it got, and closed.
- **Impossible chunk sizes** (a chunk larger than the proxy's body limit) would be waited for until
  the body timeout: refused at once, as an invalid chunk size.
- **gunicorn's own error answers** (a request line over the limit, malformed headers) are HTML;
  here they are JSON like every other answer of the proxy (README "Calling an endpoint").

And one thing WSGI has no word for: a protocol switch. A WebSocket handshake that the instance
accepts takes the client's socket over (`take_over`, proxy/websocket.py); the app then answers
`TAKEN_OVER`, and the connection is the relay's until it closes.
"""
from __future__ import annotations

import json
import socket
import time

from gunicorn import util
from gunicorn.http import body as gunicorn_body
from gunicorn.http.errors import InvalidChunkSize
from gunicorn.workers.base_async import ALREADY_HANDLED as TAKEN_OVER
from gunicorn.workers.ggevent import GeventWorker

from common.config import load_settings

# How long a new connection may stay silent before its first byte (then gunicorn's keep-alive
# and our body timeout take over).
FIRST_BYTE_TIMEOUT_SECONDS = 30.0
_METHOD_START = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ")


def json_error(status_int: int, reason: str, message: str) -> bytes:
    body = json.dumps({"code": status_int, "msg": message}).encode()
    head = (f"HTTP/1.1 {status_int} {reason}\r\nConnection: close\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode("latin-1")
    return head + body


def linger(sock, seconds: float = 1.0, most: int = 1 << 20) -> None:
    """After an error answer, with the client's bytes still unread: half-close and drain them a
    moment before the close, else the kernel resets the connection and the client may lose the
    answer before reading it (a "lingering close")."""
    try:
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(seconds)
        drained = 0
        while drained < most:
            data = sock.recv(65536)
            if not data:
                break
            drained += len(data)
    except OSError:
        pass


def _write_json_error(sock, status_int: int, reason: str, mesg: str) -> None:
    util.write_nonblock(sock, json_error(status_int, reason, mesg))
    linger(sock)


def _bounded_chunks(limit: int):
    original = gunicorn_body.ChunkedReader.parse_chunk_size

    def parse_chunk_size(self, unreader, data=None):
        size, rest = original(self, unreader, data)
        if size > limit:
            raise InvalidChunkSize(f"a chunk of {size} bytes is over the proxy's body limit of {limit} bytes")
        return size, rest

    parse_chunk_size.bounded = True
    return parse_chunk_size


def install(max_body_bytes: int) -> None:
    """Applied once per proxy process (the only kind of process that loads this module's worker)."""
    util.write_error = _write_json_error
    if not getattr(gunicorn_body.ChunkedReader.parse_chunk_size, "bounded", False):
        gunicorn_body.ChunkedReader.parse_chunk_size = _bounded_chunks(max_body_bytes)


# When each open connection was accepted, until its first request reads it (`arrival_of`): a
# request that waited in the accept queue while an instance started waited for that start too.
_ACCEPTED_AT: dict[int, float] = {}


def arrival_of(sock, now: float) -> float:
    """When the request on `sock` arrived: the accept time for a connection's first request,
    else now (a keep-alive connection's later requests arrive when they are read)."""
    if sock is None:
        return now
    return min(now, _ACCEPTED_AT.pop(id(sock), now))


def take_over(environ: dict) -> tuple[socket.socket, bytes]:
    """The client's socket, for a protocol switch (WebSocket), and the bytes the server read from
    it past the request. The app answers `TAKEN_OVER` once done with it; the server then neither
    reads another request from it nor writes a response to it."""
    sock = environ["gunicorn.socket"]
    _TAKEN.add(id(sock))
    ahead = b""
    reader = getattr(environ.get("wsgi.input"), "reader", None)
    unreader = getattr(reader, "unreader", None)
    if unreader is not None:
        ahead = unreader.take_buffered()
    sock.settimeout(None)
    return sock, ahead


# Sockets taken over, until the worker's request loop lets go of them.
_TAKEN: set[int] = set()
# Called when the worker is asked to stop (SIGTERM, SIGQUIT): open WebSockets are told 1001.
ON_SHUTDOWN: list = []


class ProxyWorker(GeventWorker):
    def init_process(self):
        install(load_settings().proxy_max_body_bytes)
        super().init_process()

    def handle_request(self, listener_name, req, sock, addr):
        try:
            return super().handle_request(listener_name, req, sock, addr)
        finally:
            if id(sock) in _TAKEN:
                # The app took the socket over (a WebSocket) and is done with it: no next request.
                _TAKEN.discard(id(sock))
                raise StopIteration()

    def _shutting_down(self) -> None:
        for hook in ON_SHUTDOWN:
            try:
                hook()
            except Exception:  # noqa: BLE001 - every hook gets its turn
                self.log.exception("shutdown hook failed")

    def handle_exit(self, sig, frame):
        super().handle_exit(sig, frame)
        import gevent

        gevent.spawn(self._shutting_down)

    def handle_quit(self, sig, frame):
        import gevent

        gevent.spawn(self._shutting_down)
        super().handle_quit(sig, frame)

    def handle(self, listener, client, addr):
        _ACCEPTED_AT[id(client)] = time.time()
        try:
            self._handle(listener, client, addr)
        finally:
            _ACCEPTED_AT.pop(id(client), None)

    def _handle(self, listener, client, addr):
        client.setblocking(1)
        try:
            client.settimeout(FIRST_BYTE_TIMEOUT_SECONDS)
            first = client.recv(1, socket.MSG_PEEK)
            client.settimeout(None)
        except OSError:
            client.close()
            return
        if not first:
            client.close()
            return
        if first[0] not in _METHOD_START:
            what = "a TLS handshake" if first[0] == 0x16 else f"the byte {first!r}"
            try:
                client.sendall(json_error(400, "Bad Request", f"this port speaks plain HTTP/1.1 and got {what}; "
                                                                 "send an HTTP request (http://, not https://)"))
                linger(client)
            except OSError:
                pass
            client.close()
            return
        super().handle(listener, client, addr)
